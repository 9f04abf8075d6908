"""A stand-in for `tensorrt` and cuda-python's runtime, precise enough to drive TrtRunner on CPU.

"Device memory" is host memory (numpy buffers; cudaMemcpyAsync is a memmove), and an "engine" is the kiln's own
ONNX graph run by ONNX Runtime with the engine's current weights as initializer overrides. A plan file is JSON
naming its graph; a stripped plan starts with no weights, so it only runs once refitted. Only the names TrtRunner
uses exist (the API-surface test checks those against the real bindings), so a misspelt call fails here too.
CUDA graphs are recorded closures: a capture records the enqueue, a launch replays it.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

__version__ = "10.13.0.35"
PROPS = types.SimpleNamespace(name=b"NVIDIA Fake GPU", major=8, minor=9)


def initializers(onnx_path: str) -> dict[str, np.ndarray]:
    model = onnx.load(onnx_path)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


FUSED: dict[str, str] = {}  # a test fuses two weights to see the runner fall back to a refit from the base


class Logger:
    WARNING = 2

    def __init__(self, level):
        self.level = level


class TensorIOMode:
    INPUT = "input"
    OUTPUT = "output"


def nptype(dtype):
    return dtype


class Weights:
    def __init__(self, array):
        self.array = np.array(array)


class Engine:
    """An engine over an ONNX graph: weights {initializer: array}, refitted in place."""

    def __init__(self, plan: dict):
        self.onnx = plan["onnx"]
        self.weight_names = set(initializers(self.onnx))
        self.weights = {} if plan.get("stripped") else initializers(self.onnx)
        self.refits = 0
        self._session = None
        probe = ort.InferenceSession(self.onnx, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in probe.get_inputs()}
        self.outputs = {o.name: o for o in probe.get_outputs()}
        self.num_io_tensors = len(self.inputs) + len(self.outputs)
        self._names = [*self.inputs, *self.outputs]

    def get_tensor_name(self, i):
        return self._names[i]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        port = self.inputs.get(name) or self.outputs[name]
        return np.dtype({"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
                         "tensor(int64)": np.int64}[port.type])  # fmt: skip

    def session(self):
        if self._session is None:
            if set(self.weights) != self.weight_names:
                raise RuntimeError("engine weights missing: a stripped plan was not refitted")
            options = ort.SessionOptions()
            self._values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in self.weights.values()]
            for name, value in zip(self.weights, self._values, strict=True):
                options.add_initializer(name, value)
            self._session = ort.InferenceSession(self.onnx, options, providers=["CPUExecutionProvider"])
        return self._session

    def create_execution_context(self):
        return Context(self)


class Context:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.enqueues = 0

    def get_tensor_shape(self, name):
        engine = self.engine
        if name in engine.inputs:
            return self.shapes.get(name, tuple(d if isinstance(d, int) else -1 for d in engine.inputs[name].shape))
        feeds = {n: np.zeros(self.shapes[n], engine.get_tensor_dtype(n)) for n in engine.inputs}
        return engine.session().run([name], feeds)[0].shape

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream):
        if STATE.capturing is not None:
            STATE.capturing.append(self._run)
        else:
            self._run()
        return True

    def _run(self):
        self.enqueues += 1
        engine = self.engine
        feeds = {n: _read(self.addresses[n], self.shapes[n], engine.get_tensor_dtype(n)) for n in engine.inputs}
        for name, value in zip(engine.outputs, engine.session().run(list(engine.outputs), feeds), strict=True):
            ctypes.memmove(self.addresses[name], np.ascontiguousarray(value).ctypes.data, value.nbytes)


def _read(address, shape, dtype):
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(ctypes.string_at(address, n), dtype).reshape(shape).copy()


class Runtime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, data: bytes):
        try:
            return Engine(json.loads(data))
        except ValueError:
            return None


class Refitter:
    def __init__(self, engine: Engine, logger):
        self.engine, self.pending = engine, {}

    def set_named_weights(self, name, weights: Weights):
        if name not in self.engine.weight_names:
            return False
        self.pending[name] = weights.array.copy()
        return True

    def get_missing_weights(self):
        """Like TensorRT's: a weight fused with a set one (FUSED: name → partner) must be set too."""
        if not self.engine.weights and not self.pending:
            return sorted(self.engine.weight_names)[:1]
        return sorted(FUSED[n] for n in self.pending if n in FUSED and FUSED[n] not in self.pending)

    def refit_cuda_engine(self):
        self.engine.weights.update(self.pending)
        self.engine._session = None
        self.engine.refits += 1
        return True


class OnnxParserRefitter:
    def __init__(self, refitter: Refitter, logger):
        self.refitter = refitter

    def refit_from_file(self, path):
        self.refitter.pending.update(initializers(path))
        return True


# ---- cuda-python's runtime ---------------------------------------------------------------------------------


class _State:
    def __init__(self):
        self.buffers: dict[int, np.ndarray] = {}
        self.capturing: list | None = None
        self.launches = 0
        self.streams = 0


STATE = _State()
OK = 0


class cudaMemcpyKind:
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStreamCaptureMode:
    cudaStreamCaptureModeGlobal = 0


def cudaGetDeviceProperties(device):
    return OK, PROPS


def cudaMalloc(nbytes):
    buffer = np.zeros(nbytes, np.uint8)
    STATE.buffers[buffer.ctypes.data] = buffer
    return OK, buffer.ctypes.data


def cudaFree(ptr):
    STATE.buffers.pop(ptr)
    return (OK,)


def cudaMemcpyAsync(dst, src, nbytes, kind, stream):
    ctypes.memmove(dst, src, nbytes)
    return (OK,)


def cudaStreamCreate():
    STATE.streams += 1
    return OK, STATE.streams


def cudaStreamSynchronize(stream):
    return (OK,)


def cudaStreamDestroy(stream):
    STATE.streams -= 1
    return (OK,)


def cudaStreamBeginCapture(stream, mode):
    STATE.capturing = []
    return (OK,)


def cudaStreamEndCapture(stream):
    graph, STATE.capturing = STATE.capturing, None
    return OK, graph


def cudaGraphInstantiate(graph, flags):
    return OK, list(graph)


def cudaGraphLaunch(graph_exec, stream):
    STATE.launches += 1
    for call in graph_exec:
        call()
    return (OK,)


def cudaGraphExecDestroy(graph_exec):
    return (OK,)


def cudaGraphDestroy(graph):
    return (OK,)


def install(monkeypatch) -> _State:
    """Make `import tensorrt` and `from cuda.bindings import runtime` give these fakes (find_spec too)."""
    global STATE
    STATE = _State()
    this = sys.modules[__name__]
    this.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    cuda = types.ModuleType("cuda")
    cuda.__spec__ = importlib.machinery.ModuleSpec("cuda", None, is_package=True)
    cuda.__path__ = []
    bindings = types.ModuleType("cuda.bindings")
    bindings.__spec__ = importlib.machinery.ModuleSpec("cuda.bindings", None, is_package=True)
    bindings.__path__ = []
    bindings.runtime = this
    cuda.bindings = bindings
    for name, module in (
        ("tensorrt", this),
        ("cuda", cuda),
        ("cuda.bindings", bindings),
        ("cuda.bindings.runtime", this),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    return STATE


def write_plan(path: Path, onnx_path: Path, stripped: bool = False) -> int:
    path.write_text(json.dumps({"onnx": str(onnx_path), "stripped": stripped}))
    return path.stat().st_size
