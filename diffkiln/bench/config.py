"""What one bench measures: the generation settings every path shares, and the jobs sent to each path.

Every path gets the same jobs: prompt i starts from the same initial noise,
`numpy.random.default_rng(seed + i).standard_normal((batch, C, h, w), float32)` (C: the model's latent channels,
h, w = image / 8), which diffusers takes as `latents=` (Flux: packed into 2×2 patches, `flow.pack_latents`) and
diffkiln as `GenerationParams.latents`; with a deterministic sampler both should then draw the same image.

Flux differs in three settings, filled in by `BenchConfig.fitted`: its guidance is distilled (fed to the
transformer, default 3.5; no CFG batch), its sampler is flow-matching Euler only, and its sides are multiples of 16
(latents are packed in 2×2 patches).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.runtime.schedulers import REGISTRY
from diffkiln.specs import VAE_SCALE, PipelineInfo

KINDS = ("generate", "components")  # what one bench call is: a whole generation, or one call of each component
WARMUP_STEPS = 2  # warm-up generations: every kernel, shape and arena of a full one, at a tenth of the cost
DEFAULT_GUIDANCE = 7.5  # classifier-free guidance scale (SD1/2/XL)
FLUX_GUIDANCE = 3.5  # Flux's distilled guidance (FluxPipeline's guidance_scale)
FLUX_SAMPLER = "euler"  # Flux samples with flow-matching Euler only
DEFAULT_PROMPTS = (
    "a small red circle on a blue background, top left",
    "a large yellow triangle on a black background, center",
)


@dataclass(frozen=True)
class BenchConfig:
    height: int | None = None  # None: the model's native size
    width: int | None = None
    steps: int = 20
    batch: int = 1
    scheduler: str = "euler"
    guidance: float | None = None  # None: the model's default (DEFAULT_GUIDANCE, Flux: FLUX_GUIDANCE)
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    negative: str = ""
    runs: int = 3
    warmup: int = 1
    seed: int = 0
    distilled: bool = False  # Flux: guidance is an input of the transformer, not a 2·B CFG batch

    def check(self) -> None:
        """Refuse settings no path could run, before any work starts."""
        if self.scheduler not in REGISTRY:
            raise DiffkilnError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(REGISTRY)}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % VAE_SCALE):
                raise DiffkilnError(f"--{name} {value} must be a positive multiple of {VAE_SCALE}")
        if self.steps < 1 or self.batch < 1 or self.runs < 1 or self.warmup < 0:
            raise DiffkilnError("--steps, --batch and --runs must be ≥ 1, --warmup ≥ 0")
        if not self.prompts:
            raise DiffkilnError("no prompts: give at least one")

    @property
    def cfg(self) -> bool:
        """Whether the denoiser runs a classifier-free-guidance batch (2·B rows): never for distilled guidance."""
        scale = DEFAULT_GUIDANCE if self.guidance is None else self.guidance
        return not self.distilled and scale > 1.0

    @property
    def deterministic(self) -> bool:
        """False for samplers that draw fresh noise every step: fidelity then compares different noise."""
        return not REGISTRY[self.scheduler].stochastic

    def fitted(self, info: PipelineInfo, native: int) -> BenchConfig:
        """This config for the model `info` describes: the native size and the model's default guidance filled in
        where none was given; Flux's settings checked (its sampler, sides that are multiples of 16)."""
        guidance = FLUX_GUIDANCE if info.is_flux else DEFAULT_GUIDANCE
        config = BenchConfig(
            **{
                **self.__dict__,
                "height": self.height or native,
                "width": self.width or native,
                "guidance": guidance if self.guidance is None else self.guidance,
                "distilled": info.is_flux,
            }
        )
        if info.is_flux:
            config._check_flux()
        return config

    def _check_flux(self) -> None:
        """Refuse what Flux cannot run: another sampler than flow-matching Euler, sides that do not pack."""
        if self.scheduler != FLUX_SAMPLER:
            raise DiffkilnError(
                f"Flux samples with flow-matching Euler: use --sampler {FLUX_SAMPLER}, not {self.scheduler}"
            )
        side = 2 * VAE_SCALE  # the /8 latents are packed in 2×2 patches
        for name in ("height", "width"):
            if getattr(self, name) % side:
                raise DiffkilnError(
                    f"--{name} {getattr(self, name)} must be a multiple of {side} for Flux "
                    "(its latents are packed in 2×2 patches)"
                )


@dataclass(frozen=True)
class Job:
    """One generation: what a worker needs, identical for every path."""

    prompt: str
    negative: str
    latents: np.ndarray = field(repr=False)  # [batch, C, h, w] float32, unpacked for Flux too
    steps: int
    scheduler: str
    guidance: float
    height: int
    width: int

    @property
    def batch(self) -> int:
        return len(self.latents)


def jobs(config: BenchConfig, latent_channels: int) -> list[Job]:
    """One job per prompt, each with its own seeded initial noise (config must be fitted)."""
    shape = (config.batch, latent_channels, config.height // VAE_SCALE, config.width // VAE_SCALE)
    return [
        Job(
            prompt=prompt,
            negative=config.negative,
            latents=np.random.default_rng(config.seed + i).standard_normal(shape, dtype=np.float32),
            steps=config.steps,
            scheduler=config.scheduler,
            guidance=config.guidance,
            height=config.height,
            width=config.width,
        )
        for i, prompt in enumerate(config.prompts)
    ]


def read_prompts(path: Path) -> tuple[str, ...]:
    """A prompts file: one prompt per line; blank lines and lines starting with # are ignored."""
    from diffkiln.calibration import read_prompts as read  # the one prompts-file reader

    return tuple(read(path, "prompts"))
