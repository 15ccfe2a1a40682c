"""GDWS forms per layer and backend: channel gather + depthwise conv vs one grouped conv.

A GDWS layer with ``m`` kernels per input channel runs either as a channel gather, a
depthwise conv with ``G = C*m`` channels and a ``1 x 1`` conv (any allocation runs so), or,
with every channel at the same multiplier in channel order, as one grouped conv over the
input (``groups=C``, ``C*m`` outputs) and the ``1 x 1`` conv: no gather
(``GDWSConv2d.uniform()``, ``grouped=True``). ``m = 1`` in channel order is the ordinary
depthwise-separable layer, which never gathers.

For the four 3x3 layer shapes of PreActResNet-18 (64 channels at 32x32 to 512 at 4x4),
each backend (eager, ONNX Runtime and OpenVINO where installed) and batch size (1 and 32),
every form at ``m = 1..4`` and the dense conv are timed interleaved in one process
(:func:`gdws_torch.cost.throughput.measure_throughput`, medians of ``--rounds``). The gathering
layer's kernels are out of channel order, so that it does gather at ``m = 1`` too.

Printed: per layer, backend and batch size the milliseconds of each form; the last line,
``RESULT forms: <ratio>x (gather vs grouped, ...)``, is the median over every layer,
backend, batch size and ``m = 2..4`` of gather-form time over grouped-form time (above 1:
the grouped form is faster), with how often the grouped form was faster.
Run: ``python bench/forms.py [--rounds N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from gdws_torch import GDWSConv2d
from gdws_torch.cost.throughput import available_backends, measure_throughput

LAYERS = ((64, 32), (128, 16), (256, 8), (512, 4))  # (channels, input side)
MULTIPLIERS = (1, 2, 3, 4)


def forms(channels: int) -> dict[str, nn.Module]:
    """The dense conv, and the gathering and grouped GDWS forms at each multiplier."""
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1).eval()
    models: dict[str, nn.Module] = {"dense": conv}
    for m in MULTIPLIERS:
        ordered = torch.arange(channels).repeat_interleave(m)
        shuffled = ordered[torch.randperm(ordered.numel())]
        gather = GDWSConv2d.from_factors(
            conv, torch.randn(channels * m, 3, 3), shuffled, torch.randn(channels, channels * m)
        ).eval()
        assert gather.gathers
        grouped = gather.uniform()
        assert not grouped.gathers and grouped.n_kernels == channels * m
        models[f"gather x{m}"] = gather
        models[f"grouped x{m}"] = grouped
    return models


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [b for b in ("eager", "onnxruntime", "openvino") if b in available_backends()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backends {backends}")
    ratios = []
    for channels, side in LAYERS:
        models = forms(channels)
        for backend in backends:
            for batch_size in (1, 32):
                rows = measure_throughput(
                    models,
                    (channels, side, side),
                    backends=(backend,),
                    batch_sizes=(batch_size,),
                    rounds=args.rounds,
                )
                ms = {row["model"]: row["latency_ms"] for row in rows}
                cells = " ".join(f"{name}={value:.3f}" for name, value in ms.items())
                print(f"{channels}ch {side}x{side} {backend:<11} batch {batch_size:>2}: {cells}")
                ratios += [ms[f"gather x{m}"] / ms[f"grouped x{m}"] for m in MULTIPLIERS[1:]]
    wins = sum(r > 1 for r in ratios)
    print(
        f"RESULT forms: {statistics.median(ratios):.2f}x (gather vs grouped at m = 2..4, "
        f"median of {len(ratios)}; grouped faster in {wins})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
