"""AutoAttack speed: our standard AutoAttack against torchattacks' AutoAttack, same work.

PreActResNet-18 (32x32, random weights with a fixed seed, eval mode), ``--images`` random
images (default 16) labelled with the model's own clean predictions, so that every sample
starts correctly classified; Linf, ``eps = 8/255``, the standard version on both sides
(APGD-CE, APGD-T with 9 targets, FAB-T with 9 targets, Square with 5000 queries, each on
the samples still correct). torchattacks' ``AutoAttack`` runs APGD, APGD-T and FAB with 10
steps (its attacks' default); the standard version runs 100, so its three attacks are set
to ``--reference-steps`` (default 100: the same work as ours; 10: torchattacks as shipped).
Both sides run in this process on the same samples, interleaved (who goes first alternates),
``--repeats`` times (default 3); medians are quoted, with each side's robust accuracy.
The result is our speed-up: their median time over ours (above 1: ours is faster).
``--quick``: 4 images, 1 repeat.
Run: ``python bench/autoattack_speed.py [--quick] [--images N] [--repeats R] [--out PATH]``.
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
from gdws_torch.robustness.autoattack import AutoAttack

EPS = 8 / 255


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="4 images, 1 repeat (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("gdws-results/autoattack_speed.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 4, 1
    if min(args.images, args.repeats, args.reference_steps) < 1:
        print("error: --images, --repeats and --reference-steps must be >= 1", file=sys.stderr)
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
    images = torch.rand(args.images, 3, 32, 32, generator=generator)
    with torch.no_grad():
        labels = model(images).argmax(1)  # every sample starts correct

    def robust(adversarial: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(adversarial).argmax(1) == labels

    ours_attack = AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=0)

    def ours() -> torch.Tensor:
        return robust(ours_attack(images, labels))

    def theirs() -> torch.Tensor:
        attack = torchattacks.AutoAttack(
            model, norm="Linf", eps=EPS, version="standard", n_classes=10, seed=0
        )
        for inner in attack._autoattack.attacks[:3]:  # APGD, APGD-T, FAB
            inner.steps = args.reference_steps
        return robust(attack(images, labels))

    print(
        f"PreActResNet-18 (random weights), {args.images} images, standard AutoAttack, Linf "
        f"8/255; torch {torch.__version__}, {torch.get_num_threads()} threads; torchattacks "
        f"{torchattacks.__version__} (APGD/APGD-T/FAB at {args.reference_steps} steps)"
    )
    times: dict[str, list[float]] = {"ours": [], "torchattacks": []}
    accuracy: dict[str, float] = {}
    survivors: dict[str, torch.Tensor] = {}
    sides = [("ours", ours), ("torchattacks", theirs)]
    for repeat in range(args.repeats):
        for side, fn in sides if repeat % 2 == 0 else sides[::-1]:
            start = time.perf_counter()
            survived = fn()
            times[side].append(time.perf_counter() - start)
            survivors[side] = survived
            accuracy[side] = 100.0 * float(survived.float().mean())
    median = {side: statistics.median(t) for side, t in times.items()}
    differing = int((survivors["ours"] != survivors["torchattacks"]).sum())
    for side, t in median.items():
        print(
            f"{side:>13}: robust accuracy {accuracy[side]:6.2f} %, {t:8.2f} s per batch "
            f"(median of {args.repeats})"
        )
    report = ours_attack.last_report
    print(f"ours by attack: {report.format()}")
    print(f"samples whose outcome differs between the sides: {differing} of {args.images}")
    speedup = median["torchattacks"] / median["ours"]
    write_json_atomic(
        args.out,
        {
            "model": "PreActResNet-18 (32x32, random weights)",
            "images": args.images,
            "eps": EPS,
            "norm": "Linf",
            "version": "standard",
            "reference_steps": args.reference_steps,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "robust_accuracy": accuracy,
            "samples_differing": differing,
            "ours_by_attack": report.to_dict(),
            "seconds": times,
            "median_seconds": median,
            "speedup_ours_over_theirs": speedup,
        },
    )
    print(f"JSON: {args.out}")
    print(
        f"RESULT autoattack_speed: {speedup:.2f}x (ours vs torchattacks, standard AutoAttack, "
        f"Linf 8/255, {args.images} images: {median['ours']:.1f} s vs "
        f"{median['torchattacks']:.1f} s, medians of {args.repeats})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
