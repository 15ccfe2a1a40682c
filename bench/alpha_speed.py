"""Noise-gain speed: the batched computation against the per-sample, per-class loop.

Computes the noise gains ``alpha`` (docs/noise_gains.md) of the 16 eligible 3x3 convolutions
of PreActResNet-18 (32x32 inputs, 10 classes, float32; random weights with a fixed seed,
non-trivial BatchNorm statistics, eval mode) on random images (fixed seed), three ways:

- ``loop``: :func:`gdws_torch.conversion.noise_gains.reference_noise_gains`, the original's
  algorithm: batch size 1, per sample one backward pass of ``z_t - z_j`` to the eligible
  weights for each class ``j != t`` (9 passes), per-channel squared norms (vectorised:
  a strong reference). The ratio on the ``RESULT`` line is against this side;
- ``original``: the same loop as the original code wrote it: ``.backward()`` filling
  every parameter's ``.grad`` (on a copy of the model), each gradient split into ``C``
  slices in Python, one norm per slice, ``zero_grad`` after each class;
- ``batched``: :func:`gdws_torch.noise_gains`: chunks of ``--chunk-size`` samples, one
  forward and 9 input-gradient backward passes per chunk, per-layer Gram or materialised
  weight-gradient norms.

The loops run on the first ``--loop-samples`` images, the batched side on the first
``--batched-samples`` (a superset); all are quoted in milliseconds per sample. A fourth
timing, ``floor``, is the part of the batched side that no norm computation avoids: the
chunk's forward pass and its 9 backward passes to the layers' outputs. Sides run in this
process, interleaved, ``--repeats`` times; medians are quoted. Before timing, every side
runs on the loop's samples and must agree with ``loop`` within 1e-4 of each layer's
largest gain (elementwise differences, larger, are printed too; see ``AGREEMENT``).
Run: ``python bench/alpha_speed.py [--repeats N] [--quick] [--profile] [--out PATH]``.
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

from gdws_approx.files import write_json_atomic
from gdws_torch.conversion.eligibility import eligible_convs
from gdws_torch.conversion.noise_gains import (
    noise_gains,
    plan_noise_gain_forms,
    reference_noise_gains,
)
from gdws_torch.models import PreActResNet18

INPUT_SHAPE = (3, 32, 32)
# All sides run in float32. Elementwise, each is 1e-5 to 1e-4 (relative) from a float64 run:
# the random network's logits lie close together and 1 / (z_t - z_j)^2 amplifies their
# rounding, in every side alike. Relative to each layer's largest gain they agree to ~1e-6.
AGREEMENT = 1e-4


def network(seed: int = 0) -> nn.Module:
    """PreActResNet-18, random weights, BatchNorm statistics away from (0, 1), eval mode."""
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
    """The original's loop as it was written (``.backward()`` and ``.grad``), in eval mode.

    Run it on a copy of the model: it leaves gradients on the parameters it touches.
    """
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


def autograd_floor(model: nn.Module, images: torch.Tensor, chunk_size: int) -> None:
    """The forward and the ``K - 1`` backward passes to the eligible layers' outputs."""
    outputs: list[torch.Tensor] = []
    hooks = [
        conv.register_forward_hook(lambda module, inputs, output: outputs.append(output))
        for _, conv in eligible_convs(model)
    ]
    try:
        for chunk in images.split(chunk_size):
            outputs.clear()
            logits = model(chunk.clone().requires_grad_(True))
            top = logits.detach().argmax(1)
            n, k = logits.shape
            rows = torch.arange(n)
            for i in range(k - 1):
                seed = torch.zeros_like(logits)
                seed[rows, top] = 1.0
                seed[rows, i + (i >= top).long()] = -1.0
                torch.autograd.grad(logits, outputs, seed, retain_graph=i < k - 2)
    finally:
        for hook in hooks:
            hook.remove()


def differences(got: dict, expected: dict) -> tuple[float, float]:
    """Largest difference relative to each layer's largest gain, and elementwise."""
    layerwise = elementwise = 0.0
    for key, value in expected.items():
        error = (got[key] - value).abs()
        layerwise = max(layerwise, float(error.max() / value.abs().max()))
        # A channel exactly zero on both sides (a dead ReLU channel) counts as equal.
        elementwise = max(elementwise, float((error / value.abs().clamp_min(1e-30)).max()))
    return layerwise, elementwise


def time_once(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def profile_batched(run) -> None:
    """The batched side's ten most expensive operators (torch.profiler, self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per side")
    parser.add_argument("--batched-samples", type=int, default=32)
    parser.add_argument("--loop-samples", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (seconds)")
    parser.add_argument("--profile", action="store_true", help="profile the batched side")
    parser.add_argument("--out", type=Path, default=Path("gdws-results/alpha_speed.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.batched_samples, args.loop_samples, args.chunk_size = 1, 4, 2, 4
    for name in ("repeats", "batched_samples", "loop_samples", "chunk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.loop_samples > args.batched_samples:
        parser.error("--loop-samples must not exceed --batched-samples")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    model = network()
    original_model = copy.deepcopy(model)  # the original's loop fills .grad
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(args.batched_samples, *INPUT_SHAPE, generator=generator)
    labels = torch.zeros(args.batched_samples, dtype=torch.long)
    n_loop, n_batched = args.loop_samples, args.batched_samples

    def batched(count: int) -> dict:
        loader = [(images[:count], labels[:count])]
        return noise_gains(model, loader, count, chunk_size=args.chunk_size, progress=False)

    def loop(count: int) -> dict:
        return reference_noise_gains(model, [(images[:count], labels[:count])], count)

    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"PreActResNet-18, 32x32, 10 classes, float32; torch {torch.__version__}, "
        f"torch.get_num_threads() = {threads}, {cores} cores ({platform.machine()})"
    )
    forms = plan_noise_gain_forms(model, INPUT_SHAPE, chunk_size=args.chunk_size)
    print("forms: " + ", ".join(f"{name} {form}" for name, form in forms.items()))

    expected = loop(n_loop)
    layerwise, elementwise = {}, {}
    for side, got in (
        ("batched", batched(n_loop)),
        ("original", original_noise_gains(original_model, images[:n_loop])),
    ):
        layerwise[side], elementwise[side] = differences(got, expected)
        print(
            f"{side} vs loop on {n_loop} samples: max difference {layerwise[side]:.1e} of the "
            f"layer's largest gain, {elementwise[side]:.1e} elementwise (relative)"
        )
    if not max(layerwise.values()) < AGREEMENT:
        print(f"error: the sides disagree beyond {AGREEMENT:.0e}", file=sys.stderr)
        return 1

    sides = {
        "loop": (lambda: loop(n_loop), n_loop),
        "original": (lambda: original_noise_gains(original_model, images[:n_loop]), n_loop),
        "batched": (lambda: batched(n_batched), n_batched),
        "floor": (lambda: autograd_floor(model, images, args.chunk_size), n_batched),
    }
    per_sample: dict[str, list[float]] = {side: [] for side in sides}
    for round_index in range(args.repeats):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for side in order:
            run, count = sides[side]
            per_sample[side].append(time_once(run) / count)
    median = {side: statistics.median(values) for side, values in per_sample.items()}
    ratio = median["loop"] / median["batched"]

    print(f"\nmedian of {args.repeats} interleaved rounds, ms per sample")
    notes = {
        "loop": f"per-sample loop (reference_noise_gains), {n_loop} samples",
        "original": f"the original's .backward()/.grad loop, {n_loop} samples",
        "batched": f"noise_gains, {n_batched} samples in chunks of {args.chunk_size}",
        "floor": "of which its forward + 9 input-gradient backward passes",
    }
    for side, note in notes.items():
        print(f"  {side:<9}{median[side] * 1e3:8.1f}   {note}")
    print(
        f"batched: {median['original'] / median['batched']:.1f}x faster than the original's "
        f"loop; the floor is {median['floor'] / median['batched']:.0%} of its time"
    )
    if args.profile:
        profile_batched(lambda: batched(n_batched))
    result = {
        "model": "PreActResNet-18 (32x32, 10 classes, float32)",
        "torch": torch.__version__,
        "threads": threads,
        "cores": cores,
        "repeats": args.repeats,
        "loop_samples": n_loop,
        "batched_samples": n_batched,
        "chunk_size": args.chunk_size,
        "forms": forms,
        "max_relative_difference": layerwise,
        "max_elementwise_relative_difference": elementwise,
        "ms_per_sample": {side: [t * 1e3 for t in values] for side, values in per_sample.items()},
        "median_ms_per_sample": {side: value * 1e3 for side, value in median.items()},
        "ratio_batched_vs_loop": ratio,
        "ratio_batched_vs_original": median["original"] / median["batched"],
    }
    write_json_atomic(args.out, result)
    print(f"\nJSON: {args.out}")
    print(f"RESULT alpha_speed: {ratio:.1f}x (batched vs per-sample loop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
