"""Frames per second of models on a backend, timed interleaved so machine noise hits all alike.

Backends:

- ``"eager"``: the model as it is, under ``torch.inference_mode``;
- ``"channels_last"``: a copy in ``torch.channels_last`` memory format, inputs too;
- ``"onnxruntime"``: the model exported to ONNX (in memory, GDWS layers padded to ``G`` a
  multiple of 4, see :func:`gdws_torch.pad_kernels`) and run by ONNX Runtime with as many
  intra-op threads as torch uses (CUDA execution provider when ``device`` is CUDA and it
  is available, else CPU);
- ``"openvino"``: the same ONNX export (GDWS layers padded alike), compiled by OpenVINO for
  the CPU with as many inference threads as torch uses, the latency hint and float32
  precision (CPU only; one compiled model per batch size, static shapes).

On CUDA, torch backends synchronise the device around every timed block.
"""

from __future__ import annotations

import copy
import io
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gdws_approx.checks import check_integer

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_available",
    "make_runner",
    "measure_fps",
    "measure_throughput",
]

BACKENDS = ("eager", "channels_last", "onnxruntime", "openvino", "tensorrt")


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a sequence of sizes; got {input_shape!r}.") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive sizes; got {tuple(input_shape)!r}.")
    return shape


def available_backends(device: Any = "cpu") -> tuple[str, ...]:
    """The backends of :data:`BACKENDS` that can run here (:func:`backend_available`).

    ONNX Runtime if installed; OpenVINO if installed and ``device`` is the CPU; TensorRT
    (ONNX Runtime's TensorRT execution provider) if ``device`` is a CUDA GPU and the
    installed ONNX Runtime has that provider (``onnxruntime-gpu`` with TensorRT). Every
    installed runtime is imported: to ask about one, use :func:`backend_available`.
    """
    return tuple(backend for backend in BACKENDS if backend_available(backend, device))


def backend_available(backend: str, device: Any = "cpu") -> bool:
    """Whether ``backend`` can run on ``device`` here; only that backend's runtime is
    imported (ONNX Runtime and OpenVINO write telemetry files when imported)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    device = torch.device(device)
    if backend in ("eager", "channels_last"):
        return True
    if backend == "openvino":
        if device.type != "cpu":
            return False
        try:
            import openvino  # noqa: F401
        except ImportError:
            return False
        return True
    try:
        import onnxruntime
    except ImportError:
        return False
    if backend == "tensorrt":
        providers = onnxruntime.get_available_providers()
        return device.type == "cuda" and "TensorrtExecutionProvider" in providers
    return True


def _onnx_bytes(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> bytes:
    """``model`` exported to ONNX, input ``"input"`` and output ``"output"``, axis 0 dynamic."""
    buffer = io.BytesIO()
    example = torch.rand((1, *input_shape), device=device)
    # The legacy TorchScript exporter (the dynamo one needs onnxscript); its deprecation
    # notice and constant-folding remarks are not the user's concern here.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    return buffer.getvalue()


def _onnx_session(
    model: nn.Module, input_shape: tuple[int, ...], device: torch.device, tensorrt: bool = False
):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle ONNX Runtime threads spin by default; beside torch's threads in one process
    # (timed interleaved) that steals the cores torch is timed on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    if tensorrt:
        # FP32 as the other backends compute; an engine per input shape is built at the
        # first run (the untimed warm-up calls), cached in memory for the session.
        providers.insert(0, ("TensorrtExecutionProvider", {"trt_fp16_enable": False}))
    return ort.InferenceSession(
        _onnx_bytes(model, input_shape, device), options, providers=providers
    )


def _openvino_runner(model: nn.Module, input_shape: tuple[int, ...]):
    """``runner(batch_size) -> run()`` for ``model`` compiled by OpenVINO for the CPU."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    core = ov.Core()
    onnx = _onnx_bytes(model, input_shape, torch.device("cpu"))
    config = dict(
        [
            props.inference_num_threads(torch.get_num_threads()),
            hints.performance_mode(hints.PerformanceMode.LATENCY),
            # The CPU plugin otherwise computes in bfloat16 where the CPU has it (AMX,
            # AVX512 BF16): other figures than torch's, other work than other backends do.
            hints.inference_precision(ov.Type.f32),
        ]
    )

    def runner(batch_size: int) -> Callable[[], Any]:
        # A static batch size: the CPU plugin's fastest path, as a deployment would run it.
        network = core.read_model(model=onnx, weights=b"")
        network.reshape([batch_size, *input_shape])
        request = core.compile_model(network, "CPU", config).create_infer_request()
        x = torch.rand((batch_size, *input_shape)).numpy()
        return lambda: request.infer({0: x}, share_inputs=True)

    return runner


def make_runner(
    model: nn.Module, backend: str, input_shape: Sequence[int], device: Any = "cpu"
) -> Callable[[int], Callable[[], Any]]:
    """``runner(batch_size) -> run()``: a no-argument call running one batch on ``backend``.

    ``model`` is not modified (backends that change it work on a copy, in eval mode).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    shape = _check_shape(input_shape)
    device = torch.device(device)
    if backend == "openvino":
        if device.type != "cpu":
            raise ValueError(f"the openvino backend runs on the CPU only; got device {device}.")
        from gdws_torch.nn.module_tree import pad_kernels

        # Padded as for ONNX Runtime: the outputs are the same.
        return _openvino_runner(pad_kernels(copy.deepcopy(model).eval(), 4), shape)
    if backend == "tensorrt" and not backend_available(backend, device):
        raise ValueError(
            f"the tensorrt backend needs a CUDA device and onnxruntime-gpu with the TensorRT "
            f"execution provider; got device {device}."
        )
    if backend in ("onnxruntime", "tensorrt"):
        from gdws_torch.nn.module_tree import pad_kernels

        # G a multiple of 4: ONNX Runtime's CPU convolutions run 2.2-2.4x faster so.
        padded = pad_kernels(copy.deepcopy(model).eval(), 4)
        session = _onnx_session(padded, shape, device, tensorrt=backend == "tensorrt")

        def onnx_runner(batch_size: int) -> Callable[[], Any]:
            x = torch.rand((batch_size, *shape)).numpy()
            return lambda: session.run(None, {"input": x})

        return onnx_runner
    target = copy.deepcopy(model).eval().to(device)
    layout = torch.channels_last if backend == "channels_last" else torch.contiguous_format
    if backend == "channels_last":
        target = target.to(memory_format=torch.channels_last)

    def torch_runner(batch_size: int) -> Callable[[], Any]:
        x = torch.rand((batch_size, *shape), device=device).contiguous(memory_format=layout)

        def run() -> Any:
            with torch.inference_mode():
                return target(x)

        return run

    return torch_runner


def measure_throughput(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    backends: Sequence[str] = ("eager",),
    batch_sizes: Sequence[int] = (1,),
    rounds: int = 15,
    min_round_seconds: float = 0.02,
    warmup: int = 5,
    device: Any = "cpu",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Median frames per second of every model on every backend and batch size.

    For each batch size, every (model, backend) pair runs ``rounds`` timed blocks, the
    pairs taking turns in an order that rotates between rounds, so that load from other
    processes affects all alike. A block repeats the call until it lasts at least
    ``min_round_seconds``; the figure is the median over blocks.

    Parameters
    ----------
    models : mapping of str to torch.nn.Module
        Not modified.
    input_shape : sequence of int
        One sample's shape, e.g. ``(3, 32, 32)``.
    backends : sequence of str
        From :data:`BACKENDS`.
    batch_sizes : sequence of int
        1 measures latency-bound FPS, larger values throughput.
    rounds, min_round_seconds, warmup
        Timed blocks per pair, the least length of a block, untimed calls first.
    device : default="cpu"
    progress : bool, default=False

    Returns
    -------
    list of dict
        One row per (model, backend, batch size): ``fps`` (median over blocks),
        ``fps_q1``, ``fps_q3`` (quartiles), ``latency_ms`` (``batch_size / fps``),
        ``round_ms`` (each round's latency, in round order: the models of one round ran
        back to back, so per-round ratios pair like with like), ``threads``, ``device``.
    """
    if not models:
        raise ValueError("models must name at least one model.")
    shape = _check_shape(input_shape)
    rounds = check_integer(rounds, "rounds", minimum=1)
    sizes = [check_integer(b, f"batch_sizes[{i}]", minimum=1) for i, b in enumerate(batch_sizes)]
    check_integer(warmup, "warmup", minimum=0)
    if not sizes:
        raise ValueError("batch_sizes must hold at least one batch size.")
    backends = list(backends)
    for backend in backends:
        if backend not in BACKENDS:
            raise ValueError(f"backends must be from {BACKENDS}; got {backend!r}.")
    device = torch.device(device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runners = {
        (name, backend): make_runner(model, backend, shape, device)
        for name, model in models.items()
        for backend in backends
    }
    from tqdm.auto import tqdm

    bar = tqdm(total=len(sizes) * rounds, desc="timing", unit="round", disable=not progress)
    rows = []
    try:
        for batch_size in sizes:
            calls = {key: runner(batch_size) for key, runner in runners.items()}
            repeats = {}
            for key, call in calls.items():  # warm up, and size the timed blocks
                for _ in range(warmup):
                    call()
                synchronize()
                start = time.perf_counter()
                call()
                synchronize()
                once = max(time.perf_counter() - start, 1e-6)
                repeats[key] = max(1, int(min_round_seconds / once))
            times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
            keys = list(calls)
            for r in range(rounds):
                for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                    call, n = calls[key], repeats[key]
                    synchronize()
                    start = time.perf_counter()
                    for _ in range(n):
                        call()
                    synchronize()
                    times[key].append((time.perf_counter() - start) / n)
                bar.update()
            for (name, backend), seconds in times.items():
                fps = sorted(batch_size / t for t in seconds)
                # "inclusive" quartiles stay within the data, even for two rounds.
                q1 = q3 = fps[0]
                if len(fps) > 1:
                    q1, _, q3 = statistics.quantiles(fps, n=4, method="inclusive")
                median = statistics.median(fps)
                rows.append(
                    {
                        "model": name,
                        "backend": backend,
                        "batch_size": batch_size,
                        "fps": median,
                        "fps_q1": q1,
                        "fps_q3": q3,
                        "latency_ms": 1000 * batch_size / median,
                        "round_ms": [1000 * t for t in seconds],
                        "threads": torch.get_num_threads(),
                        "device": str(device),
                    }
                )
    finally:
        bar.close()
    return rows


def measure_fps(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    rounds: int = 15,
    warmup: int = 5,
    device: Any = "cpu",
) -> dict[str, dict[str, float]]:
    """Eager-mode FPS of each model: ``{name: {"fps", "fps_q1", "fps_q3", "latency_ms"}}``.

    A shortcut for :func:`measure_throughput` with one backend and one batch size.
    """
    batch_size = check_integer(batch_size, "batch_size", minimum=1)
    rows = measure_throughput(
        models,
        input_shape,
        batch_sizes=(batch_size,),
        rounds=rounds,
        warmup=warmup,
        device=device,
    )
    keys = ("fps", "fps_q1", "fps_q3", "latency_ms")
    return {row["model"]: {k: row[k] for k in keys} for row in rows}
