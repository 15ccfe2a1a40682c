"""Layer forms at equal MACs: GDWS, low-rank, and GDWS with a low-rank pointwise.

Does GDWS with a low-rank pointwise (``1 x 1`` convs ``G -> R -> M``,
``G K2 + G R + R M`` MACs per output pixel) pay? The latency planner offers it only when
asked (``Latency(forms=(..., "gdws_lowrank"))``) until this bench shows where it is faster
than the forms it competes with at the same MACs.

For each layer shape (the four 3x3 layers of PreActResNet-18, 64 channels at 32x32 to 512
at 4x4, and the demo network's 16 -> 32 and 32 -> 64 layers at 16x16 and 8x8), each MAC
budget (a half and a third of the dense conv's), each backend (eager, ONNX Runtime and
OpenVINO where installed) and batch size (1 and 32), these forms with random weights are
timed interleaved in one process (:func:`gdws_torch.cost.throughput.measure_throughput`,
medians of ``--rounds``), each at the largest size within the budget:

- ``gdws``: GDWS (channel gather, depthwise conv, ``1 x 1`` conv), ``G (K2 + M)``;
- ``lowrank``: ``Kh x Kw`` conv ``C -> R``, ``1 x 1`` conv ``R -> M``, ``R (C K2 + M)``;
- ``gdws_lowrank``: GDWS with a rank-``M/4`` pointwise, ``G K2 + G R + R M``;
- ``dense`` and ``dws`` (one kernel per channel, ``C (K2 + M)``) for reference.

Printed: per layer, backend, batch size and budget the milliseconds of each form and their
MACs; the last line, ``RESULT gdws_lowrank: <ratio>x (...)``, is the median over every
case of GDWS time over GDWS-with-low-rank-pointwise time at equal MACs (above 1: the
low-rank pointwise is faster), with how often it was also faster than low-rank.
Run: ``python bench/lowrank_forms.py [--rounds N] [--threads N] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
from torch import nn

from gdws_approx import cost
from gdws_approx.files import write_json_atomic
from gdws_torch import GDWSConv2d, LowRankConv2d
from gdws_torch.cost.throughput import available_backends, measure_throughput

# (in channels, out channels, input side)
LAYERS = ((64, 64, 32), (128, 128, 16), (256, 256, 8), (512, 512, 4), (16, 32, 16), (32, 64, 8))
BUDGETS = (2, 3)  # the dense conv's MACs divided by these
FORMS_TIMED = ("dense", "dws", "gdws", "lowrank", "gdws_lowrank")


def sizes(c: int, m: int, k2: int, budget: int) -> dict[str, tuple[int, ...]]:
    """Each form's largest size within ``budget`` MACs per output pixel."""
    g = budget // (k2 + m)
    r = budget // (c * k2 + m)
    r_lr = max(1, m // 4)
    g_lr = (budget - r_lr * m) // (k2 + r_lr)
    return {"gdws": (g,), "lowrank": (r,), "gdws_lowrank": (g_lr, r_lr)}


def forms(c: int, m: int, divisor: int) -> dict[str, nn.Module]:
    """The dense conv, DWS and the three forms at ``dense / divisor`` MACs."""
    torch.manual_seed(0)
    conv = nn.Conv2d(c, m, 3, padding=1).eval()
    budget = cost.dense_macs(m, c, 9) // divisor
    size = sizes(c, m, 9, budget)
    (g,), (r,), (g_lr, r_lr) = size["gdws"], size["lowrank"], size["gdws_lowrank"]
    models: dict[str, nn.Module] = {"dense": conv}
    models["dws"] = GDWSConv2d.from_factors(
        conv, torch.randn(c, 3, 3), torch.arange(c), torch.randn(m, c)
    )
    models["gdws"] = GDWSConv2d.from_factors(
        conv, torch.randn(g, 3, 3), _spread(c, g), torch.randn(m, g)
    )
    models["lowrank"] = LowRankConv2d.from_factors(conv, torch.randn(r, c * 9), torch.randn(m, r))
    models["gdws_lowrank"] = LowRankConv2d.from_gdws_factors(
        conv,
        torch.randn(g_lr, 3, 3),
        _spread(c, g_lr),
        torch.randn(r_lr, g_lr),
        torch.randn(m, r_lr),
    )
    return {name: model.eval() for name, model in models.items()}


def _spread(c: int, g: int) -> torch.Tensor:
    """``g`` kernels spread evenly over ``c`` channels, out of channel order (a gather)."""
    channels = torch.arange(g) % c
    return channels[torch.randperm(g)] if g > 1 else channels


def macs_of(model: nn.Module, c: int, m: int) -> int:
    if isinstance(model, GDWSConv2d):
        return model.gdws_macs
    if isinstance(model, LowRankConv2d):
        return model.macs
    return cost.dense_macs(m, c, 9)


def time_case(c, m, side, divisor, backend, batch_size, rounds) -> dict:
    """One row: each form's milliseconds and MACs per output pixel."""
    models = forms(c, m, divisor)
    timed = measure_throughput(
        models, (c, side, side), backends=(backend,), batch_sizes=(batch_size,), rounds=rounds
    )
    ms = {row["model"]: row["latency_ms"] for row in timed}
    cells = " ".join(f"{k}={v:.3f}" for k, v in ms.items())
    print(f"{c}->{m} {side}x{side} 1/{divisor} MACs {backend:<11} b{batch_size}: {cells}")
    return {
        "layer": [c, m, side],
        "budget": f"1/{divisor}",
        "backend": backend,
        "batch_size": batch_size,
        "ms": ms,
        "macs_per_pixel": {name: macs_of(model, c, m) for name, model in models.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="also save the rows as JSON")
    parser.add_argument("--quick", action="store_true", help="two small layers, eager only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [b for b in ("eager", "onnxruntime", "openvino") if b in available_backends()]
    layers, batch_sizes = LAYERS, (1, 32)
    if args.quick:
        backends, layers, batch_sizes = ["eager"], LAYERS[4:], (1,)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backends {backends}")
    rows = [
        time_case(c, m, side, divisor, backend, batch_size, args.rounds)
        for (c, m, side), divisor, backend, batch_size in itertools.product(
            layers, BUDGETS, backends, batch_sizes
        )
    ]
    ratios = [row["ms"]["gdws"] / row["ms"]["gdws_lowrank"] for row in rows]
    beats_both = sum(
        row["ms"]["gdws_lowrank"] < min(row["ms"]["gdws"], row["ms"]["lowrank"]) for row in rows
    )
    ratio = statistics.median(ratios)
    if args.out:
        write_json_atomic(args.out, {"rows": rows, "median_gdws_over_gdws_lowrank": ratio})
    print(
        f"RESULT gdws_lowrank: {ratio:.2f}x (GDWS vs GDWS with a low-rank pointwise at equal "
        f"MACs, median of {len(ratios)}; faster than both GDWS and low-rank in {beats_both})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
