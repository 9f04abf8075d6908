"""The PyTorch reference: diffusers' own pipeline over the source's weights, timed per stage.

A preset's or single file's pipeline is assembled from `open_source(ref).load(...)` modules (the weights diffkiln
exports) and the tokenizers the source writes into its kilns; a folder's comes from
`DiffusionPipeline.from_pretrained`. The scheduler is the diffusers twin that diffkiln's sampler registry names, and
the initial noise is passed as `latents=`, so a deterministic sampler gives the image diffkiln should reproduce. Runs
on the CPU in fp32, or under `torch.autocast("cpu", bfloat16)` for the bf16 path.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np

from diffkiln.bench.measure import memory
from diffkiln.runtime.schedulers import REGISTRY


def diffusers_scheduler(sampler: str, config):
    """diffusers' twin of diffkiln sampler `sampler` (its REGISTRY record's class and options) over `config`."""
    import diffusers

    record = REGISTRY[sampler]
    return getattr(diffusers, record.diffusers_class).from_config(config, **record.diffusers_options)


def build_pipeline(source_ref: str, scheduler: str):
    """diffusers' pipeline for a preset, folder or single file, with the diffusers twin of `scheduler`, gradients
    off."""
    import diffusers
    import torch

    from diffkiln.exporter.resolve import open_source

    source = open_source(source_ref)
    if source.kind == "folder":
        extra = {} if source.info.is_sdxl else {"safety_checker": None, "requires_safety_checker": False}
        pipe = diffusers.DiffusionPipeline.from_pretrained(source.path, local_files_only=True, **extra)
    else:
        pipe = pipeline_from_modules(source)
    pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)  # inference: no autograd state, and autocast keeps no weight-cast cache
    return pipe


def source_tokenizers(source) -> dict:
    """{tokenizer[, tokenizer_2]: CLIPTokenizer} loaded from the folders `source` writes into a kiln, so a reference
    tokenizes prompts as the kiln's runtime does: sd15/sd21/sdxl have the real CLIP vocabulary (sd21 and SDXL's
    tokenizer_2 pad with "!"), the tiny presets diffkiln's small BPE."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="diffkiln-tokenizers-") as tmp:
        names = source.copy_tokenizers(Path(tmp))
        return {name: CLIPTokenizer.from_pretrained(Path(tmp) / name) for name in names}


def pipeline_from_modules(source):
    """diffusers' pipeline over a preset's or single file's modules in memory (`source.load`, the modules the
    exporter traces) and its own tokenizers."""
    import diffusers

    config = source.scheduler_config()
    modules = {
        "vae": source.load("vae"),
        "text_encoder": source.load("text_encoder"),
        **source_tokenizers(source),  # tokenizer, and tokenizer_2 for SDXL
        "unet": source.load("unet"),
        "scheduler": getattr(diffusers, config["_class_name"]).from_config(config),
    }
    if source.info.is_sdxl:
        return diffusers.StableDiffusionXLPipeline(**modules, text_encoder_2=source.load("text_encoder_2"))
    return diffusers.StableDiffusionPipeline(
        **modules, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


class StageClock:
    """Wall time per stage of one pipeline call: forward hooks on the text encoders and the UNet, and a wrapper
    around `vae.decode` (pipelines call decode, not forward)."""

    def __init__(self, pipe):
        self.reset()
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                self._hook(getattr(pipe, name), "text")
        self._hook(pipe.unet, "unet")
        decode = pipe.vae.decode

        def timed_decode(*args, **kwargs):
            start = time.perf_counter()
            out = decode(*args, **kwargs)
            self.vae_decode += time.perf_counter() - start
            return out

        pipe.vae.decode = timed_decode

    def reset(self) -> None:
        self.text_encoding, self.unet_steps, self.vae_decode = 0.0, [], 0.0
        self._start = {}

    def _hook(self, module, stage: str) -> None:
        def before(_module, _args):
            self._start[stage] = time.perf_counter()

        def after(_module, _args, _out):
            elapsed = time.perf_counter() - self._start[stage]
            if stage == "unet":
                self.unet_steps.append(elapsed)
            else:
                self.text_encoding += elapsed

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def stages(self, total: float) -> dict:
        return {
            "text_encoding": self.text_encoding,
            "unet_steps": list(self.unet_steps),
            "vae_decode": self.vae_decode,
            "total": total,
        }


class TorchBackend:
    """Worker backend for the torch-fp32 / torch-bf16 paths."""

    def __init__(self, source_ref: str, precision: str, scheduler: str):
        import diffusers  # noqa: F401  (imported here so the worker's "after imports" memory includes the stack)
        import torch

        self.torch = torch
        self.source_ref, self.precision, self.scheduler = source_ref, precision, scheduler
        self.pipe = self.clock = None

    def _autocast(self):
        if self.precision == "bf16":
            return self.torch.autocast("cpu", dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def op_load(self) -> dict:
        start = time.perf_counter()
        self.pipe = build_pipeline(self.source_ref, self.scheduler)
        self.clock = StageClock(self.pipe)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "rss": memory()["rss"], "threads": self.torch.get_num_threads(), "device": "cpu"}

    def op_generate(self, job) -> dict:
        torch = self.torch
        kwargs = {
            "prompt": job.prompt,
            "negative_prompt": job.negative or None,  # None: SD encodes "", SDXL conditions on zeros (as diffkiln)
            "num_inference_steps": job.steps,
            "guidance_scale": job.guidance,
            "height": job.height,
            "width": job.width,
            "num_images_per_prompt": job.batch,
            "latents": torch.from_numpy(job.latents),
            "output_type": "np",
        }
        self.clock.reset()
        start = time.perf_counter()
        with torch.no_grad(), self._autocast():
            images = self.pipe(**kwargs).images
        total = time.perf_counter() - start
        return {"images": np.asarray(images, dtype=np.float32), "stages": self.clock.stages(total)}

    def op_time_component(self, component: str, feeds: dict[str, np.ndarray]) -> float:
        """Seconds for one call of a component on spec-named feeds (the micro-benchmarks)."""
        from diffkiln.exporter.wrappers import wrap

        torch = self.torch
        module = self.pipe.vae if component == "vae_decoder" else getattr(self.pipe, component)
        model = wrap(component, module)  # the export boundary: same inputs, in spec order, as the ONNX graph
        args = [torch.from_numpy(v) for v in feeds.values()]
        start = time.perf_counter()
        with torch.no_grad(), self._autocast():
            model(*args)
        return time.perf_counter() - start
