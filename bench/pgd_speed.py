"""PGD speed: our Linf PGD against torchattacks' PGD, same model, inputs and settings.

PreActResNet-18 (32x32, random weights with a fixed seed, eval mode), a batch of random
images, ``eps = 8/255``, ``alpha = 2/255``, ``--steps`` iterations (default 10, the
original's evaluation default) with a random start. Both attacks start from the same
random point (ours with ``seed=s``; torchattacks after ``torch.manual_seed(s)``) and the
script first checks that they agree: after one step, the same adversarial images
(1e-6); after all the steps, fewer than 2 % of the pixels differ (rounding flips the
sign of a few near-zero gradient entries, and those pixels then drift apart: about 1 %
after 10 steps). Sides run
interleaved in one process, ``--repeats`` times; medians are quoted. The result is our
time over theirs (target <= 1.0).
Run: ``python bench/pgd_speed.py [--repeats N] [--batch-size B] [--steps S] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from gdws_approx.files import write_json_atomic
from gdws_torch.models import PreActResNet18
from gdws_torch.robustness.attacks import PGD


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("gdws-results/pgd_speed.json"))
    args = parser.parse_args(argv)
    if min(args.repeats, args.batch_size, args.steps) < 1:
        print("error: --repeats, --batch-size and --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        import torchattacks
    except ImportError:
        print(
            "error: torchattacks is not installed (pip install --no-deps torchattacks)",
            file=sys.stderr,
        )
        return 2

    torch.manual_seed(0)
    model = PreActResNet18()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch_size, 3, 32, 32, generator=generator)
    with torch.no_grad():
        labels = model(images).argmax(1)
    eps, alpha = 8 / 255, 2 / 255

    def ours(seed: int, steps: int = args.steps) -> torch.Tensor:
        return PGD(model, eps, alpha, steps=steps, seed=seed)(images, labels)

    def theirs(seed: int, steps: int = args.steps) -> torch.Tensor:
        torch.manual_seed(seed)
        attack = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        return attack(images, labels)

    one_step = float((ours(0, 1) - theirs(0, 1)).abs().max())
    drifted = float(((ours(0) - theirs(0)).abs() > 1e-6).float().mean())
    print(
        f"PreActResNet-18, batch {args.batch_size}, {args.steps} steps, eps 8/255; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; torchattacks "
        f"{torchattacks.__version__}"
    )
    print(
        f"agreement: max difference after one step {one_step:.1e}; pixels differing after "
        f"{args.steps} steps {100 * drifted:.2f} %"
    )
    if one_step > 1e-6 or drifted > 0.02:
        print("error: the attacks disagree", file=sys.stderr)
        return 1
    times: dict[str, list[float]] = {"ours": [], "torchattacks": []}
    sides = [("ours", ours), ("torchattacks", theirs)]
    for repeat in range(args.repeats):
        for side, fn in sides if repeat % 2 == 0 else sides[::-1]:  # alternate who goes first
            start = time.perf_counter()
            fn(repeat)
            times[side].append(time.perf_counter() - start)
    median = {side: statistics.median(t) for side, t in times.items()}
    for side, t in median.items():
        print(f"{side:>13}: {t * 1e3:8.1f} ms per batch (median of {args.repeats})")
    ratio = median["ours"] / median["torchattacks"]
    write_json_atomic(
        args.out,
        {
            "model": "PreActResNet-18 (32x32)",
            "batch_size": args.batch_size,
            "steps": args.steps,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "max_difference_one_step": one_step,
            "fraction_of_pixels_differing": drifted,
            "seconds": times,
            "median_seconds": median,
            "time_ratio_ours_over_theirs": ratio,
        },
    )
    print(f"JSON: {args.out}")
    print(f"RESULT pgd_speed: {ratio:.2f}x (our time vs torchattacks' time; lower is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
