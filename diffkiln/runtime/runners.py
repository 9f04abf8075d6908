"""Backends behind one interface: `infer(feeds) -> outputs`, as polygraphy's runners do.

A runner has one life cycle (activate → infer … → deactivate), is a context manager, and records the wall time
of every inference, so the pipeline's timing table and the benchmarks read the same numbers on every backend.
A runner takes a loader, a zero-argument callable that returns the backend's session (`session_from_onnx`,
`compiled_openvino_model`, bound with `functools.partial`), so building and running stay separate stages.
onnxruntime and openvino are imported inside the loaders only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from diffkiln.errors import DiffkilnError


class Runner:
    """Base class: subclasses implement `_activate`, `_infer` and `_deactivate`."""

    name = "runner"
    precision_hint: str | None = None  # the inference precision a backend chose (OpenVINO's hint), else None

    def __init__(self):
        self.is_active = False
        self.inference_times: list[float] = []

    def activate(self) -> Runner:
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise RuntimeError(f"{self.name} is not active: use it as a context manager or call activate()")
        start = time.perf_counter()
        outputs = self._infer(feeds)
        self.inference_times.append(time.perf_counter() - start)
        return outputs

    @property
    def last_inference_time(self) -> float:
        return self.inference_times[-1] if self.inference_times else 0.0

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _activate(self) -> None:
        raise NotImplementedError

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _deactivate(self) -> None:
        pass


ORT_DEVICES = ("cpu", "cuda")
ORT_OPTIMIZATION = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class OrtOptions:
    """How `session_from_onnx` builds a session.

    device: None = CUDA when onnxruntime-gpu can use it, else CPU; "cpu" = CPU only; "cuda" = CUDA required
    (CPU stays behind it for the ops CUDA lacks). threads: intra-op threads, None = one per core.
    optimization: ONNX Runtime's graph optimization level. profile_prefix: write ORT's per-op trace there.
    """

    device: str | None = None
    threads: int | None = None
    optimization: str = "all"
    profile_prefix: str | None = None

    def __post_init__(self):
        if self.device not in (None, *ORT_DEVICES):
            raise DiffkilnError(f"onnxruntime runs on --device {'|'.join(ORT_DEVICES)}, not {self.device!r}")
        if self.optimization not in ORT_OPTIMIZATION:
            raise DiffkilnError(
                f"ORT optimization level is one of {', '.join(ORT_OPTIMIZATION)}, not {self.optimization!r}"
            )


def ort_providers(device: str | None = None) -> list[str]:
    """The execution providers for a device (see `OrtOptions.device`); raises when CUDA is asked for but absent."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise DiffkilnError("--device cuda needs onnxruntime-gpu with a working CUDA (pip install onnxruntime-gpu)")
    wanted = ("CPUExecutionProvider",) if device == "cpu" else ("CUDAExecutionProvider", "CPUExecutionProvider")
    return [p for p in wanted if p in available]


def session_from_onnx(path: Path | str, options: OrtOptions | None = None):
    """The one place diffkiln builds an ONNX Runtime session: sequential, quiet (severity 3), `options` for the rest."""
    import onnxruntime as ort

    options = options or OrtOptions()
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = levels[options.optimization]
    session_options.intra_op_num_threads = options.threads or os.cpu_count() or 1
    session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session_options.log_severity_level = 3
    if options.profile_prefix:
        session_options.enable_profiling = True
        session_options.profile_file_prefix = options.profile_prefix
    return ort.InferenceSession(str(path), session_options, providers=ort_providers(options.device))


class OrtRunner(Runner):
    """ONNX Runtime over a session loader: `OrtRunner(partial(session_from_onnx, path, options))`.

    `OrtRunner(path, providers=None, threads=None)` still works: the path is wrapped in `session_from_onnx`.
    """

    name = "onnxruntime"

    def __init__(self, loader: Callable[[], Any] | Path | str, providers: list[str] | None = None, threads=None):
        super().__init__()
        if isinstance(loader, (str, os.PathLike)):
            device = None if providers is None else "cuda" if "CUDAExecutionProvider" in providers else "cpu"
            loader = partial(session_from_onnx, Path(loader), OrtOptions(device=device, threads=threads))
        self.loader = loader
        self.session = None

    def _activate(self) -> None:
        self.session = self.loader()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: feeds[name] for name in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))

    def _deactivate(self) -> None:
        self.session = None


OPENVINO_PRECISIONS = ("f32", "bf16", "f16")


@dataclass(frozen=True)
class OpenVinoModel:
    """A compiled OpenVINO model and the ONNX graph's I/O names, read before compiling merges tensor aliases."""

    compiled: Any  # openvino.CompiledModel
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @property
    def precision_hint(self) -> str:
        """The precision the plugin actually runs: "f32", "bf16" or "f16"."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def compiled_openvino_model(path: Path | str, device: str = "CPU", precision_hint: str | None = "f32") -> OpenVinoModel:
    """Read an ONNX graph and compile it for an OpenVINO device (latency hint, dynamic shapes kept).

    The precision hint is set explicitly: on CPUs with native bf16 (AVX-512 BF16, AMX) the CPU plugin silently runs
    bf16 otherwise, and the GPU plugin f16. None leaves the plugin's own default.
    """
    import openvino as ov

    if precision_hint not in (None, *OPENVINO_PRECISIONS):
        raise DiffkilnError(
            f"OpenVINO precision hint is one of {', '.join(OPENVINO_PRECISIONS)}, not {precision_hint!r}"
        )
    core = ov.Core()
    model = core.read_model(str(path))
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if precision_hint:
        config["INFERENCE_PRECISION_HINT"] = precision_hint
    compiled = core.compile_model(model, device.upper(), config)
    # the uncompiled ports carry the ONNX names alone; compiled ones may add aliases (an Identity's input)
    return OpenVinoModel(
        compiled,
        tuple(port.get_any_name() for port in model.inputs),
        tuple(port.get_any_name() for port in model.outputs),
    )


class OpenVinoRunner(Runner):
    """OpenVINO over a model loader: `OpenVinoRunner(partial(compiled_openvino_model, path, "CPU", "bf16"))`.

    `OpenVinoRunner(path, device="CPU", precision_hint="f32")` wraps the path in `compiled_openvino_model`.
    `precision_hint` is what the compiled model reports once active (the requested one before).
    """

    name = "openvino"

    def __init__(
        self, loader: Callable[[], OpenVinoModel] | Path | str, device: str = "CPU", precision_hint: str | None = "f32"
    ):
        super().__init__()
        self._requested_precision = None
        if isinstance(loader, (str, os.PathLike)):
            loader = partial(compiled_openvino_model, Path(loader), device, precision_hint)
            self._requested_precision = precision_hint
        self.loader = loader
        self.model: OpenVinoModel | None = None

    @property
    def precision_hint(self) -> str | None:
        return self.model.precision_hint if self.model else self._requested_precision

    @property
    def compiled(self):
        return self.model.compiled if self.model else None

    def _activate(self) -> None:
        self.model = self.loader()
        compiled = self.model.compiled
        self.input_names = list(self.model.input_names)
        self.output_names = list(self.model.output_names)
        self._inputs = [_port(compiled.inputs, name) for name in self.input_names]
        self._outputs = [_port(compiled.outputs, name) for name in self.output_names]

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.model.compiled(
            {port: feeds[name] for name, port in zip(self.input_names, self._inputs, strict=True)}
        )
        return {name: np.asarray(result[port]) for name, port in zip(self.output_names, self._outputs, strict=True)}

    def _deactivate(self) -> None:
        self.model = None


def _port(ports, name: str):
    """The compiled port whose name set holds `name` (OpenVINO merges the names of aliased tensors)."""
    for port in ports:
        if name in port.get_names():
            return port
    raise DiffkilnError(f"OpenVINO compiled model has no port named {name!r}")
