"""What one bench measures: the generation settings every path shares, and the jobs sent to each path.

Every path gets the same jobs: prompt i starts from the same initial noise,
`numpy.random.default_rng(seed + i).standard_normal((batch, 4, h, w), float32)`, which diffusers takes as `latents=`
and diffkiln as `GenerationParams.latents`; with a deterministic sampler both should then draw the same image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffkiln.errors import DiffkilnError
from diffkiln.runtime.schedulers import REGISTRY
from diffkiln.specs import VAE_SCALE

KINDS = ("generate", "components")  # what one bench call is: a whole generation, or one call of each component
WARMUP_STEPS = 2  # warm-up generations: every kernel, shape and arena of a full one, at a tenth of the cost
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
    guidance: float = 7.5
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    negative: str = ""
    runs: int = 3
    warmup: int = 1
    seed: int = 0

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
        return self.guidance > 1.0

    @property
    def deterministic(self) -> bool:
        """False for samplers that draw fresh noise every step: fidelity then compares different noise."""
        return not REGISTRY[self.scheduler].stochastic

    def sized(self, native: int) -> BenchConfig:
        """This config with the model's native size filled in where none was given."""
        return BenchConfig(**{**self.__dict__, "height": self.height or native, "width": self.width or native})


@dataclass(frozen=True)
class Job:
    """One generation: what a worker needs, identical for every path."""

    prompt: str
    negative: str
    latents: np.ndarray = field(repr=False)  # [batch, C, h, w] float32
    steps: int
    scheduler: str
    guidance: float
    height: int
    width: int

    @property
    def batch(self) -> int:
        return len(self.latents)


def jobs(config: BenchConfig, latent_channels: int) -> list[Job]:
    """One job per prompt, each with its own seeded initial noise (config must be sized)."""
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
