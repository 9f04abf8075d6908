"""txt2img / img2img over a kiln directory: tokenize → encode → sample → decode → images.

numpy + ONNX Runtime only. Classifier-free guidance runs the UNet once per step on the batch
[uncond; cond] (2·B rows) and combines `uncond + g · (cond − uncond)`; with g ≤ 1 the uncond half is skipped.

Randomness: initial noise is `numpy.random.default_rng(seed).standard_normal((B, 4, h, w), float32)`; ancestral
and LCM samplers draw their per-step noise from the same Generator after it. Pass `latents` to start from
given noise instead (what `diffusers` takes as `latents=`), and deterministic samplers then reproduce its image.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffkiln import kiln
from diffkiln.errors import DiffkilnError, KilnError
from diffkiln.lora.embeddings import expand_prompt, multi_vector_tokens
from diffkiln.runtime import schedulers
from diffkiln.runtime.runners import OrtRunner, Runner
from diffkiln.runtime.tokenizer import ClipTokenizer
from diffkiln.specs import VAE_SCALE


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    scheduler: str = "euler"
    guidance: float = 7.5
    seed: int = 0
    height: int | None = None  # default: the model's native size (or the init image's)
    width: int | None = None
    batch: int = 1
    image: np.ndarray | None = None  # img2img: float32 [H, W, 3] in [0, 1]
    strength: float = 0.8
    latents: np.ndarray | None = None  # [B, 4, h, w] initial noise (unit variance)


@dataclass
class Timings:
    text_encoding: float = 0.0
    vae_encode: float = 0.0
    unet_steps: list[float] = field(default_factory=list)
    vae_decode: float = 0.0
    total: float = 0.0

    @property
    def unet_total(self) -> float:
        return sum(self.unet_steps)

    def rows(self) -> list[tuple[str, float]]:
        n = max(len(self.unet_steps), 1)
        rows = [("text encoding", self.text_encoding)]
        if self.vae_encode:
            rows.append(("vae encode", self.vae_encode))
        rows += [
            (f"unet total ({len(self.unet_steps)} steps)", self.unet_total),
            ("unet per step", self.unet_total / n),
            ("vae decode", self.vae_decode),
            ("total", self.total),
        ]
        return rows


@dataclass
class Result:
    images: np.ndarray  # float32 [B, H, W, 3] in [0, 1]
    params: GenerationParams
    timings: Timings

    def to_uint8(self) -> np.ndarray:
        """[B, H, W, 3] uint8, rounded as diffusers' numpy_to_pil does."""
        return (self.images * 255).round().astype(np.uint8)


class Pipeline:
    """A kiln directory, ready to generate. Sessions are created once and kept for every call."""

    def __init__(self, kiln_dir: Path, runner_factory=OrtRunner):
        self.kiln_dir = Path(kiln_dir)
        self.manifest = kiln.read_manifest(self.kiln_dir)
        self.info = self.manifest["pipeline"]
        self.sdxl = self.info["kind"] == "sdxl"
        encoders = ["text_encoder", "text_encoder_2"] if self.sdxl else ["text_encoder"]
        for name in [*encoders, "unet", "vae_decoder"]:
            _require(self.kiln_dir, self.manifest, name)
        self.tokenizers = [ClipTokenizer.from_dir(self.kiln_dir / t) for t in self.manifest["tokenizers"]]
        self.multi_vector = multi_vector_tokens(self.manifest)  # textual inversions folded in with several vectors
        self.scheduler_config = json.loads((self.kiln_dir / self.manifest["scheduler"]).read_text())
        self.runners: dict[str, Runner] = {
            name: runner_factory(kiln.model_path(self.kiln_dir, name)).activate()
            for name in [*encoders, "unet", "vae_decoder"]
        }
        self.runner_factory = runner_factory

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def native_size(self) -> int:
        return self.info["sample_size"] * VAE_SCALE

    def __call__(self, params: GenerationParams, on_step=None) -> Result:
        """Generate `params.batch` images. `on_step(i, n)` is called after every denoising step."""
        start = time.perf_counter()
        timings = Timings()
        height, width = self.size_for(params)
        rng = np.random.default_rng(params.seed)
        shape = (params.batch, self.info["latent_channels"], height // VAE_SCALE, width // VAE_SCALE)
        noise = _initial_noise(params.latents, shape, rng)
        cfg = params.guidance > 1.0

        t0 = time.perf_counter()
        context = self.encode_prompt(params.prompt, params.negative_prompt, params.batch, cfg, (height, width))
        timings.text_encoding = time.perf_counter() - t0
        _check_finite(context["encoder_hidden_states"], "text encoding")

        schedule = schedulers.make_schedule(
            self.scheduler_config, params.scheduler, params.steps, params.strength if params.image is not None else 1.0
        )
        if params.image is not None:
            t0 = time.perf_counter()
            init = self.encode_image(params.image, height, width, params.batch)
            timings.vae_encode = time.perf_counter() - t0
            x = schedulers.add_noise(schedule, init, noise)
        else:
            x = noise * schedule.init_noise_sigma

        unet = self.runners["unet"]

        def model_fn(x_in: np.ndarray, t: np.ndarray) -> np.ndarray:
            rows = np.concatenate([x_in, x_in]) if cfg else x_in
            feeds = {"sample": rows.astype(np.float32), "timestep": np.full(len(rows), t, dtype=np.float32)}
            out = unet.infer({**feeds, **context})["out_sample"]
            timings.unet_steps.append(unet.last_inference_time)
            if not cfg:
                return out
            uncond, cond = np.split(out, 2)
            return uncond + params.guidance * (cond - uncond)

        def callback(i: int, x_i: np.ndarray, _denoised: np.ndarray) -> None:
            _check_finite(x_i, f"unet step {i + 1}")
            if on_step:
                on_step(i + 1, len(schedule.timesteps))

        denoise = schedulers.Denoiser(model_fn, schedule, self.scheduler_config.get("prediction_type", "epsilon"))
        latents = schedulers.sample(params.scheduler, denoise, x, schedule, rng=rng, callback=callback)
        latents = schedulers.to_model_space(schedule, latents)

        t0 = time.perf_counter()
        decoded = self.runners["vae_decoder"].infer({"latent_sample": latents / self.info["scaling_factor"]})["sample"]
        timings.vae_decode = time.perf_counter() - t0
        _check_finite(decoded, "vae decode")
        images = np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1).astype(np.float32)
        timings.total = time.perf_counter() - start
        return Result(images, params, timings)

    def encode_prompt(self, prompt: str, negative: str, batch: int, cfg: bool, size: tuple[int, int]) -> dict:
        """UNet conditioning feeds, rows ordered [uncond × B; cond × B] when guidance is on."""
        tok = self.tokenizers[0]
        prompt, negative = (expand_prompt(p, self.multi_vector) for p in (prompt, negative))
        n = max(t.n_chunks([prompt, negative]) for t in self.tokenizers)
        hidden, pooled = [], None
        for name, tokenizer in zip(["text_encoder", "text_encoder_2"], self.tokenizers, strict=False):
            cond, uncond = tokenizer.encode_pair([prompt], [negative], min_chunks=n)  # [1, n, 77] each
            ids = np.concatenate([uncond, cond]) if cfg else cond
            out = self.runners[name].infer({"input_ids": ids.reshape(-1, tok.model_max_length)})
            key = "penultimate_hidden_state" if self.sdxl else "last_hidden_state"
            states = out[key].reshape(len(ids), -1, out[key].shape[-1])  # [rows, n·77, D]
            hidden.append(states)
            if name == "text_encoder_2":
                pooled = out["text_embeds"].reshape(len(ids), n, -1)[:, 0]  # pooled from the first chunk
        states = np.concatenate(hidden, axis=-1)
        if self.sdxl and cfg and negative == "":
            # SDXL's force_zeros_for_empty_prompt: an empty negative prompt conditions on zeros
            states[0], pooled[0] = 0.0, 0.0
        context = {"encoder_hidden_states": np.repeat(states, batch, axis=0)}
        if self.sdxl:
            height, width = size
            time_ids = np.array([height, width, 0, 0, height, width], dtype=np.float32)
            context["text_embeds"] = np.repeat(pooled, batch, axis=0)
            context["time_ids"] = np.tile(time_ids, (len(context["text_embeds"]), 1))
        return context

    def encode_image(self, image: np.ndarray, height: int, width: int, batch: int) -> np.ndarray:
        """[H, W, 3] in [0, 1] → scaled latents [B, 4, h, w] (the posterior mean: deterministic)."""
        if "vae_encoder" not in self.runners:
            _require(self.kiln_dir, self.manifest, "vae_encoder")
            self.runners["vae_encoder"] = self.runner_factory(kiln.model_path(self.kiln_dir, "vae_encoder")).activate()
        if image.shape[:2] != (height, width):
            raise DiffkilnError(f"init image is {image.shape[1]}×{image.shape[0]}, expected {width}×{height}")
        sample = (image.transpose(2, 0, 1)[None] * 2 - 1).astype(np.float32)
        params = self.runners["vae_encoder"].infer({"sample": sample})["latent_parameters"]
        mean = params[:, : self.info["latent_channels"]]
        _check_finite(mean, "vae encode")
        return np.repeat(mean * self.info["scaling_factor"], batch, axis=0)

    def size_for(self, params: GenerationParams) -> tuple[int, int]:
        default = params.image.shape[:2] if params.image is not None else (self.native_size, self.native_size)
        height, width = params.height or default[0], params.width or default[1]
        multiple = VAE_SCALE * 2 ** self.info["num_down"]
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                raise DiffkilnError(f"--{name} {value} must be a positive multiple of {multiple} for this model")
        return height, width


def _require(kiln_dir: Path, manifest: dict, component: str) -> None:
    record = manifest.get("components", {}).get(component)
    if record is None or not (kiln_dir / record["path"]).is_file():
        raise KilnError(
            f"{kiln_dir} has no {component}; re-export it with `diffkiln export SOURCE -o {kiln_dir} --force`"
        )


def _initial_noise(latents: np.ndarray | None, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if latents is None:
        return rng.standard_normal(shape, dtype=np.float32)
    if latents.shape != shape:
        raise DiffkilnError(f"--latents has shape {list(latents.shape)}, expected {list(shape)} for this size/batch")
    return latents.astype(np.float32)


def _check_finite(array: np.ndarray, stage: str) -> None:
    if not np.isfinite(array).all():
        raise DiffkilnError(f"{stage} produced NaN/Inf values; the model or its export is broken at that stage")
