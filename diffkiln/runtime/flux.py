"""Flux txt2img over a kiln directory: CLIP (pooled) + T5 (tokens) → flow-matching Euler over packed latents →
VAE decode, as diffusers' FluxPipeline computes it.

Latents [B, C, h, w] (h, w = image / 8) are packed in 2×2 patches into (h/2)(w/2) tokens of 4·C values with
their positions (`img_ids`); the transformer predicts a velocity and the sampler steps `x += (σ' − σ) v` over
sigmas shifted for the image's token count (runtime/flow.py). Guidance: distilled (`guidance` fed to the model,
`--guidance`, default 3.5) when the model has guidance embeddings; true CFG (the negative prompt, rows
[neg; pos] in one batch) when `true_cfg` > 1, as diffusers' `true_cfg_scale`. Decoding undoes the VAE's scale and
shift: `z / scaling_factor + shift_factor`. Initial noise is drawn unpacked, [B, C, h, w], like `diffkiln run`
for SD (`--latents` takes that shape); diffusers takes it packed (`flow.pack_latents`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diffkiln import kiln
from diffkiln.errors import DiffkilnError, KilnError
from diffkiln.runtime import flow
from diffkiln.runtime.pipeline import (
    GenerationParams,
    Pipeline,
    Result,
    Timings,
    _check_finite,
    _initial_noise,
    _read_scheduler,
    _require,
)
from diffkiln.runtime.runners import OrtRunner
from diffkiln.runtime.t5_tokenizer import T5Tokenizer
from diffkiln.runtime.tokenizer import ClipTokenizer
from diffkiln.specs import VAE_SCALE, PipelineInfo

COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale


class FluxPipeline(Pipeline):
    """A Flux kiln directory, ready to generate (the same interface as `Pipeline`)."""

    denoiser = "transformer"

    def __init__(self, kiln_dir: Path, runner_factory=OrtRunner, *, local_graphs: bool = True):
        self.kiln_dir, self.local_graphs = Path(kiln_dir), local_graphs
        self.manifest = kiln.read_manifest(self.kiln_dir)
        self.info = self.manifest["pipeline"]
        self.sdxl = False
        self.contract = PipelineInfo.from_json(self.info)
        for name in COMPONENTS:
            _require(self.kiln_dir, self.manifest, name, local_graphs)
        folders = self.manifest.get("tokenizers", [])
        if len(folders) != 2:
            raise KilnError(f"{kiln_dir}: a Flux kiln names two tokenizers (CLIP, T5), this one {len(folders)}")
        self.clip = ClipTokenizer.from_dir(kiln.inside(self.kiln_dir, folders[0], "tokenizer"))
        self.t5 = T5Tokenizer.from_dir(kiln.inside(self.kiln_dir, folders[1], "tokenizer"))
        self.tokenizers = [self.clip]
        self.multi_vector = {}
        self.scheduler_config = _read_scheduler(self.kiln_dir, self.manifest)
        self.runner_factory = runner_factory
        self.runners, self.input_types = {}, {}
        try:
            for name in COMPONENTS:
                self._load(name)
        except BaseException:
            self.close()
            raise

    def size_for(self, params: GenerationParams) -> tuple[int, int]:
        if params.image is not None:  # before any size is derived from the image
            raise DiffkilnError("img2img is not offered for Flux kiln dirs yet; drop --image")
        return super().size_for(params)

    def __call__(self, params: GenerationParams, on_step=None) -> Result:
        """Generate `params.batch` images; `params.guidance` is the distilled guidance, `params.true_cfg` > 1
        with a negative prompt runs true classifier-free guidance."""
        start, timings = time.perf_counter(), Timings(denoiser="transformer")
        params.check()
        if params.scheduler != "euler":
            raise DiffkilnError(f"Flux samples with flow-matching Euler: use --sampler euler, not {params.scheduler}")
        height, width = self.size_for(params)
        h, w = height // VAE_SCALE, width // VAE_SCALE
        rng = np.random.default_rng(params.seed)
        noise = _initial_noise(params.latents, (params.batch, self.info["latent_channels"], h, w), rng)
        true_cfg = params.true_cfg > 1.0

        t0 = time.perf_counter()
        context = self.encode_prompt(params.prompt, params.negative_prompt, params.batch, true_cfg, (height, width))
        timings.text_encoding = time.perf_counter() - t0
        _check_finite(context["encoder_hidden_states"], "text encoding")

        x = flow.pack_latents(noise)
        try:
            sigmas = flow.flow_sigmas(self.scheduler_config, params.steps, x.shape[1])
        except (ValueError, KeyError, TypeError) as e:
            raise DiffkilnError(f"cannot schedule these steps: {e}; check the kiln's scheduler config") from None
        rows = 2 * params.batch if true_cfg else params.batch
        fixed = {"img_ids": flow.image_ids(h, w), **context}
        if self.contract.guidance_embeds:
            fixed["guidance"] = np.full(rows, params.guidance, np.float32)
        runner = self.runners["transformer"]

        # what FluxPipeline feeds: the timestep t = 1000·σ in float32, divided by 1000 again (not always σ's bits)
        timestep = dict(zip(sigmas[:-1].tolist(), flow.flow_timesteps(sigmas) / np.float32(1000), strict=True))

        def velocity(x_in: np.ndarray, sigma: float) -> np.ndarray:
            tokens = np.concatenate([x_in, x_in]) if true_cfg else x_in
            t = timestep[float(sigma)]
            feeds = {"hidden_states": tokens.astype(np.float32), "timestep": np.full(rows, t, np.float32)}
            v = self._infer("transformer", {**feeds, **fixed})["out_hidden_states"]
            timings.unet_steps.append(runner.last_inference_time)
            if not true_cfg:
                return v
            negative, positive = np.split(v, 2)
            return negative + params.true_cfg * (positive - negative)

        def callback(i: int, x_i: np.ndarray, _v: np.ndarray) -> None:
            _check_finite(x_i, f"transformer step {i + 1}")
            if on_step:
                on_step(i + 1, params.steps)

        x = flow.sample_flow_euler(velocity, x, sigmas, callback=callback)
        latents = flow.unpack_latents(x, h, w) / self.info["scaling_factor"] + self.info.get("shift_factor", 0.0)

        t0 = time.perf_counter()
        decoded = self._infer("vae_decoder", {"latent_sample": latents.astype(np.float32)})["sample"]
        timings.vae_decode = time.perf_counter() - t0
        _check_finite(decoded, "vae decode")
        images = np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1).astype(np.float32)
        timings.total = time.perf_counter() - start
        return Result(images, params, timings)

    def encode_prompt(self, prompt: str, negative: str, batch: int, cfg: bool, size: tuple[int, int]) -> dict:
        """Transformer conditioning: T5 token states and txt_ids, CLIP's pooled prompt; rows [neg × B; pos × B]
        with true CFG (both prompts encoded in one call per encoder)."""
        prompts = [negative, prompt] if cfg else [prompt]
        pooled = self._infer("text_encoder", {"input_ids": self.clip.encode(prompts)})["pooler_output"]
        ids = self.t5.encode(prompts, self.info["text_sequence"])
        states = self._infer("text_encoder_2", {"input_ids": ids})["last_hidden_state"]
        return {
            "encoder_hidden_states": np.repeat(states, batch, axis=0),
            "pooled_projections": np.repeat(pooled, batch, axis=0),
            "txt_ids": flow.text_ids(states.shape[1]),
        }
