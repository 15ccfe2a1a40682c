"""Frames per second of several models, timed interleaved so machine noise hits all alike."""

from __future__ import annotations

import numbers
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["measure_fps"]


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


def measure_fps(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    rounds: int = 15,
    calls_per_round: int = 10,
    warmup: int = 5,
    device: Any = "cpu",
) -> dict[str, dict[str, float]]:
    """Median frames per second of each model on random inputs, in eval mode, no autograd.

    Each round times ``calls_per_round`` forward passes of every model in turn (the order
    rotating between rounds), so that load from other processes affects every model
    alike; the figure is the median over rounds.

    Parameters
    ----------
    models : mapping of str to torch.nn.Module
        Their train/eval modes are restored afterwards.
    input_shape : sequence of int
        One sample's shape, e.g. ``(3, 32, 32)``.
    batch_size : int, default=1
        1 measures latency-bound FPS, larger values throughput.
    rounds, calls_per_round, warmup : int
    device : default="cpu"
        On CUDA the device is synchronised around every timed block.

    Returns
    -------
    dict
        ``{name: {"fps": median, "fps_q1": ..., "fps_q3": ..., "latency_ms": median per
        batch}}``.
    """
    if not models:
        raise ValueError("models must name at least one model.")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive sizes; got {tuple(input_shape)!r}.")
    batch_size = _check_count(batch_size, "batch_size")
    rounds = _check_count(rounds, "rounds")
    calls_per_round = _check_count(calls_per_round, "calls_per_round")
    device = torch.device(device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.rand((batch_size, *shape), device=device)
    names = list(models)
    modes = {name: models[name].training for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        with torch.inference_mode():
            for name in names:
                models[name].eval()
                for _ in range(warmup):
                    models[name](x)
            for r in range(rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    synchronize()
                    start = time.perf_counter()
                    for _ in range(calls_per_round):
                        models[name](x)
                    synchronize()
                    times[name].append((time.perf_counter() - start) / calls_per_round)
    finally:
        for name in names:
            models[name].train(modes[name])
    out = {}
    for name in names:
        fps = sorted(batch_size / t for t in times[name])
        q1, _, q3 = statistics.quantiles(fps, n=4) if len(fps) > 1 else (fps[0],) * 3
        out[name] = {
            "fps": statistics.median(fps),
            "fps_q1": q1,
            "fps_q3": q3,
            "latency_ms": 1000 * statistics.median(times[name]),
        }
    return out
