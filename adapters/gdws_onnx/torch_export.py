"""Export a (converted) torch model to ONNX, checked against torch in onnxruntime."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gdws_approx.cost import check_kernel_multiple
from gdws_approx.files import atomic_output
from gdws_onnx.runtime import compare_outputs, run

__all__ = ["export"]

# Relative difference (to the largest output value) above which export refuses the file.
EXPORT_TOLERANCE = 1e-4

# Exporter chatter that says nothing about this model.
_QUIET = (
    r".*legacy TorchScript-based ONNX export.*",
    r".*feature will be removed.*",
    r".*Constant folding - Only steps=1.*",
)


def export(
    torch_model: Any,
    path: str | os.PathLike,
    input_shape: Sequence[int],
    *,
    check: bool = True,
    n_inputs: int = 2,
    seed: int = 0,
    opset_version: int | None = None,
    kernel_multiple: int = 4,
) -> dict[str, Any] | None:
    """Export ``torch_model`` (a converted one too) to ONNX with a dynamic batch axis.

    Uses the legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``; the
    dynamo exporter needs ``onnxscript``), in eval mode (BatchNorm folded into the
    preceding convolutions); the model's train/eval mode is restored. The file is written
    through a temporary file and a rename, only once the check passed.

    Parameters
    ----------
    torch_model : torch.nn.Module
        Its parameters' dtype and device give the input's.
    path : str or path-like
        The ``.onnx`` file to write.
    input_shape : sequence of int
        One sample's shape, no batch dimension (``(3, 32, 32)``).
    check : bool, default=True
        Run the file in onnxruntime on ``n_inputs`` seeded random samples and compare with
        torch: a relative difference (largest absolute difference over the largest output
        value) above 1e-4 is a ``ValueError`` and nothing is written.
    n_inputs : int, default=2
        Batch size of the check (it also exercises the dynamic batch axis).
    seed : int, default=0
    opset_version : int, optional
        The exporter's default when ``None``.
    kernel_multiple : int, default=4
        GDWS layers are exported with ``G`` padded to a multiple of this (zero kernels,
        the same outputs; :func:`gdws_torch.pad_kernels`): ONNX Runtime runs them faster.
        ``torch_model`` itself is not changed. From 1 (as they are) to 64.

    Returns
    -------
    dict or None
        The comparison (as :func:`gdws_onnx.check`'s), ``None`` without ``check``.
    """
    import torch

    if not isinstance(torch_model, torch.nn.Module):
        raise TypeError(f"torch_model must be a torch.nn.Module; got {type(torch_model).__name__}.")
    kernel_multiple = check_kernel_multiple(kernel_multiple)
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be one sample's shape, e.g. (3, 32, 32); got {shape}.")
    parameter = next(torch_model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn((1, *shape), generator=generator, dtype=dtype).to(device)
    path = Path(path)
    modes = [(module, module.training) for module in torch_model.modules()]
    if kernel_multiple > 1:
        from gdws_torch.nn.module_tree import pad_kernels

        torch_model = pad_kernels(copy.deepcopy(torch_model), kernel_multiple)
    torch_model.eval()
    try:
        with atomic_output(path) as tmp:
            with torch.no_grad():
                outputs = _flat_outputs(torch_model(example))
            names = [f"output_{i}" for i in range(len(outputs))] if len(outputs) > 1 else ["output"]
            with warnings.catch_warnings():
                for message in _QUIET:
                    warnings.filterwarnings("ignore", message=message)
                torch.onnx.export(
                    torch_model,
                    (example,),
                    tmp,
                    dynamo=False,
                    input_names=["input"],
                    output_names=names,
                    dynamic_axes={name: {0: "batch"} for name in ["input", *names]},
                    opset_version=opset_version,
                )
            result = None
            if check:
                result = _compare(torch_model, tmp, shape, dtype, device, n_inputs, seed, names)
                if not result["max_rel_diff"] <= EXPORT_TOLERANCE:
                    raise ValueError(
                        f"the ONNX export disagrees with torch: max abs difference "
                        f"{result['max_abs_diff']:.3g}, relative {result['max_rel_diff']:.3g} > "
                        f"{EXPORT_TOLERANCE:g}; {str(path)!r} not written."
                    )
        return result
    finally:
        for module, training in modes:
            module.training = training


def _flat_outputs(out: Any) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    raise TypeError(
        f"export needs a model returning a tensor or a tuple of tensors; got {type(out).__name__}."
    )


def _compare(torch_model, onnx_path, shape, dtype, device, n_inputs, seed, names):
    import onnx
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((n_inputs, *shape), generator=generator, dtype=dtype)
    with torch.no_grad():
        expected = _flat_outputs(torch_model(x.to(device)))
    expected = {n: o.detach().cpu().numpy() for n, o in zip(names, expected, strict=True)}
    got = run(onnx.load_model(onnx_path), {"input": x.numpy()}, "the exported model")
    result = compare_outputs(expected, {n: np.asarray(v) for n, v in got.items()})
    return {"n_inputs": n_inputs, "seed": seed, "inputs": {"input": list(x.shape)}, **result}
