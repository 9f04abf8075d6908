"""Flow matching for Flux, in pure numpy: the sigma schedule, the Euler sampler and Flux's latent packing.

A flow-matching latent at noise level sigma in [0, 1] is `x = (1 - sigma) * x0 + sigma * noise`; the transformer
predicts the velocity `v = dx/dsigma = noise - x0`, so one Euler step is `x + (sigma_next - sigma) * v`.

Reproduces diffusers 0.42 exactly (float32 where diffusers is float32, so sigmas match to 1e-6 and latents bit for
bit on float32 inputs):
- `flow_sigmas`: what FluxPipeline hands `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/n, n),
  mu=calculate_shift(...))` and what that computes (dynamic or static shift, shift_terminal, Karras/exponential);
- `sample_flow_euler`: the loop of `scheduler.step` (deterministic, `stochastic_sampling=False`);
- `pack_latents`/`unpack_latents`/`image_ids`/`text_ids`: FluxPipeline's `_pack_latents`, `_unpack_latents`,
  `_prepare_latent_image_ids` and the zero text ids of `encode_prompt`.

Never imports torch, diffusers or transformers: the runtime must run without them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from diffkiln.errors import DiffkilnError

__all__ = [
    "FLOW_CONFIG_DEFAULTS",
    "FlowConfigError",
    "calculate_shift",
    "flow_sigmas",
    "flow_timesteps",
    "image_ids",
    "pack_latents",
    "sample_flow_euler",
    "text_ids",
    "unpack_latents",
]

VelocityFn = Callable[[np.ndarray, np.float32], np.ndarray]  # (x (B,N,C) packed latents, sigma) -> velocity
FlowCallback = Callable[[int, np.ndarray, np.ndarray], None]  # (step index, x after the step, velocity)

# FlowMatchEulerDiscreteScheduler's __init__ defaults: what a scheduler_config.json may leave out.
FLOW_CONFIG_DEFAULTS: dict = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
    "use_flow_sigmas": False,  # not the scheduler's own key: FluxPipeline then passes no sigmas
}

# Options the slim runtime refuses, each with why.
_REFUSED = {
    "use_beta_sigmas": "beta sigmas need scipy",
    "invert_sigmas": "inverted sigmas are Mochi's, not Flux's",
    "stochastic_sampling": "stochastic sampling draws torch noise each step",
}


class FlowConfigError(DiffkilnError, ValueError):
    """A flow-matching scheduler config asks for something the slim runtime does not do (one line, names the key)."""


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu of Flux's resolution-dependent shift: linear in the packed image length, base_shift at base_seq_len
    and max_shift at max_seq_len (diffusers.pipelines.flux.pipeline_flux.calculate_shift, Python floats)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _flow_config(config: Mapping) -> dict:
    """`config` over FLOW_CONFIG_DEFAULTS (None values take the default), refusing what is not supported."""
    cfg = {**FLOW_CONFIG_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    for key, why in _REFUSED.items():
        if cfg[key]:
            raise FlowConfigError(f"scheduler config option {key}=True is not supported by the slim runtime ({why})")
    if cfg["use_karras_sigmas"] and cfg["use_exponential_sigmas"]:
        raise FlowConfigError("scheduler config sets both use_karras_sigmas and use_exponential_sigmas; keep one")
    if cfg["time_shift_type"] not in ("exponential", "linear"):
        raise FlowConfigError(f"scheduler config time_shift_type={cfg['time_shift_type']!r} is not exponential/linear")
    return cfg


def _init_sigma_range(cfg: dict) -> tuple[float, float]:
    """(sigma_max, sigma_min) of the scheduler's training grid, as its __init__ leaves them (float32 then .item())."""
    T = cfg["num_train_timesteps"]
    sigmas = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
    if not cfg["use_dynamic_shifting"]:
        shift = cfg["shift"]
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return float(sigmas[0]), float(sigmas[-1])


def flow_sigmas(config: Mapping, steps: int, image_seq_len: int) -> np.ndarray:
    """(steps+1,) float32 decreasing noise levels ending in 0: FluxPipeline's schedule for a packed image of
    `image_seq_len` tokens (`(h/2)*(w/2)` for latents of side h, w), as FlowMatchEulerDiscreteScheduler computes it.

    config: a FlowMatchEulerDiscreteScheduler config (scheduler_config.json); missing keys take its defaults.
    Dtypes follow diffusers: the pipeline's float64 linspace is cast to float32 before shifting, so the shift and
    shift_terminal stretch run in float32; Karras/exponential conversions run in float64 and are cast back.
    `use_dynamic_shifting=False` ignores image_seq_len (no mu), as diffusers does. A config with the pipeline key
    `use_flow_sigmas` (FluxPipeline then passes no sigmas) spaces the training range in float64 instead.
    """
    cfg = _flow_config(config)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    T = cfg["num_train_timesteps"]
    if cfg["use_flow_sigmas"]:  # FluxPipeline passes no sigmas: set_timesteps spaces timesteps itself (float64)
        sigma_max, sigma_min = _init_sigma_range(cfg)
        sigmas = np.linspace(sigma_max * T, sigma_min * T, steps) / T
    else:
        sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)

    if cfg["use_dynamic_shifting"]:
        mu = calculate_shift(
            image_seq_len, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
        )
        # time_shift(mu, 1.0, t): exp(mu) / (exp(mu) + (1/t - 1)) or mu / (mu + (1/t - 1)); Python scalars stay weak
        a = math.exp(mu) if cfg["time_shift_type"] == "exponential" else mu
        sigmas = a / (a + (1 / sigmas - 1) ** 1.0)
    else:
        shift = cfg["shift"]
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)

    if cfg["shift_terminal"]:  # stretch so the last sigma is shift_terminal (LTX-Video)
        if steps < 2:  # the one sigma is 1: diffusers divides by 1 - 1 and returns NaN
            raise FlowConfigError(f"scheduler config option shift_terminal needs at least 2 steps, got {steps}")
        one_minus_z = 1 - sigmas
        scale_factor = one_minus_z[-1] / (1 - cfg["shift_terminal"])
        sigmas = 1 - (one_minus_z / scale_factor)

    if cfg["use_karras_sigmas"]:  # Karras et al. (2022) rho=7 between the shifted ends, in float64
        sigma_min, sigma_max = float(sigmas[-1]), float(sigmas[0])
        ramp = np.linspace(0, 1, steps)
        min_inv_rho, max_inv_rho = sigma_min ** (1 / 7.0), sigma_max ** (1 / 7.0)
        sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** 7.0
    elif cfg["use_exponential_sigmas"]:  # log-uniform between the shifted ends, in float64
        sigmas = np.exp(np.linspace(math.log(float(sigmas[0])), math.log(float(sigmas[-1])), steps))

    return np.append(np.asarray(sigmas, dtype=np.float32), np.float32(0.0))


def flow_timesteps(sigmas: np.ndarray, num_train_timesteps: int = 1000) -> np.ndarray:
    """(n,) float32 `scheduler.timesteps` for `flow_sigmas`' (n+1,) output: `sigma * num_train_timesteps`.

    FluxPipeline gives the transformer `timestep / 1000` in the latents' dtype, which in float32 may differ from
    sigma in the last bit; the transformer multiplies it by 1000 again.
    """
    return np.asarray(sigmas[:-1], dtype=np.float32) * np.float32(num_train_timesteps)


def sample_flow_euler(
    velocity: VelocityFn,
    x: np.ndarray,
    sigmas: np.ndarray,
    callback: FlowCallback | None = None,
) -> np.ndarray:
    """Euler method on the flow ODE dx/dsigma = v(x, sigma), from sigmas[0] to sigmas[-1] (FlowMatchEulerDiscrete).

    velocity(x, sigma) gets the current latents and `sigmas[i]` (np.float32). As diffusers' step(), the sample is
    upcast to float32, dt = sigma_next - sigma is float32, and the result is cast back to the velocity's dtype
    (float32 velocity: float32 latents throughout). callback(i, x, v) runs after each step.
    """
    sigmas = np.asarray(sigmas, dtype=np.float32)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = np.asarray(velocity(x, sigma))
        dt = sigma_next - sigma  # float32, as diffusers' 0-d tensors; cast to v's dtype like torch's 0-d promotion
        x = (x.astype(np.float32, copy=False) + np.asarray(dt, dtype=v.dtype) * v).astype(v.dtype, copy=False)
        if callback is not None:
            callback(i, x, v)
    return x


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """(B, C, h, w) latents -> (B, (h/2)*(w/2), 4C) tokens of 2x2 patches, channel-major within a patch
    (FluxPipeline._pack_latents); h and w must be even."""
    B, C, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs 2x2 latent patches: latent sides must be even, got {h}x{w}")
    x = latents.reshape(B, C, h // 2, 2, w // 2, 2)
    x = x.transpose(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(packed: np.ndarray, h: int, w: int) -> np.ndarray:
    """(B, (h/2)*(w/2), 4C) tokens -> (B, C, h, w) latents, the inverse of `pack_latents` (h, w: latent sides)."""
    B, n_tokens, D = packed.shape
    if h % 2 or w % 2 or D % 4 or n_tokens * 4 != h * w:
        raise ValueError(f"cannot unpack {packed.shape} tokens into {h}x{w} latents")
    x = packed.reshape(B, h // 2, w // 2, D // 4, 2, 2)
    x = x.transpose(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(B, D // 4, h, w)


def image_ids(h: int, w: int) -> np.ndarray:
    """((h/2)*(w/2), 3) float32 position ids of the packed image tokens: (0, row, column) per 2x2 patch, row-major
    (FluxPipeline._prepare_latent_image_ids(height // 2, width // 2) for latents of side h, w)."""
    ids = np.zeros((h // 2, w // 2, 3), dtype=np.float32)
    ids[..., 1] = np.arange(h // 2, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w // 2, dtype=np.float32)[None, :]
    return ids.reshape(-1, 3)


def text_ids(n: int) -> np.ndarray:
    """(n, 3) float32 zeros: the position ids FluxPipeline gives the n T5 tokens."""
    return np.zeros((n, 3), dtype=np.float32)
