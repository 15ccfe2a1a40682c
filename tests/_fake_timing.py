"""Stand-ins for the timers, for tests of what is done with timings (files, plans, exit
codes), not of the timings themselves: deterministic and instant.

Every layer runs 1 ms dense, 0.2 ms as GDWS at one kernel per channel rising to 0.8 ms
at the top of its grid, 0.25 ms per channel multiplier grouped; a whole network 5 ms
dense; a speed-up, once measured, is ``speedup`` with spread ``spread``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

from gdws_approx import LayerLatency
from gdws_torch.conversion import speed_target
from gdws_torch.cost import latency_tables

NETWORK_MS = 5.0


def fake_measure_layer(conv, input_shape, *, backend="eager", **_) -> LayerLatency:
    grid = latency_tables.kernel_grid(conv, latency_tables.PREFERRED_MULTIPLE[backend])
    low, span = grid[0], max(grid[-1] - grid[0], 1)
    multipliers = latency_tables.multiplier_grid(conv)
    return LayerLatency(
        1.0,
        tuple(grid),
        tuple(0.2 + 0.6 * (g - low) / span for g in grid),
        tuple(multipliers),
        tuple(0.25 * m for m in multipliers),
    )


def fake_network_rows(models, input_shape, *, backends=("eager",), batch_sizes=(1,), **_):
    return [
        {"model": name, "backend": backends[0], "batch_size": batch_sizes[0],
         "latency_ms": NETWORK_MS, "round_ms": [NETWORK_MS] * 3}
        for name in models
    ]  # fmt: skip


@contextlib.contextmanager
def fake_timing(
    speedup: float = 1.5, spread: float = 0.01, calls: list | None = None, network: bool = True
) -> Iterator:
    """Patch the layer and speed-up timers, and with ``network`` the dense network's;
    ``calls`` collects each measured speed-up's call (one per conversion attempt)."""

    def measure_speedup(dense, converted, input_size, **_):
        if calls is not None:
            calls.append(converted)
        return {"dense_ms": 1.0, "gdws_ms": 1 / speedup, "speedup": speedup, "spread": spread}

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(latency_tables, "measure_layer", fake_measure_layer))
        if network:
            stack.enter_context(
                mock.patch.object(latency_tables, "measure_throughput", fake_network_rows)
            )
        stack.enter_context(mock.patch.object(speed_target, "measure_speedup", measure_speedup))
        yield
