"""The robust recipe's cost on PreActResNet-18, stage by stage, and the joint refit's speed-up.

PreActResNet-18 (CIFAR shape: 3x32x32 inputs, 10 classes; random weights with a fixed seed
and non-trivial BatchNorm statistics, eval mode), ``--samples`` random training images
(uniform pixels, random labels, fixed seed), batches of 100:

1. **The recipe.** ``compress(model, loader, target_mac_reduction=2, recipe="robust")``
   (data weighting on 256 inputs, global allocation, joint refit on ``--samples`` PGD-10
   inputs at eps 8/255, BatchNorm on ``--samples`` natural inputs): the time of each
   stage (``report.seconds``), the whole call, and the process's peak resident memory.
2. **A sweep.** :func:`gdws_torch.recipe_inputs` once (weights and PGD calibration
   inputs), then ``compress(inputs=...)`` at ``--targets``: its time against one target's
   (the recipe's time of step 1).
3. **The joint refit, same layers.** On the converted model of step 1 before recovery and
   the same PGD calibration inputs, each of ``--layers`` gets its patch statistics, then
   its factors are refitted by :func:`gdws_torch.recovery.refit_layer_factors` (new:
   structured steps, early stop at 1e-3) and by
   :func:`gdws_torch.recovery.reference_steps.reference_refit_layer_factors` (the solver
   before: dense products, direct solve up to 6144 unknowns, three alternations). The two
   run in this process, interleaved, ``--repeats`` times; medians per layer, the ratio of
   their sums, and each side's final layer errors (the new one is never worse by more
   than the early stop's 1e-3).

The last line: ``RESULT compress_speed: <ratio>x (new joint refit vs today's joint refit,
same layers)``. Run: ``python bench/compress_speed.py [--samples N] [--repeats N]
[--quick] [--out PATH]``. Threads: all cores (``torch.get_num_threads()``); time nothing
else meanwhile.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from alpha_speed import network  # the same random PreActResNet-18 (bench/ is on sys.path)
from torch.utils.data import DataLoader, TensorDataset

from gdws_approx.files import write_json_atomic
from gdws_torch import (
    RECIPES,
    BatchNormStatistics,
    Recovery,
    Refit,
    Weighting,
    compress,
    recipe_inputs,
)
from gdws_torch.nn.layers import GDWSConv2d
from gdws_torch.recovery import refit_layer_factors
from gdws_torch.recovery.reference_steps import reference_refit_layer_factors
from gdws_torch.recovery.refit import layer_statistics

INPUT_SHAPE = (3, 32, 32)
EPSILON = 8 / 255
DEFAULT_LAYERS = ("layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2")


def data(samples: int, seed: int = 1) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(samples, *INPUT_SHAPE, generator=generator)
    labels = torch.randint(0, 10, (samples,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=100)


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--samples", type=int, default=1000, help="calibration inputs")
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 2.5, 3.0])
    parser.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200 samples, 1 repeat, 2 layers")
    parser.add_argument("--out", type=Path, default=Path("gdws-results/bench/compress_speed.json"))
    args = parser.parse_args()
    if args.quick:
        args.samples, args.repeats, args.layers = 200, 1, args.layers[:2]
    model, loader = network(), data(args.samples)
    recipe = RECIPES["robust"].replace(
        weighting=Weighting("data", samples=min(256, args.samples)),
        recovery=Recovery(
            refit=Refit(samples=args.samples), batchnorm=BatchNormStatistics(args.samples)
        ),
    )
    print(
        f"PreActResNet-18 {INPUT_SHAPE}, {args.samples} calibration inputs, "
        f"{platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )

    # 1. The whole recipe at one target.
    start = time.perf_counter()
    _, report = compress(
        model,
        loader,
        target_mac_reduction=args.targets[0],
        recipe=recipe,
        eps=EPSILON,
        input_size=INPUT_SHAPE,
        progress=True,
    )
    one_target = time.perf_counter() - start
    peak = peak_memory_mb()
    print(f"\nthe recipe at {args.targets[0]:g}x: {one_target:.1f} s, peak memory {peak:,.0f} MB")
    for stage, seconds in report.seconds.items():
        print(f"  {stage:<14} {seconds:8.1f} s")

    # 2. A sweep over targets, the recipe's inputs computed once.
    start = time.perf_counter()
    inputs = recipe_inputs(
        model, loader, recipe, eps=EPSILON, input_size=INPUT_SHAPE, progress=True
    )
    sweep = {}
    for target in args.targets:
        _, sweep_report = compress(
            model, inputs=inputs, target_mac_reduction=target, input_size=INPUT_SHAPE
        )
        sweep[target] = dict(sweep_report.seconds)
    sweep_seconds = time.perf_counter() - start
    print(
        f"\n{len(args.targets)}-target sweep ({', '.join(f'{t:g}x' for t in args.targets)}): "
        f"{sweep_seconds:.1f} s = {sweep_seconds / one_target:.2f}x one target"
    )

    # 3. The joint refit, new against the solver before, on the same layers' statistics.
    plain, _ = compress(
        model,
        loader,
        target_mac_reduction=args.targets[0],
        recipe=recipe.replace(recovery=Recovery()),
        eps=EPSILON,
        input_size=INPUT_SHAPE,
    )
    batches = [images for images, *_ in inputs.calibration]
    modules, dense = dict(plain.named_modules()), dict(model.named_modules())
    layers = {}
    for name in args.layers:
        layer = modules[name]
        if not isinstance(layer, GDWSConv2d):
            print(f"{name} stayed dense at {args.targets[0]:g}x: skipped")
            continue
        with torch.no_grad():
            gram, cross, energy = layer_statistics(layer, dense[name], plain, batches)
        factors = (
            gram,
            cross,
            layer.kernel_channels,
            layer.pointwise.weight.detach().double().flatten(1),
            layer.depthwise.weight.detach().double().flatten(1),
        )
        layers[name] = (factors, energy, layer.n_kernels)
    times = {name: {"new": [], "reference": []} for name in layers}
    final = {}
    sides = {
        "new": lambda f, e: refit_layer_factors(*f, energy=e),
        "reference": lambda f, e: reference_refit_layer_factors(*f, energy=e),
    }
    for repeat in range(args.repeats):
        for name, (factors, energy, _) in layers.items():
            order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
            for side in order:
                start = time.perf_counter()
                _, _, errors = sides[side](factors, energy)
                times[name][side].append(time.perf_counter() - start)
                final.setdefault(name, {})[side] = errors[-1] / energy
    print("\nlayer            G      new s   reference s  new error  reference error (of energy)")
    rows = []
    for name, (_, _, n_kernels) in layers.items():
        new, old = (statistics.median(times[name][side]) for side in ("new", "reference"))
        rows.append(
            {"layer": name, "G": n_kernels, "new_s": new, "reference_s": old, **final[name]}
        )
        print(
            f"{name:<15} {n_kernels:>5} {new:>9.2f} {old:>13.2f} {final[name]['new']:>10.5f} "
            f"{final[name]['reference']:>16.5f}"
        )
    new_total = sum(r["new_s"] for r in rows)
    old_total = sum(r["reference_s"] for r in rows)
    ratio = old_total / new_total
    result = {
        "samples": args.samples,
        "threads": torch.get_num_threads(),
        "recipe_seconds": one_target,
        "stages": dict(report.seconds),
        "peak_memory_mb": peak,
        "sweep_targets": args.targets,
        "sweep_seconds": sweep_seconds,
        "sweep_stages": {str(t): s for t, s in sweep.items()},
        "sweep_vs_one_target": sweep_seconds / one_target,
        "layers": rows,
        "new_refit_s": new_total,
        "reference_refit_s": old_total,
        "ratio": ratio,
    }
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    print(
        f"RESULT compress_speed: {ratio:.2f}x (new joint refit vs today's joint refit, same "
        f"layers: {new_total:.1f} s vs {old_total:.1f} s, medians of {args.repeats})"
    )


if __name__ == "__main__":
    main()
