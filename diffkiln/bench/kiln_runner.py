"""diffkiln's runtime over a kiln directory, as a bench worker backend: ONNX Runtime, or OpenVINO as a peer.

The pipeline is diffkiln's own (`runtime.pipeline.Pipeline`: tokenizer, numpy samplers, CFG as one 2·B UNet batch);
only the runner behind each component changes. Its per-stage timings are the ones `diffkiln run` prints.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diffkiln.bench.measure import memory
from diffkiln.runtime.runners import OrtRunner, Runner


class OpenVinoRunner(Runner):
    """One ONNX graph compiled by OpenVINO for its CPU plugin (dynamic shapes, latency hint)."""

    name = "openvino"

    def __init__(self, path: Path, device: str = "CPU"):
        super().__init__()
        self.path, self.device = Path(path), device
        self.compiled = None

    def _activate(self) -> None:
        import openvino as ov

        from diffkiln.onnxio import load_graph  # onnx only here: the ORT paths' memory stays the runtime's own

        core = ov.Core()
        model = core.read_model(str(self.path))
        self.compiled = core.compile_model(model, self.device, {"PERFORMANCE_HINT": "LATENCY"})
        # a port may carry several tensor names (OpenVINO merges aliases): keep the ONNX graph's own I/O names
        graph = load_graph(self.path).graph
        onnx_names = {v.name for v in [*graph.input, *graph.output]}
        self.input_names = [_onnx_name(port, onnx_names) for port in self.compiled.inputs]
        self.output_names = [_onnx_name(port, onnx_names) for port in self.compiled.outputs]

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.compiled([feeds[name] for name in self.input_names])
        return {
            name: np.asarray(result[port]) for name, port in zip(self.output_names, self.compiled.outputs, strict=True)
        }

    def _deactivate(self) -> None:
        self.compiled = None


def _onnx_name(port, onnx_names: set[str]) -> str:
    names = port.get_names()
    return next((n for n in names if n in onnx_names), port.get_any_name())


RUNNERS = {"ort": OrtRunner, "openvino": OpenVinoRunner}


class KilnBackend:
    """Worker backend for every path that runs a kiln directory (ort-*, openvino)."""

    def __init__(self, kiln_dir: str, runtime: str = "ort"):
        if runtime == "openvino":
            import openvino  # noqa: F401  (fail at start, and count its memory as a library's)
        else:
            import onnxruntime  # noqa: F401
        self.kiln_dir, self.runtime = Path(kiln_dir), runtime
        self.pipe = None

    def op_load(self) -> dict:
        from diffkiln.runtime.pipeline import Pipeline

        start = time.perf_counter()
        self.pipe = Pipeline(self.kiln_dir, runner_factory=RUNNERS[self.runtime])
        seconds = time.perf_counter() - start
        info = {"seconds": seconds, "rss": memory()["rss"], "device": "cpu"}
        if self.runtime == "ort":
            session = self.pipe.runners["unet"].session
            info["providers"] = session.get_providers()
            info["device"] = "cuda" if info["providers"][0] == "CUDAExecutionProvider" else "cpu"
        return info

    def op_generate(self, job) -> dict:
        from diffkiln.runtime.pipeline import GenerationParams

        params = GenerationParams(
            job.prompt,
            job.negative,
            steps=job.steps,
            scheduler=job.scheduler,
            guidance=job.guidance,
            height=job.height,
            width=job.width,
            batch=job.batch,
            latents=job.latents,
        )
        result = self.pipe(params)
        t = result.timings
        stages = {
            "text_encoding": t.text_encoding,
            "unet_steps": list(t.unet_steps),
            "vae_decode": t.vae_decode,
            "total": t.total,
        }
        return {"images": result.images, "stages": stages}

    def op_time_component(self, component: str, feeds: dict[str, np.ndarray]) -> float:
        runner = self.pipe.runners[component]
        runner.infer(feeds)
        return runner.last_inference_time
