"""The PyTorch reference: diffusers' own pipeline over the source's weights, timed per stage.

A preset's or single file's pipeline is assembled from `open_source(ref).load(...)` modules (the weights diffkiln
exports) and the tokenizers the source writes into its kilns; a folder's comes from
`DiffusionPipeline.from_pretrained`. The scheduler is the diffusers twin that diffkiln's sampler registry names, and
the initial noise is passed as `latents=`, so a deterministic sampler gives the image diffkiln should reproduce. Runs
on the CPU in fp32, or under `torch.autocast("cpu", bfloat16)` for the bf16 path.

Flux: diffusers' FluxPipeline keeps its own scheduler (flow-matching Euler, the only sampler diffkiln runs for
Flux), takes the noise packed (`flow.pack_latents`), the distilled guidance as `guidance_scale` and the kiln's T5
length as `max_sequence_length`; no negative prompt (true CFG is not benched).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np

from diffkiln.bench.config import FLUX_SAMPLER
from diffkiln.bench.measure import memory
from diffkiln.errors import DiffkilnError
from diffkiln.runtime.schedulers import REGISTRY


def diffusers_scheduler(sampler: str, config):
    """diffusers' twin of diffkiln sampler `sampler` (its REGISTRY record's class and options) over `config`."""
    import diffusers

    record = REGISTRY[sampler]
    return getattr(diffusers, record.diffusers_class).from_config(config, **record.diffusers_options)


def build_pipeline(source_ref: str, scheduler: str):
    """diffusers' pipeline for a preset, folder or single file, with the diffusers twin of `scheduler` (Flux: its
    own flow-matching Euler, the only sampler it takes), gradients off."""
    import diffusers
    import torch

    from diffkiln.exporter.resolve import open_source

    source = open_source(source_ref)
    flux = source.info.is_flux
    if flux and scheduler != FLUX_SAMPLER:
        raise DiffkilnError(f"Flux samples with flow-matching Euler: use --sampler {FLUX_SAMPLER}, not {scheduler}")
    if source.kind == "folder":
        plain = source.info.is_sdxl or flux  # SD1/2 folders name a safety checker the reference must not run
        extra = {} if plain else {"safety_checker": None, "requires_safety_checker": False}
        pipe = diffusers.DiffusionPipeline.from_pretrained(source.path, local_files_only=True, **extra)
    else:
        pipe = pipeline_from_modules(source)
    if not flux:
        pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)  # inference: no autograd state, and autocast keeps no weight-cast cache
    return pipe


def source_tokenizers(source) -> dict:
    """{tokenizer[, tokenizer_2]: tokenizer} loaded from the folders `source` writes into a kiln, so a reference
    tokenizes prompts as the kiln's runtime does: sd15/sd21/sdxl have the real CLIP vocabulary (sd21 and SDXL's
    tokenizer_2 pad with "!"), the tiny presets diffkiln's small BPE; Flux's tokenizer_2 is T5's (AutoTokenizer)."""
    from transformers import AutoTokenizer, CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="diffkiln-tokenizers-") as tmp:
        names = source.copy_tokenizers(Path(tmp))
        t5 = {"tokenizer_2"} if source.info.is_flux else set()
        return {
            name: (AutoTokenizer if name in t5 else CLIPTokenizer).from_pretrained(Path(tmp) / name) for name in names
        }


def pipeline_from_modules(source):
    """diffusers' pipeline over a preset's or single file's modules in memory (`source.load`, the modules the
    exporter traces) and its own tokenizers."""
    import diffusers

    config = source.scheduler_config()
    if source.info.is_flux:
        return diffusers.FluxPipeline(
            scheduler=getattr(diffusers, config["_class_name"]).from_config(config),
            vae=source.load("vae"),
            text_encoder=source.load("text_encoder"),
            text_encoder_2=source.load("text_encoder_2"),
            transformer=source.load("transformer"),
            **source_tokenizers(source),  # CLIP's tokenizer, T5's tokenizer_2
        )
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


def denoiser_of(pipe):
    """The module a pipeline runs every step: its UNet, or Flux's transformer."""
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


class StageClock:
    """Wall time per stage of one pipeline call: forward hooks on the text encoders and the denoiser (UNet or Flux
    transformer: its steps are `unet_steps`, as in diffkiln's Timings), and a wrapper around `vae.decode` (pipelines
    call decode, not forward)."""

    def __init__(self, pipe):
        self.reset()
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                self._hook(getattr(pipe, name), "text")
        self._hook(denoiser_of(pipe), "unet")
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
        self.flux, self.text_sequence = False, 0  # Flux: T5's max_sequence_length, the kiln's text_sequence

    def _autocast(self):
        if self.precision == "bf16":
            return self.torch.autocast("cpu", dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def op_load(self) -> dict:
        from diffkiln.exporter.resolve import open_source

        start = time.perf_counter()
        info = open_source(self.source_ref).info
        self.flux, self.text_sequence = info.is_flux, info.text_sequence
        self.pipe = build_pipeline(self.source_ref, self.scheduler)
        self.clock = StageClock(self.pipe)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "rss": memory()["rss"], "threads": self.torch.get_num_threads(), "device": "cpu"}

    def op_generate(self, job) -> dict:
        torch = self.torch
        kwargs = {
            "prompt": job.prompt,
            "num_inference_steps": job.steps,
            "guidance_scale": job.guidance,  # Flux: the distilled guidance the transformer takes as an input
            "height": job.height,
            "width": job.width,
            "num_images_per_prompt": job.batch,
            "output_type": "np",
        }
        if self.flux:  # packed noise [B, (h/2)(w/2), 4·C]; T5 padded to the kiln's text_sequence
            from diffkiln.runtime.flow import pack_latents

            kwargs.update(latents=torch.from_numpy(pack_latents(job.latents)), max_sequence_length=self.text_sequence)
        else:  # negative None: SD encodes "", SDXL conditions on zeros (as diffkiln)
            kwargs.update(latents=torch.from_numpy(job.latents), negative_prompt=job.negative or None)
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
