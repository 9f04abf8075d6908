"""The demo model's images through both pipelines from the same initial noise: diffusers (the PyTorch reference)
and diffkiln's slim runtime. Shared by the adherence benchmark, the tests and the training script's verify stage.

Seeds follow diffusers: image i starts from `torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(
seeds[i]))`, and diffkiln is fed the same array as `latents`, so with the same deterministic sampler (DDIM, the
folder's scheduler) both pipelines follow one trajectory and their images can be compared pixel by pixel.

Needs torch (`pip install diffkiln[export]`) for the noise and the reference; the runtime itself stays torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffkiln.exporter.sources import BUNDLED

MODEL = BUNDLED["demo"]
LORA = MODEL.parent / "demo_lora.safetensors"  # kohya/A1111 format: every background turns pink
STEPS = 20
GUIDANCE = 5.0
SCHEDULER = "ddim"  # the folder's DDIMScheduler, in diffkiln's name
LATENT_SHAPE = (4, 8, 8)  # 64×64 images


def torch_noise(seeds: Sequence[int], shape: tuple[int, ...] = LATENT_SHAPE) -> np.ndarray:
    """The initial latents diffusers draws for `seeds` (one torch.Generator per image) -> float32 (N, *shape)."""
    import torch

    draws = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return np.concatenate([d.numpy() for d in draws])


def diffusers_pipeline(folder: Path = MODEL, lora: Path | None = None):
    """diffusers' StableDiffusionPipeline over the folder (with its scheduler), on CPU, optionally with a LoRA."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(Path(lora).parent, weight_name=Path(lora).name)
    return pipe


def diffusers_images(
    pipe, captions: Sequence[str], seeds: Sequence[int], *, steps: int = STEPS, guidance: float = GUIDANCE
) -> np.ndarray:
    """The reference: one batched call, each image from its own seed -> float32 (N, 64, 64, 3) in [0, 1]."""
    import torch

    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        out = pipe(
            list(captions), num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="np"
        )
    return out.images


def diffkiln_images(
    pipe, captions: Sequence[str], seeds: Sequence[int], *, steps: int = STEPS, guidance: float = GUIDANCE
) -> np.ndarray:
    """diffkiln's runtime (`diffkiln.runtime.pipeline.Pipeline`), DDIM, from diffusers' noise for each seed ->
    float32 (N, 64, 64, 3) in [0, 1]. One call per caption: a call batches copies of one prompt."""
    from diffkiln.runtime.pipeline import GenerationParams

    images = []
    for caption, x in zip(captions, torch_noise(seeds), strict=True):
        params = GenerationParams(caption, steps=steps, scheduler=SCHEDULER, guidance=guidance, latents=x[None])
        images.append(pipe(params).images[0])
    return np.stack(images)
