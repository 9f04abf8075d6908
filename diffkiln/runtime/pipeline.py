"""txt2img / img2img over a kiln directory: tokenize → encode → sample → decode → images.

numpy + ONNX Runtime only. Classifier-free guidance runs the UNet once per step on the batch
[uncond; cond] (2·B rows) and combines `uncond + g · (cond − uncond)`; with g ≤ 1 the uncond half is skipped.

Every feed is conformed to the graph's recorded contract (`_conform`): an optimum folder's text encoders take
int64 ids and its UNet one scalar timestep for all rows, and SDXL reads its penultimate state from
`hidden_states.{L-1}` there (specs.penultimate_output); diffkiln's own graphs take the feeds as they are.

Randomness: initial noise is `numpy.random.default_rng(seed).standard_normal((B, 4, h, w), float32)`; ancestral
and LCM samplers draw their per-step noise from the same Generator after it. Pass `latents` to start from
given noise instead (what `diffusers` takes as `latents=`), and deterministic samplers then reproduce its image.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffkiln import kiln
from diffkiln.errors import DiffkilnError, KilnError, library_errors
from diffkiln.runtime import schedulers
from diffkiln.runtime.prompts import expand_prompt, multi_vector_tokens
from diffkiln.runtime.runners import OrtRunner, Runner
from diffkiln.runtime.tokenizer import ClipTokenizer
from diffkiln.specs import VAE_SCALE, PipelineInfo, penultimate_output

MAX_STEPS = 1000
MAX_BATCH = 64
# a floor on the working memory per output pixel and image: the VAE decoder's last block holds 128 fp32
# channels at full resolution, about three such tensors alive at once (so 100000² is refused before allocating)
BYTES_PER_PIXEL = 128 * 4 * 3


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
    true_cfg: float = 1.0  # Flux: true classifier-free guidance over the negative prompt when > 1

    def check(self) -> None:
        """The settings a model does not decide: raises a one-line DiffkilnError naming the option."""
        for name in ("prompt", "negative_prompt"):
            try:
                getattr(self, name).encode("utf-8")
            except UnicodeEncodeError:
                option = "the prompt" if name == "prompt" else "--negative"
                raise DiffkilnError(f"{option} is not valid UTF-8 text; pass it as UTF-8") from None
        if not 1 <= self.steps <= MAX_STEPS:
            raise DiffkilnError(f"--steps {self.steps} must be in 1..{MAX_STEPS}")
        for option, value in (("--guidance", self.guidance), ("--true-cfg", self.true_cfg)):
            if not math.isfinite(value) or not -100 <= value <= 100:
                raise DiffkilnError(f"{option} {value} must be a finite number in -100..100 (≤ 1: off)")
        if not 1 <= self.batch <= MAX_BATCH:
            raise DiffkilnError(f"--batch {self.batch} must be in 1..{MAX_BATCH}")
        if not (0.0 < self.strength <= 1.0):
            raise DiffkilnError(f"--strength {self.strength} must be in (0, 1]")
        if self.latents is not None and not np.isfinite(self.latents).all():
            raise DiffkilnError("--latents holds NaN/Inf values; pass finite initial noise")


@dataclass
class Timings:
    text_encoding: float = 0.0
    vae_encode: float = 0.0
    unet_steps: list[float] = field(default_factory=list)
    vae_decode: float = 0.0
    total: float = 0.0
    denoiser: str = "unet"  # what `unet_steps` timed: the UNet, or Flux's transformer

    @property
    def unet_total(self) -> float:
        return sum(self.unet_steps)

    def rows(self) -> list[tuple[str, float]]:
        n = max(len(self.unet_steps), 1)
        rows = [("text encoding", self.text_encoding)]
        if self.vae_encode:
            rows.append(("vae encode", self.vae_encode))
        rows += [
            (f"{self.denoiser} total ({len(self.unet_steps)} steps)", self.unet_total),
            (f"{self.denoiser} per step", self.unet_total / n),
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
    """A kiln directory, ready to generate. Sessions are created once and kept for every call.

    `runner_factory(kiln_dir/<component>/model.onnx)` makes each component's runner. `local_graphs=False` is for
    runners that do not read that file (a Triton pipeline model calls the component models served beside it):
    the kiln dir then needs only its manifest, tokenizers and scheduler config, and the path names the component.
    """

    denoiser = "unet"  # the component run every step

    def __init__(self, kiln_dir: Path, runner_factory=OrtRunner, *, local_graphs: bool = True):
        self.kiln_dir = Path(kiln_dir)
        self.local_graphs = local_graphs
        self.manifest = kiln.read_manifest(self.kiln_dir)
        self.info = self.manifest["pipeline"]
        self.sdxl = self.info["kind"] == "sdxl"
        self.contract = PipelineInfo.from_json(self.info)
        encoders = ["text_encoder", "text_encoder_2"] if self.sdxl else ["text_encoder"]
        for name in [*encoders, "unet", "vae_decoder"]:
            _require(self.kiln_dir, self.manifest, name, self.local_graphs)
        folders = self.manifest.get("tokenizers", [])
        if len(folders) != len(encoders):
            raise KilnError(
                f"{kiln_dir}: the manifest names {len(folders)} tokenizer(s) for {len(encoders)} text encoder(s)"
            )
        self.tokenizers = [ClipTokenizer.from_dir(kiln.inside(self.kiln_dir, t, "tokenizer")) for t in folders]
        self.multi_vector = multi_vector_tokens(self.manifest)  # textual inversions folded in with several vectors
        self.scheduler_config = _read_scheduler(self.kiln_dir, self.manifest)
        self.runner_factory = runner_factory
        self.runners: dict[str, Runner] = {}
        self.input_types: dict[str, dict[str, tuple[str, int]]] = {}  # component → {input: (dtype, rank)}
        try:
            for name in [*encoders, "unet", "vae_decoder"]:
                self._load(name)
        except BaseException:
            self.close()
            raise

    def _load(self, name: str) -> None:
        """Start the runner of one component and check its graph takes and gives what the contract names (a
        swapped or foreign model.onnx is caught here, not as a shape error deep in a step)."""
        path = kiln.model_path(self.kiln_dir, name)
        fix = "re-export or re-download the kiln dir (a graph optimized for CUDA needs --device cuda)"
        with library_errors(f"cannot load {path}", fix):
            runner = self.runner_factory(path).activate()
        self.runners[name] = runner
        contract = self.manifest["components"][name].get("contract", {})
        self.input_types[name] = {
            t["name"]: (t.get("dtype"), len(t.get("shape", ())))
            for t in contract.get("inputs", [])
            if isinstance(t, dict) and isinstance(t.get("name"), str)
        }
        for kind in ("inputs", "outputs"):
            wanted = {t.get("name") for t in contract.get(kind, []) if isinstance(t, dict)}
            have = set(getattr(runner, f"{kind[:-1]}_names", wanted))
            if wanted - have:
                raise KilnError(
                    f"{path} does not take/give {', '.join(sorted(wanted - have))}: it is not the {name} graph "
                    "this kiln dir records; re-export or re-download it"
                )

    @property
    def backend(self) -> str:
        """What ran the UNet, with its precision where the backend chooses one: `onnxruntime`, `openvino f32`."""
        unet = self.runners[self.denoiser]
        hint = getattr(unet, "precision_hint", None)
        return f"{unet.name} {hint}" if hint else unet.name

    def _infer(self, name: str, feeds: dict) -> dict:
        feeds = _conform(feeds, self.input_types.get(name, {}))
        with library_errors(f"{name} failed in {self.runners[name].name}", "check the kiln dir and the settings"):
            outputs = self.runners[name].infer(feeds)
        # graphs built with fp16 I/O (optimize --fp16-io) hand back fp16: the loop itself runs in fp32
        return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in outputs.items()}

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
        params.check()
        height, width = self.size_for(params)
        rng = np.random.default_rng(params.seed)
        shape = (params.batch, self.info["latent_channels"], height // VAE_SCALE, width // VAE_SCALE)
        noise = _initial_noise(params.latents, shape, rng)
        cfg = params.guidance > 1.0

        t0 = time.perf_counter()
        context = self.encode_prompt(params.prompt, params.negative_prompt, params.batch, cfg, (height, width))
        timings.text_encoding = time.perf_counter() - t0
        _check_finite(context["encoder_hidden_states"], "text encoding")

        try:
            strength = params.strength if params.image is not None else 1.0
            schedule = schedulers.make_schedule(self.scheduler_config, params.scheduler, params.steps, strength)
        except (ValueError, NotImplementedError, TypeError, KeyError) as e:
            raise DiffkilnError(f"cannot schedule these steps: {e}; change --steps/--strength") from None
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
            out = self._infer("unet", {**feeds, **context})["out_sample"]
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
        decoded = self._infer("vae_decoder", {"latent_sample": latents / self.info["scaling_factor"]})["sample"]
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
        for i, (name, tokenizer) in enumerate(zip(["text_encoder", "text_encoder_2"], self.tokenizers, strict=False)):
            cond, uncond = tokenizer.encode_pair([prompt], [negative], min_chunks=n)  # [1, n, 77] each
            ids = np.concatenate([uncond, cond]) if cfg else cond
            out = self._infer(name, {"input_ids": ids.reshape(-1, tok.model_max_length)})
            key = penultimate_output(self.contract, i) if self.sdxl else "last_hidden_state"
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
            _require(self.kiln_dir, self.manifest, "vae_encoder", self.local_graphs)
            self._load("vae_encoder")
        if image.shape[:2] != (height, width):
            raise DiffkilnError(f"init image is {image.shape[1]}×{image.shape[0]}, expected {width}×{height}")
        sample = (image.transpose(2, 0, 1)[None] * 2 - 1).astype(np.float32)
        params = self._infer("vae_encoder", {"sample": sample})["latent_parameters"]
        mean = params[:, : self.info["latent_channels"]]
        _check_finite(mean, "vae encode")
        return np.repeat(mean * self.info["scaling_factor"], batch, axis=0)

    def size_for(self, params: GenerationParams) -> tuple[int, int]:
        default = params.image.shape[:2] if params.image is not None else (self.native_size, self.native_size)
        height = default[0] if params.height is None else params.height
        width = default[1] if params.width is None else params.width
        multiple = VAE_SCALE * 2 ** self.info["num_down"]
        largest = self.max_side
        for name, value in (("height", height), ("width", width)):
            if not (0 < value <= largest) or value % multiple:
                raise DiffkilnError(
                    f"--{name} {value} must be a multiple of {multiple} from {multiple} to {largest} for this model"
                )
        need = BYTES_PER_PIXEL * height * width * params.batch
        free = _available_memory()
        if free and need > free:
            raise DiffkilnError(
                f"{width}×{height} × batch {params.batch} needs about {need / 1e9:.1f} GB of memory and "
                f"{free / 1e9:.1f} GB are available; use a smaller size or --batch"
            )
        return height, width

    @property
    def max_side(self) -> int:
        """The largest image side in pixels: the UNet's recorded shape profile (2× the native size)."""
        profile = self.manifest["components"][self.denoiser].get("contract", {}).get("profile", {})
        sides = [profile.get(k, [0, 0, 0])[-1] for k in ("height", "width")]
        if all(isinstance(v, int) and v > 0 for v in sides):
            return min(sides) * VAE_SCALE
        return 2 * self.native_size


def _require(kiln_dir: Path, manifest: dict, component: str, local_graph: bool = True) -> None:
    """The manifest records `component` and, when `local_graph`, its graph file is there."""
    record = manifest.get("components", {}).get(component)
    if record is None or (local_graph and not (kiln_dir / record["path"]).is_file()):
        raise KilnError(
            f"{kiln_dir} has no {component}; re-export it with `diffkiln export SOURCE -o {kiln_dir} --force`"
        )


_DTYPES = {"float32", "float16", "int32", "int64"}


def _conform(feeds: dict[str, np.ndarray], types: dict[str, tuple[str, int]]) -> dict[str, np.ndarray]:
    """Each feed in the dtype and rank its graph records: [B] of one value → a scalar where the graph takes one
    (optimum's timestep), int32 ids → int64 (optimum's input_ids). Feeds that already fit pass untouched."""
    out = {}
    for name, value in feeds.items():
        dtype, rank = types.get(name, (None, value.ndim))
        if rank == 0 and value.ndim == 1:
            if not (value == value[0]).all():
                raise DiffkilnError(f"this kiln's graphs take one {name} for every row; these rows differ")
            value = value[0, ...]
        if dtype in _DTYPES and value.dtype != dtype:
            value = value.astype(dtype)
        out[name] = value
    return out


def _initial_noise(latents: np.ndarray | None, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if latents is None:
        return rng.standard_normal(shape, dtype=np.float32)
    if latents.shape != shape:
        raise DiffkilnError(f"--latents has shape {list(latents.shape)}, expected {list(shape)} for this size/batch")
    return latents.astype(np.float32)


def _check_finite(array: np.ndarray, stage: str) -> None:
    if not np.isfinite(array).all():
        raise DiffkilnError(
            f"{stage} produced NaN/Inf values: the graph overflows on these inputs (try other settings) or its "
            "weights are damaged"
        )


def _read_scheduler(kiln_dir: Path, manifest: dict) -> dict:
    path = kiln.inside(kiln_dir, manifest.get("scheduler", "scheduler/scheduler_config.json"), "manifest scheduler")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise KilnError(f"{path} is missing or not JSON; re-export the kiln dir") from None
    if not isinstance(config, dict):
        raise KilnError(f"{path} is not a scheduler config (a JSON object); re-export the kiln dir")
    return config


def _available_memory() -> int:
    """Bytes of memory available now (Linux's MemAvailable), or 0 when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
