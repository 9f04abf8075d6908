"""The runtime backends in one table: which package each needs, which devices it offers, how it makes a runner.

`runner_factory(backend, device, precision_hint)` checks everything up front and returns the `path -> Runner`
callable the `Pipeline` calls per component; `available(backend, device)` gives the same check as a skip reason.
Nothing is imported here: packages are looked up with `importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from diffkiln import engines
from diffkiln.errors import DiffkilnError
from diffkiln.runtime.runners import (
    OPENVINO_PRECISIONS,
    OpenVinoRunner,
    OrtOptions,
    OrtRunner,
    Runner,
    session_from_onnx,
)


def _ort_runner(path: Path, device: str | None, precision_hint: str | None) -> Runner:
    return OrtRunner(partial(session_from_onnx, Path(path), OrtOptions(device=device)))


def _openvino_runner(path: Path, device: str | None, precision_hint: str | None) -> Runner:
    return OpenVinoRunner(Path(path), device=(device or "cpu").upper(), precision_hint=precision_hint or "f32")


def _trt_runner(path: Path, device: str | None, precision_hint: str | None, engines_root: Path | None = None):
    """The component's engine under `engines_root` (default KILN/engines); `path` is KILN/<component>/model.onnx."""
    from diffkiln.runtime.trt_runner import TrtRunner, engine_from_kiln

    path = Path(path)
    return TrtRunner(partial(engine_from_kiln, path.parent.parent, path.parent.name, engines_root))


def _cuda_missing() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    return "--device cuda needs onnxruntime-gpu with a working CUDA (pip install onnxruntime-gpu)"


def _openvino_gpu_missing() -> str | None:
    import openvino as ov

    found = ov.Core().available_devices
    if any(d.startswith("GPU") for d in found):
        return None
    return f"--device gpu needs an OpenVINO GPU device (found: {', '.join(found) or 'none'})"


@dataclass(frozen=True)
class Backend:
    """name: the --backend value; module: the package it imports; extra: the pip extra that installs it."""

    name: str
    module: str
    extra: str
    devices: tuple[str, ...]
    make_runner: Callable[[Path, str | None, str | None], Runner]
    precisions: tuple[str, ...] = ()  # precision hints it accepts; none for ORT (it runs the graph's own dtypes)
    device_checks: tuple[tuple[str, Callable[[], str | None]], ...] = ()  # (device, reason it can't run there)
    requires: Callable[[], str | None] | None = None  # why it cannot run here at all (beyond its module)

    @property
    def install(self) -> str:
        return f"pip install {self.extra}"


BACKENDS = {
    "ort": Backend("ort", "onnxruntime", "diffkiln", ("cpu", "cuda"), _ort_runner, (), (("cuda", _cuda_missing),)),
    "openvino": Backend(
        "openvino",
        "openvino",
        "diffkiln[openvino]",
        ("cpu", "gpu"),
        _openvino_runner,
        OPENVINO_PRECISIONS,
        (("gpu", _openvino_gpu_missing),),
    ),
    "tensorrt": Backend(
        "tensorrt",
        "tensorrt",
        "diffkiln[tensorrt]",
        ("cuda",),
        _trt_runner,
        requires=lambda: engines.trt_missing(run=True),
    ),
}


def _reason(backend: str, device: str | None, precision_hint: str | None) -> str | None:
    spec = BACKENDS.get(backend)
    if spec is None:
        return f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}"
    if device is not None and device not in spec.devices:
        return f"--device {device} is not offered by the {backend} backend (it runs on {', '.join(spec.devices)})"
    if precision_hint is not None and precision_hint not in spec.precisions:
        if not spec.precisions:
            return f"--precision-hint is not used by the {backend} backend (it runs the graph's own precision)"
        return f"--precision-hint for {backend} is one of {', '.join(spec.precisions)}, not {precision_hint!r}"
    if importlib.util.find_spec(spec.module) is None:
        return f"the {backend} backend needs {spec.module}, which is not installed: {spec.install}"
    if spec.requires and (reason := spec.requires()):
        return reason
    for checked, missing in spec.device_checks:
        if device == checked and (reason := missing()):
            return reason
    return None


def available(backend: str, device: str | None = None) -> str | None:
    """None when `backend` can run on `device` here, else the reason it cannot (a benchmark's skip reason)."""
    return _reason(backend, device, None)


def runner_factory(
    backend: str, device: str | None = None, precision_hint: str | None = None, engines_root: Path | None = None
) -> Callable[[Path], Runner]:
    """The `path -> Runner` callable for `Pipeline(kiln_dir, runner_factory=...)`; raises DiffkilnError up front.

    device None: ORT picks CUDA when available, else CPU; OpenVINO uses its CPU. precision_hint (OpenVINO only)
    None means f32: always set, since OpenVINO would otherwise pick bf16 on CPUs that have it. engines_root
    (TensorRT only): where `diffkiln build` wrote the engines, default KILN/engines.
    """
    if engines_root is not None and backend != "tensorrt":
        raise DiffkilnError("--engines is only used by --backend tensorrt")
    if reason := _reason(backend, device, precision_hint):
        raise DiffkilnError(reason)
    extra = {"engines_root": Path(engines_root)} if engines_root is not None else {}
    return partial(BACKENDS[backend].make_runner, device=device, precision_hint=precision_hint, **extra)
