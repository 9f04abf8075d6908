"""Backends behind one interface: `infer(feeds) -> outputs`, as polygraphy's runners do.

A runner has one life cycle (activate → infer … → deactivate), is a context manager, and records the wall time
of every inference, so the pipeline's timing table and the benchmarks read the same numbers on every backend.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


class Runner:
    """Base class: subclasses implement `_activate`, `_infer` and `_deactivate`."""

    name = "runner"

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


def ort_providers() -> list[str]:
    """CUDA when onnxruntime-gpu can use it, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtRunner(Runner):
    """ONNX Runtime session over one model file: full graph optimizations, one intra-op thread per core."""

    name = "onnxruntime"

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None):
        super().__init__()
        self.path, self.providers, self.threads = Path(path), providers, threads
        self.session = None

    def _activate(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads or os.cpu_count() or 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=self.providers or ort_providers())
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: feeds[name] for name in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))

    def _deactivate(self) -> None:
        self.session = None
