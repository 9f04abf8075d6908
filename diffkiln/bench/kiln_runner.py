"""diffkiln's runtime over a kiln directory, as a bench worker backend: ONNX Runtime, or OpenVINO as a peer.

The pipeline is diffkiln's own, the one `open_pipeline` picks for the kiln (`runtime.pipeline.Pipeline`: tokenizer,
numpy samplers, CFG as one 2·B UNet batch; or `runtime.flux.FluxPipeline`: flow-matching Euler over packed latents,
distilled guidance); only the runner behind each component changes. Its per-stage timings are the ones
`diffkiln run` prints (Flux's transformer steps in `unet_steps`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diffkiln.bench.measure import memory
from diffkiln.runtime.backends import runner_factory


class KilnBackend:
    """Worker backend for every path that runs a kiln directory (ort-*, openvino-*, trt-*: engines in KILN/engines)."""

    def __init__(self, kiln_dir: str, runtime: str = "ort", precision_hint: str | None = None):
        if runtime == "openvino":
            import openvino  # noqa: F401  (fail at start, and count its memory as a library's)
        elif runtime == "tensorrt":
            import tensorrt  # noqa: F401
        else:
            import onnxruntime  # noqa: F401
        self.kiln_dir, self.runtime = Path(kiln_dir), runtime
        self.factory = runner_factory(runtime, precision_hint=precision_hint)  # the runtime's backend table
        self.pipe = None

    def op_load(self) -> dict:
        from diffkiln.runtime.pipelines import open_pipeline

        start = time.perf_counter()
        self.pipe = open_pipeline(self.kiln_dir, runner_factory=self.factory)
        seconds = time.perf_counter() - start
        info = {"seconds": seconds, "rss": memory()["rss"], "device": "cpu"}
        denoiser = self.pipe.runners[self.pipe.denoiser]  # unet, or Flux's transformer
        if self.runtime == "ort":
            session = denoiser.session
            info["providers"] = session.get_providers()
            info["device"] = "cuda" if info["providers"][0] == "CUDAExecutionProvider" else "cpu"
        elif self.runtime == "tensorrt":
            info["device"] = "cuda"
        else:
            info["precision_hint"] = denoiser.precision_hint
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
