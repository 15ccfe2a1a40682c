"""gdws-approx: optimal generalized depthwise-separable approximation of convolutions.

The core is array-API generic (NumPy by default; CuPy, torch, JAX, array-api-strict
arrays work unchanged) and never imports a deep-learning framework.
"""

from gdws_approx.cost import (
    break_even_kernels,
    dense_macs,
    gdws_lowrank_macs,
    gdws_macs,
    lowrank_macs,
    mac_reduction,
)
from gdws_approx.estimator import GDWSApproximator
from gdws_approx.factors import (
    KernelLayout,
    kernel_layout,
    pad_kernels,
    project,
    reconstruct,
    uniform_multiplier,
)
from gdws_approx.knapsack import choose_options
from gdws_approx.latency_planning import LayerLatency, plan_latency
from gdws_approx.planning import LatencyPlan, LayerPlan, LayerSpec, NetworkPlan, plan_network
from gdws_approx.response import ResponseErrors, reduced_rank_fit, response_error
from gdws_approx.selection import (
    channel_errors,
    keep_order,
    lego_breakpoints,
    lego_multipliers,
    mego_multipliers,
)
from gdws_approx.spectra import ChannelSpectra, channel_spectra

__version__ = "0.2.0"

__all__ = [
    "ChannelSpectra",
    "GDWSApproximator",
    "KernelLayout",
    "LatencyPlan",
    "LayerLatency",
    "LayerPlan",
    "LayerSpec",
    "NetworkPlan",
    "ResponseErrors",
    "__version__",
    "break_even_kernels",
    "channel_errors",
    "channel_spectra",
    "choose_options",
    "dense_macs",
    "gdws_lowrank_macs",
    "gdws_macs",
    "keep_order",
    "kernel_layout",
    "lego_breakpoints",
    "lego_multipliers",
    "lowrank_macs",
    "mac_reduction",
    "mego_multipliers",
    "pad_kernels",
    "plan_latency",
    "plan_network",
    "project",
    "reconstruct",
    "reduced_rank_fit",
    "response_error",
    "uniform_multiplier",
]
