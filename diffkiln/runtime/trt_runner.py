"""TensorRT engines behind the runner interface: `TrtRunner(partial(engine_from_kiln, kiln_dir, "unet"))`.

The loader refuses a stale engine before deserializing it (engines.check_engine: TensorRT version, GPU
architecture, source graph, precision, LoRA state) and refits a weight-stripped plan from the kiln's ONNX. The
runner binds tensors by name (`set_input_shape`, `set_tensor_address`, `execute_async_v3`) on one CUDA stream,
refuses a feed outside the engine's profile with the profile's range, and captures a CUDA graph when the profile
is static (min = opt = max), replaying it on every later call. Buffers are cuda-python's (`cuda.bindings.runtime`):
no torch at run time. `refit` swaps weights in place; runtime/refit.py decides which, always from the base.

tensorrt and cuda-python are imported when a loader or runner is activated, never at import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffkiln import engines, kiln
from diffkiln.errors import DiffkilnError, KilnError
from diffkiln.runtime.runners import Runner


def cuda_runtime():
    """cuda-python's runtime module (`cuda.bindings.runtime`; `cuda.cudart` before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def checked(result, what: str = "CUDA call"):
    """cuda-python returns (error, *values): raise on an error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise DiffkilnError(f"{what} failed: {getattr(err, 'name', err)}; is the NVIDIA driver working?")
    return values[0] if len(values) == 1 else tuple(values) or None


def gpu_device(cudart=None) -> engines.Device:
    """The TensorRT version and GPU 0 this process runs on, as an engine manifest records them."""
    import tensorrt as trt

    props = checked((cudart or cuda_runtime()).cudaGetDeviceProperties(0), "reading the GPU's properties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return engines.Device(trt.__version__, name.strip("\0 "), f"{props.major}.{props.minor}")


@dataclass
class LoadedEngine:
    """What the loader hands the runner: the deserialized engine and the facts it was checked against."""

    engine: Any  # tensorrt.ICudaEngine
    component: str
    record: dict  # the component's engine.json record (profiles, refittable, stripped)
    onnx: Path  # the base graph: refit source of stripped plans and of `refit(from_base=True)`
    kiln_manifest_sha256: str


def engine_from_kiln(
    kiln_dir: Path, component: str, engines_root: Path | None = None, device: engines.Device | None = None
) -> LoadedEngine:
    """Find, check and deserialize the engine of `component` (the loader of `TrtRunner`)."""
    import tensorrt as trt

    kiln_dir = Path(kiln_dir)
    manifest = kiln.read_manifest(kiln_dir)
    device = device or gpu_device()
    folder = engines.find_engine_dir(Path(engines_root) if engines_root else kiln_dir / "engines", device)
    engine_manifest = engines.read_engine_manifest(folder)
    engines.check_engine(engine_manifest, component, device=device, kiln_manifest=manifest, kiln_dir=kiln_dir)
    record = engine_manifest["components"][component]
    plan = kiln.inside(folder, record["plan"], f"{engines.ENGINE_MANIFEST} plan of {component!r}")
    runtime = trt.Runtime(_logger())
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise KilnError(
            f"TensorRT cannot deserialize {plan}; rebuild with `{engines.rebuild_command(kiln_dir)} --force`"
        )
    loaded = LoadedEngine(
        engine, component, record, kiln.model_path(kiln_dir, component), kiln.manifest_sha256(kiln_dir)
    )
    if record.get("stripped"):
        refit_engine(loaded, {}, from_base=True)  # a weight-stripped plan gets its weights from the ONNX at load
    return loaded


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def refit_engine(loaded: LoadedEngine, updates: Mapping[str, np.ndarray], *, from_base: bool) -> None:
    """Set `updates` ({ONNX initializer: value}) in the engine's weights; with `from_base`, every other weight is
    first reset to the base graph's (OnnxParserRefitter), so nothing an earlier refit set survives."""
    import tensorrt as trt

    if not loaded.record.get("refittable"):
        raise KilnError(
            f"the {loaded.component} engine was built without --refit; rebuild with `diffkiln build KILN --refit`"
        )
    logger = _logger()
    refitter = trt.Refitter(loaded.engine, logger)
    if from_base and not trt.OnnxParserRefitter(refitter, logger).refit_from_file(str(loaded.onnx)):
        raise KilnError(f"TensorRT cannot refit {loaded.component} from {loaded.onnx}; rebuild the engine")
    keep = []  # TensorRT reads the host arrays at refit_cuda_engine: they must stay alive until then
    for name, value in updates.items():
        keep.append(np.ascontiguousarray(value))
        if not refitter.set_named_weights(name, trt.Weights(keep[-1])):
            raise KilnError(f"the {loaded.component} engine has no refittable weight {name!r}; rebuild with --refit")
    missing = refitter.get_missing_weights()
    if missing and not from_base:  # weights TensorRT fused with a changed one: take them from the base graph
        return refit_engine(loaded, updates, from_base=True)
    if missing:
        raise KilnError(f"refitting {loaded.component} needs weights it was not given ({missing[0]}, …)")
    if not refitter.refit_cuda_engine():
        raise KilnError(f"TensorRT could not refit the {loaded.component} engine (see its log above)")


class DeviceBuffer:
    """One device allocation that grows on demand (never shrinks while the runner lives)."""

    def __init__(self, cudart):
        self.cudart, self.ptr, self.nbytes = cudart, 0, 0

    def reserve(self, nbytes: int) -> bool:
        """Make room for `nbytes`; True when the address changed (a captured CUDA graph is then invalid)."""
        if nbytes <= self.nbytes:
            return False
        self.free()
        self.ptr = checked(self.cudart.cudaMalloc(max(nbytes, 1)), f"allocating {nbytes} bytes on the GPU")
        self.nbytes = nbytes
        return True

    def free(self) -> None:
        if self.ptr:
            checked(self.cudart.cudaFree(self.ptr), "freeing GPU memory")
        self.ptr, self.nbytes = 0, 0


class TrtRunner(Runner):
    """A TensorRT engine over a loader returning a `LoadedEngine` (see `engine_from_kiln`)."""

    name = "tensorrt"

    def __init__(self, loader: Callable[[], LoadedEngine], cuda_graphs: bool = True):
        super().__init__()
        self.loader, self.cuda_graphs = loader, cuda_graphs
        self.loaded: LoadedEngine | None = None

    @property
    def precision_hint(self) -> str | None:
        return self.loaded.record.get("precision") if self.loaded else None

    @property
    def profile(self) -> dict:
        return self.loaded.record["profiles"]

    @property
    def static(self) -> bool:
        """Every input's profile has min = max: shapes never change, so one captured CUDA graph serves all calls."""
        return all(low == high for low, _, high in self.profile.values())

    def _activate(self) -> None:
        import tensorrt as trt

        self.cudart = cuda_runtime()
        self.loaded = self.loader()
        engine = self.loaded.engine
        self.context = engine.create_execution_context()
        self.stream = checked(self.cudart.cudaStreamCreate(), "creating a CUDA stream")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.buffers = {n: DeviceBuffer(self.cudart) for n in names}
        self.graph = None  # (graph, graph_exec) once captured

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, context = self.cudart, self.context
        feeds = {n: np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]) for n in self.input_names}
        engines.check_shapes(self.loaded.component, self.profile, {n: a.shape for n, a in feeds.items()})
        moved = False
        for name, array in feeds.items():
            if tuple(context.get_tensor_shape(name)) != array.shape:
                context.set_input_shape(name, array.shape)
                moved = True
        shapes = {n: tuple(context.get_tensor_shape(n)) for n in self.output_names}
        for name, shape in [*((n, a.shape) for n, a in feeds.items()), *shapes.items()]:
            moved |= self.buffers[name].reserve(int(np.prod(shape)) * self.dtypes[name].itemsize)
            context.set_tensor_address(name, self.buffers[name].ptr)
        if moved:
            self._drop_graph()
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, array in feeds.items():
            checked(cudart.cudaMemcpyAsync(self.buffers[name].ptr, array.ctypes.data, array.nbytes, to_device,
                                           self.stream), f"copying {name} to the GPU")  # fmt: skip
        self._execute()
        outputs = {n: np.empty(shapes[n], self.dtypes[n]) for n in self.output_names}
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, array in outputs.items():
            checked(cudart.cudaMemcpyAsync(array.ctypes.data, self.buffers[name].ptr, array.nbytes, to_host,
                                           self.stream), f"copying {name} from the GPU")  # fmt: skip
        checked(cudart.cudaStreamSynchronize(self.stream), f"running the {self.loaded.component} engine")
        return outputs

    def _execute(self) -> None:
        """Replay the captured graph, or enqueue (and, the first time on a static profile, capture one)."""
        cudart = self.cudart
        if self.graph is not None:
            checked(cudart.cudaGraphLaunch(self.graph[1], self.stream), "replaying the CUDA graph")
            return
        if not self.context.execute_async_v3(self.stream):
            raise DiffkilnError(f"TensorRT could not run the {self.loaded.component} engine (see its log above)")
        if self.cuda_graphs and self.static:  # capture after one plain run: TensorRT sets itself up in that one
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
            checked(cudart.cudaStreamBeginCapture(self.stream, mode), "starting a CUDA graph capture")
            self.context.execute_async_v3(self.stream)
            graph = checked(cudart.cudaStreamEndCapture(self.stream), "capturing a CUDA graph")
            self.graph = (graph, checked(cudart.cudaGraphInstantiate(graph, 0), "instantiating a CUDA graph"))

    def _drop_graph(self) -> None:
        if self.graph is not None:
            checked(self.cudart.cudaGraphExecDestroy(self.graph[1]), "releasing a CUDA graph")
            checked(self.cudart.cudaGraphDestroy(self.graph[0]), "releasing a CUDA graph")
            self.graph = None

    def refit(self, updates: Mapping[str, np.ndarray], *, from_base: bool) -> None:
        """Swap weights in place ({ONNX initializer: value}); see runtime/refit.py for which and when."""
        if not self.is_active:
            raise RuntimeError("refit needs an active TrtRunner")
        checked(self.cudart.cudaStreamSynchronize(self.stream), "waiting for the engine before a refit")
        refit_engine(self.loaded, updates, from_base=from_base)
        self._drop_graph()  # a graph captured before the refit is not relied on to see the new weights

    def _deactivate(self) -> None:
        self._drop_graph()
        for buffer in self.buffers.values():
            buffer.free()
        checked(self.cudart.cudaStreamDestroy(self.stream), "releasing the CUDA stream")
        self.context = self.loaded = None
