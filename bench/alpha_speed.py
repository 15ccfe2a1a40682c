"""Noise-gain speed: the batched computation against per-sample, per-class loops.

On PreActResNet-18 (32x32 inputs, 10 classes, the 16 eligible 3x3 convs; random weights
with a fixed seed and non-trivial BatchNorm statistics, eval mode) and the same random
images, three sides compute the noise gains of DESIGN section 4:

- ``original``: the original implementation's loop (``compute_alphas.py``): batch size
  1; per class ``j != t`` a ``.backward()`` of ``z_t - z_j`` that fills every
  parameter's ``.grad``, then per layer the gradient split into ``C`` slices in Python,
  one squared norm each, and the gradients zeroed (on a copy of the model);
- ``loop``: the same per-sample, per-class loop written well
  (:func:`gdws_torch.noise_gains.reference_noise_gains`: ``torch.autograd.grad`` on the
  eligible weights only, vectorised channel norms);
- ``batched``: :func:`gdws_torch.noise_gains` (chunks of samples, one input-gradient
  backward per class, per-layer Gram or materialised norms).

The loops run on ``--loop-samples`` of the images, the batched side on
``--batched-samples``; times are per sample. Sides run interleaved in one process,
``--repeats`` times; medians are quoted. Before timing, the script checks that all sides
agree on the common samples (max relative difference printed; must be < 1e-4).
Run: ``python bench/alpha_speed.py [--repeats N] [--quick] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from gdws_approx._io import write_json_atomic
from gdws_torch import count_macs, eligible_convs
from gdws_torch.models import PreActResNet18
from gdws_torch.noise_gains import choose_form, noise_gains, reference_noise_gains


def network(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = PreActResNet18()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def original_noise_gains(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The original's loop (compute_alphas.py), in eval mode, on a copy of the model."""
    model = copy.deepcopy(model)
    weights = {f"{name}.weight": conv.weight for name, conv in eligible_convs(model)}
    gains = {key: torch.zeros(w.shape[1]) for key, w in weights.items()}
    for i in range(images.shape[0]):
        output = model(images[i : i + 1]).view(-1)
        y_top, c_top = output.max(), output.argmax()
        for c in range(len(output)):
            if c == c_top:
                continue
            output_diff = y_top - output[c]
            output_diff.backward(retain_graph=True)
            with torch.no_grad():
                denominator = 2 * output_diff**2
                for key, weight in weights.items():
                    m, _, k, _ = weight.grad.shape
                    splits = torch.split(weight.grad.view(m, -1), k * k, dim=1)
                    gains[key].add_(
                        torch.stack([(g**2).sum() / (denominator * m * k * k) for g in splits])
                    )
            model.zero_grad()
    return {key: value / images.shape[0] for key, value in gains.items()}


def max_relative_difference(a: dict, b: dict) -> float:
    return max(float(((a[k] - b[k]).abs() / b[k].abs().max()).max()) for k in b)


def timed(fn) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batched-samples", type=int, default=64)
    parser.add_argument("--loop-samples", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--out", type=Path, default=Path("gdws-results/alpha_speed.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.batched_samples, args.loop_samples = 1, 4, 2
    if min(args.repeats, args.batched_samples, args.loop_samples, args.chunk_size) < 1:
        print("error: --repeats, --*-samples and --chunk-size must be >= 1", file=sys.stderr)
        return 2

    model = network()
    generator = torch.Generator().manual_seed(1)
    n = max(args.batched_samples, args.loop_samples)
    images = torch.rand(n, 3, 32, 32, generator=generator)
    labels = torch.zeros(n, dtype=torch.long)

    def batched(count: int) -> dict:
        loader = [(images[:count], labels[:count])]
        return noise_gains(model, loader, count, chunk_size=args.chunk_size, progress=False)

    def loop(count: int) -> dict:
        return reference_noise_gains(model, [(images[:count], labels[:count])], count)

    print(
        f"PreActResNet-18, 32x32, 10 classes; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({platform.processor()})"
    )
    counted = count_macs(model, (3, 32, 32))
    forms = {
        name: choose_form(conv.out_channels, conv.in_channels, 9, counted[name].output_pixels, 10)
        for name, conv in eligible_convs(model)
    }
    print("forms: " + ", ".join(f"{name} {form}" for name, form in forms.items()))

    common = args.loop_samples
    reference = original_noise_gains(model, images[:common])
    difference = {
        "loop": max_relative_difference(loop(common), reference),
        "batched": max_relative_difference(batched(common), reference),
    }
    print(
        f"max relative difference to the original on {common} samples: "
        + ", ".join(f"{k} {v:.1e}" for k, v in difference.items())
    )
    if max(difference.values()) > 1e-4:
        print("error: the sides disagree", file=sys.stderr)
        return 1

    times: dict[str, list[float]] = {"original": [], "loop": [], "batched": []}
    for _ in range(args.repeats):
        times["original"].append(
            timed(lambda: original_noise_gains(model, images[:common]))[1] / common
        )
        times["loop"].append(timed(lambda: loop(common))[1] / common)
        times["batched"].append(
            timed(lambda: batched(args.batched_samples))[1] / args.batched_samples
        )
    median = {side: statistics.median(t) for side, t in times.items()}
    for side, t in median.items():
        print(f"{side:>9}: {t * 1e3:8.1f} ms/sample (median of {args.repeats})")
    ratio_original = median["original"] / median["batched"]
    ratio_loop = median["loop"] / median["batched"]
    print(f"batched vs the original's loop: {ratio_original:.2f}x")
    write_json_atomic(
        args.out,
        {
            "model": "PreActResNet-18 (32x32, 10 classes)",
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "batched_samples": args.batched_samples,
            "loop_samples": common,
            "chunk_size": args.chunk_size,
            "forms": forms,
            "max_relative_difference": difference,
            "ms_per_sample": {k: [x * 1e3 for x in v] for k, v in times.items()},
            "median_ms_per_sample": {k: v * 1e3 for k, v in median.items()},
            "ratio_vs_original": ratio_original,
            "ratio_vs_loop": ratio_loop,
        },
    )
    print(f"JSON: {args.out}")
    print(f"RESULT alpha_speed: {ratio_loop:.2f}x (batched vs per-sample loop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
