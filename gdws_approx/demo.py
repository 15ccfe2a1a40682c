"""The core demo: LEGO and MEGO on one convolution weight, as a table and a JSON file.

Run ``python -m gdws_approx.demo`` (``make demo``). By default the weight is a synthetic
256 x 128 x 3 x 3 layer whose per-channel spectra decay the way trained filters' do;
``--weight my_layer.npy`` runs it on your own ``(M, C, Kh, Kw)`` weight instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from gdws_approx import GDWSApproximator, break_even_kernels
from gdws_approx.files import write_json_atomic

LEGO_ENERGY_FRACTIONS = (0.0, 0.001, 0.01, 0.03, 0.1, 0.2, 0.4)
MEGO_KERNELS_PER_CHANNEL = (9, 6, 4, 3, 2, 1)


def synthetic_weight(
    n_out: int = 256, n_in: int = 128, kernel: int = 3, decay: float = 0.55, seed: int = 0
) -> np.ndarray:
    """A float32 conv weight whose channel slices have geometrically decaying spectra.

    Slice ``c`` is ``U_c diag(s_c) V_c^T`` with random orthonormal ``U_c, V_c`` and
    ``s_{c,i} = scale_c * decay**i`` (``scale_c`` log-normal across channels): trained
    3x3 filters concentrate their energy in a few directions in the same way.
    """
    rng = np.random.default_rng(seed)
    k2 = kernel * kernel
    rank = min(n_out, k2)
    W = np.empty((n_out, n_in, k2))
    for c in range(n_in):
        left, _ = np.linalg.qr(rng.standard_normal((n_out, rank)))
        right, _ = np.linalg.qr(rng.standard_normal((k2, rank)))
        spectrum = rng.lognormal(0.0, 0.5) * decay ** np.arange(rank)
        W[:, c] = (left * spectrum) @ right.T
    W *= np.sqrt(2.0 / (n_in * k2)) / W.std()
    return W.reshape(n_out, n_in, kernel, kernel).astype(np.float32)


def load_weight(path: Path) -> np.ndarray:
    """A ``.npy`` weight, loaded without unpickling (``allow_pickle=False``)."""
    if not path.is_file():
        raise ValueError(f"--weight: no file at {path}")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"--weight: {path} is not a plain .npy array ({exc})") from None


def sweep(W: np.ndarray) -> list[dict]:
    """Fit LEGO over error budgets and MEGO over kernel budgets; one row per fit."""
    energy = float(np.sum(W.astype(np.float64) ** 2))
    n_out, n_in, kh, kw = W.shape
    break_even = break_even_kernels(n_out, n_in, kh * kw)
    rows = []
    fits = [
        ("lego", {"beta": f * energy}, f"beta = {f:.1%} of ||W||^2") for f in LEGO_ENERGY_FRACTIONS
    ]
    fits += [
        ("mego", {"n_kernels": k * n_in}, f"gamma = {k} x C = {k * n_in}")
        for k in MEGO_KERNELS_PER_CHANNEL
    ]
    for solver, budget, label in fits:
        est = GDWSApproximator(solver=solver, **budget).fit(W)
        rows.append(
            {
                "solver": solver,
                "budget": label,
                **budget,
                "G": est.n_kernels_,
                "max_multiplier": int(est.multipliers_.max()),
                "error": est.error_,
                "relative_error": est.error_ / energy,
                "dense_macs_per_pixel": est.dense_macs_,
                "gdws_macs_per_pixel": est.gdws_macs_,
                "mac_reduction": est.mac_reduction_,
                "cheaper_than_dense": est.n_kernels_ <= break_even,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'solver':<6} {'budget':<28} {'G':>6} {'max g':>6} {'rel. error':>11} {'MACs':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        reduction = f"{row['mac_reduction']:.2f}x"
        if not row["cheaper_than_dense"]:
            reduction += "*"
        lines.append(
            f"{row['solver']:<6} {row['budget']:<28} {row['G']:>6} {row['max_multiplier']:>6} "
            f"{row['relative_error']:>11.2e} {reduction:>9}"
        )
    lines.append(
        "MACs: dense / GDWS per output pixel; * = GDWS not cheaper, a converter keeps dense"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gdws_approx.demo", description=__doc__)
    parser.add_argument("--weight", type=Path, help="a .npy conv weight (M, C, Kh, Kw)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weight")
    parser.add_argument(
        "--out", type=Path, default=Path("gdws-results/demo.json"), help="JSON results file"
    )
    args = parser.parse_args(argv)
    try:
        W = load_weight(args.weight) if args.weight else synthetic_weight(seed=args.seed)
        if W.ndim != 4:
            raise ValueError(f"--weight must hold a 4-D array (M, C, Kh, Kw); got {W.shape}")
        if args.weight and args.out.resolve() == args.weight.resolve():
            raise ValueError(f"--out {args.out} would overwrite the input weight")
        source = str(args.weight) if args.weight else f"synthetic (seed {args.seed})"
        print(f"weight: {source}, shape {tuple(W.shape)}, {W.dtype}")
        rows = sweep(W)
        print(format_table(rows))
        write_json_atomic(args.out, {"weight": source, "shape": list(W.shape), "rows": rows})
    except (ValueError, TypeError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
