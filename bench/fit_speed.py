"""Fit speed: GDWSApproximator against the original's per-channel SVD loop.

Fits LEGO and MEGO on every 3x3 convolution of a PreActResNet-18-shaped network (16
layers, the stem excluded as the original does; about 11 M float32 weights), and times
the same fits done the way the original implementation did them: one SVD per input
channel in a Python loop, the solver's sort/budget loop, and the depthwise and pointwise
matrices assembled kernel by kernel in Python (here in NumPy, which is faster than the
original's per-element torch calls, so the reference is a strong one).

Both sides run in this process, interleaved, repeated; medians are quoted. Before timing,
the script checks that both sides choose identical multipliers and report the same error
(1e-6 relative). Run: ``python bench/fit_speed.py [--repeats N] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from gdws_approx import GDWSApproximator
from gdws_approx.files import write_json_atomic

# (M, C) of the 3x3 convolutions of PreActResNet-18 after its stem.
PREACT_RESNET18_3X3 = (
    [(64, 64)] * 4
    + [(128, 64)]
    + [(128, 128)] * 3
    + [(256, 128)]
    + [(256, 256)] * 3
    + [(512, 256)]
    + [(512, 512)] * 3
)
LEGO_ENERGY_FRACTION = 0.05  # beta = 5 % of each layer's squared Frobenius norm
MEGO_KERNELS_PER_CHANNEL = 3  # gamma = 3 * C


def network_weights(seed: int = 0) -> list[np.ndarray]:
    """He-initialised float32 weights of the 16 layers."""
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((m, c, 3, 3)) * np.sqrt(2.0 / (9 * c))).astype(np.float32)
        for m, c in PREACT_RESNET18_3X3
    ]


def layer_budgets(W: np.ndarray) -> dict:
    return {
        "lego": {"beta": LEGO_ENERGY_FRACTION * float(np.sum(W.astype(np.float64) ** 2))},
        "mego": {"n_kernels": MEGO_KERNELS_PER_CHANNEL * W.shape[1]},
    }


def reference_fit(W: np.ndarray, solver: str, beta: float = 0.0, n_kernels: int = 0) -> dict:
    """The original's algorithm: a Python loop of per-channel SVDs, then per-kernel assembly."""
    m, c, kh, kw = W.shape
    k2 = kh * kw
    us, ss, vts = [], [], []
    for channel in range(c):
        u, s, vt = np.linalg.svd(W[:, channel].reshape(m, k2), full_matrices=False)
        us.append(u)
        ss.append(s)
        vts.append(vt)
    singular = np.stack(ss)
    rank = singular.shape[1]
    values = (singular.astype(np.float64) ** 2).reshape(-1)
    order = np.argsort(-values, kind="stable")
    if solver == "lego":
        sorted_values = values[order]
        n_keep, spent = values.size, 0.0
        for _ in range(values.size):  # drop the smallest while the budget allows
            if spent + sorted_values[n_keep - 1] > beta:
                break
            spent += sorted_values[n_keep - 1]
            n_keep -= 1
    else:
        n_keep = min(n_kernels, int(np.count_nonzero(values)))
    kept = sorted((int(i) // rank, int(i) % rank) for i in order[:n_keep])
    pointwise = np.zeros((m, n_keep), dtype=W.dtype)
    depthwise = np.zeros((n_keep, kh, kw), dtype=W.dtype)
    multipliers = np.zeros(c, dtype=np.int64)
    for j, (channel, i) in enumerate(kept):
        pointwise[:, j] = us[channel][:, i] * ss[channel][i]
        depthwise[j] = vts[channel][i].reshape(kh, kw)
        multipliers[channel] += 1
    dropped = np.ones(values.size, dtype=bool)
    dropped[order[:n_keep]] = False
    return {
        "multipliers": multipliers,
        "pointwise": pointwise,
        "depthwise": depthwise,
        "error": float(values[dropped].sum()),
    }


def original_fit_torch(W, solver: str, beta: float = 0.0, n_kernels: int = 0) -> dict:
    """The original implementation's code path, in torch as it was written.

    Per-channel ``torch.svd`` in a Python loop, the LEGO budget loop over 0-d tensors, a
    dense ``(G, C*K2)`` depthwise matrix and the pointwise matrix filled kernel by kernel.
    """
    import torch

    m = W.shape[0]
    k2 = W.shape[2] * W.shape[3]
    flat = torch.from_numpy(W).reshape(m, -1)
    n = flat.shape[1]
    us, ss, vs = [], [], []
    for block in torch.split(flat.clone(), k2, dim=1):
        u, s, v = torch.svd(block)
        us.append(u)
        ss.append(s)
        vs.append(v)
    singular = torch.stack(ss, dim=0)
    rank = singular.shape[1]
    values = (singular**2).reshape(-1)
    sorted_values, order = torch.sort(values, descending=True)
    if solver == "lego":
        n_keep, spent = values.numel(), 0.0
        for _ in range(values.numel()):
            if spent + sorted_values[n_keep - 1] > beta:
                break
            spent += sorted_values[n_keep - 1]
            n_keep -= 1
    else:
        n_keep = min(n_kernels, int(torch.count_nonzero(values)))
    kept = sorted(((i // rank, i % rank) for i in order[:n_keep].tolist()), key=lambda t: t[0])
    multipliers = torch.zeros(len(ss), dtype=torch.long)
    for channel, _ in kept:
        multipliers[channel] += 1
    depthwise = torch.zeros(n_keep, n)
    pointwise = torch.zeros(m, n_keep)
    for j, (channel, i) in enumerate(kept):
        pointwise[:, j] = us[channel][:, i] * ss[channel][i]
        depthwise[j, channel * k2 : (channel + 1) * k2] = vs[channel][:, i]
    return {"multipliers": multipliers, "pointwise": pointwise, "depthwise": depthwise}


def ours_fit(W: np.ndarray, solver: str, **budget) -> GDWSApproximator:
    return GDWSApproximator(solver=solver, **budget).fit(W)


def check_agreement(weights: list[np.ndarray]) -> None:
    """Both sides: identical multipliers, errors within 1e-6 relative."""
    for index, W in enumerate(weights):
        for solver, budget in layer_budgets(W).items():
            ref = reference_fit(W, solver, **budget)
            ours = ours_fit(W, solver, **budget)
            if not np.array_equal(ref["multipliers"], ours.multipliers_):
                sys.exit(f"layer {index} {solver}: multipliers differ from the reference")
            if abs(ref["error"] - ours.error_) > 1e-6 * max(ref["error"], 1e-30):
                sys.exit(
                    f"layer {index} {solver}: error {ours.error_!r} vs reference {ref['error']!r}"
                )


def time_once(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


SIDES = {
    "original (torch)": original_fit_torch,
    "reference (numpy)": reference_fit,
    "gdws_approx": lambda W, solver, **budget: ours_fit(W, solver, **budget),
}
SOLVERS = ("lego", "mego")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per side")
    parser.add_argument("--out", type=Path, default=Path("gdws-results/fit_speed.json"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")

    weights = network_weights()
    budgets = [layer_budgets(W) for W in weights]
    n_weights = sum(W.size for W in weights)
    print(f"PreActResNet-18 3x3 layers: {len(weights)} layers, {n_weights / 1e6:.2f} M float32")
    check_agreement(weights)
    print("agreement: identical multipliers and errors (1e-6 relative) on every layer")

    def fit_network(side: str, solver: str) -> None:
        for W, budget in zip(weights, budgets, strict=True):
            SIDES[side](W, solver, **budget[solver])

    for side in SIDES:  # warm-up
        fit_network(side, "lego")
    times = {(side, solver): [] for side in SIDES for solver in SOLVERS}
    for round_index in range(args.repeats):
        order = list(SIDES) if round_index % 2 == 0 else list(reversed(SIDES))
        for solver in SOLVERS:
            for side in order:
                times[(side, solver)].append(time_once(fit_network, side, solver))

    median = {key: statistics.median(value) for key, value in times.items()}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\nmedian of {args.repeats} interleaved rounds ({cores} cores, {platform.machine()})")
    print(f"{'solver':<8}" + "".join(f"{side:>22}" for side in SIDES))
    for solver in SOLVERS:
        ours = median[("gdws_approx", solver)]
        cells = [
            f"{median[(s, solver)] * 1e3:.1f} ms ({median[(s, solver)] / ours:.1f}x)" for s in SIDES
        ]
        print(f"{solver:<8}" + "".join(f"{cell:>22}" for cell in cells))
    print("(in brackets: time over gdws_approx's)")
    total = {side: sum(median[(side, solver)] for solver in SOLVERS) for side in SIDES}
    result = {
        "layers": len(weights),
        "weights": n_weights,
        "repeats": args.repeats,
        "cores": cores,
        "median_seconds": {f"{side}/{solver}": value for (side, solver), value in median.items()},
        "ratio_vs_original_torch": total["original (torch)"] / total["gdws_approx"],
        "ratio_vs_numpy_reference": total["reference (numpy)"] / total["gdws_approx"],
    }
    write_json_atomic(args.out, result)
    print(f"\nJSON: {args.out}")
    print(
        f"the same algorithm as the original in NumPy: {result['ratio_vs_numpy_reference']:.1f}x "
        "slower than gdws_approx"
    )
    print(
        f"RESULT fit_speed: {result['ratio_vs_original_torch']:.1f}x "
        "(gdws_approx vs the original's per-channel torch.svd loop, LEGO+MEGO)"
    )


if __name__ == "__main__":
    main()
