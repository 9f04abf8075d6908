"""Noise schedules, one denoiser adapter and k-diffusion-style samplers, in pure numpy.

Everything works in the variance-exploding (VE, k-diffusion) parameterisation: a latent at noise level sigma is
`x = x0 + sigma * eps`. A diffusers variance-preserving (VP) latent at the same step is `x / sqrt(1 + sigma^2)`;
the training schedule gives `sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])`.

Three layers, each ignorant of the next:
- schedules (`family_schedule`): which sigmas to visit and which UNet timestep goes with each, chosen exactly as a
  diffusers scheduler family's `set_timesteps` chooses them (and img2img truncation as its pipelines do); they know
  no sampler, `make_schedule` only looks up the family a sampler follows;
- `Denoiser`: the only code that knows what the network predicts (epsilon, v or x0, LCM's boundary condition);
  it maps `(x, sigma)` to the network's inputs and its output to a clean-latent estimate `denoised`;
- samplers (`sample_euler`, ...): 15–30 line loops over consecutive sigmas that only ever call `denoise(x, sigma)`.

`REGISTRY` is the one table of samplers: each record names its loop, the schedule family it visits and the
diffusers scheduler (class name and options) it reproduces; `tests/test_schedulers.py` checks parity with diffusers
0.42 after every step.
Known difference: diffusers' DDIM steps from `t` to `t - T // steps`, which is not the next timestep with
'linspace' spacing, nor with 'trailing' when `steps` does not divide T (e.g. 30); we always step to the next
timestep (diffusers then relabels its latent; 'leading', the SD default, is unaffected).

Never imports torch, diffusers or transformers: the runtime must run without them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

DenoiseFn = Callable[[np.ndarray, float], np.ndarray]  # (x (B,C,H,W) VE latents, sigma) -> denoised (B,C,H,W)
NoiseSampler = Callable[[float, float], np.ndarray]  # (sigma, sigma_next) -> standard normal noise shaped like x
Callback = Callable[[int, np.ndarray, np.ndarray], None]  # (step index, x after the step, denoised)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Keys a config may omit take DDIMScheduler's defaults (plus LCMScheduler's two own keys). clip_sample and
# thresholding default to off: Stable Diffusion configs always turn them off and they are not implemented here.
CONFIG_DEFAULTS: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "original_inference_steps": 50,
    "timestep_scaling": 10.0,
}


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Schedule:
    """The noise levels a sampler visits, with the UNet timestep for each; any sampler can run over any schedule.

    sigmas: (n+1,) float64 VE noise levels, decreasing; `sigmas[-1]` is 0, except for DDIM with
        `set_alpha_to_one=False` (SD 1.x configs), where diffusers stops at the smallest training sigma.
    timesteps: (n,) float64, the timestep diffusers feeds the UNet at `sigmas[i]` (integers except Euler with
        'linspace' spacing).
    init_noise_sigma: txt2img starts from `x = noise * init_noise_sigma` (VE space). This equals diffusers'
        `scheduler.init_noise_sigma` for Euler; for DDIM/DPM++/LCM, which keep VP latents and start at
        `noise * 1.0`, it is the VE equivalent `sqrt(1 + sigmas[0]^2)`.
    alphas_cumprod: (T,) float64 training schedule, for sigma→timestep interpolation off the grid.
    timestep_scaling: LCM's boundary-condition scale (`t * timestep_scaling` in c_skip/c_out); None otherwise.
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    init_noise_sigma: float
    alphas_cumprod: np.ndarray
    prediction_type: str = "epsilon"
    timestep_scaling: float | None = None


def _config(config: Mapping) -> dict:
    cfg = {**CONFIG_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    for key in ("rescale_betas_zero_snr", "thresholding", "clip_sample"):
        if cfg.get(key):
            raise NotImplementedError(f"scheduler config option {key}=True is not supported by the slim runtime")
    if cfg["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {cfg['prediction_type']!r} is not one of {PREDICTION_TYPES}")
    return cfg


def alphas_cumprod(config: Mapping) -> np.ndarray:
    """(T,) float64 cumulative product of (1 - beta_t), the training noise schedule of a diffusers config.

    Computed in float64; diffusers computes it in float32, which differs by ~1e-6 relative.
    """
    cfg = _config(config)
    n, b0, b1 = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
    elif cfg["beta_schedule"] == "linear":
        betas = np.linspace(b0, b1, n, dtype=np.float64)
    elif cfg["beta_schedule"] == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float64) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":  # Nichol & Dhariwal (2021), cosine alpha_bar
        alpha_bar = np.cos((np.arange(n + 1) / n + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    else:
        raise ValueError(f"unknown beta_schedule {cfg['beta_schedule']!r}")
    return np.cumprod(1.0 - betas)


def sigmas_from_alphas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """(T,) VE noise level of each training timestep, increasing with t: sqrt((1 - a_t) / a_t)."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1 - a) / a)


def sigma_to_t(sigma: np.ndarray | float, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of `sigma`, interpolating linearly in log sigma (diffusers' `_sigma_to_t`).

    log_sigmas: (T,) increasing log of the training sigmas. Out-of-range sigmas clamp to t=0 or t=T-1.
    """
    log_sigma = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
    low_idx = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * (low_idx + 1)


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """(n+1,) noise levels of Karras et al. (2022), arXiv:2206.00364 eq. 5, with a final 0 appended."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return np.append(sigmas, 0.0)


def spaced_timesteps(config: Mapping, steps: int, family: str = "ddim") -> np.ndarray:
    """(steps,) float64 decreasing UNet timesteps for `timestep_spacing`, as each diffusers family spaces them.

    family: "ddim" (DDIM, also Euler's integer grid), "euler" (Euler keeps 'linspace' fractional, float32) or
    "dpm" (DPM-Solver spaces steps+1 points for 'leading'/'linspace' and drops the last).
    """
    cfg = _config(config)
    T, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    n = steps + 1 if family == "dpm" else steps
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n)
        t = t.astype(np.float32) if family == "euler" else t.round()
        t = t[::-1][:steps]
    elif spacing == "leading":
        t = (np.arange(0, n) * (T // n)).round()[::-1][:steps] + cfg["steps_offset"]
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / steps)) - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; known: linspace, leading, trailing")
    return t.astype(np.float64)


def lcm_timesteps(config: Mapping, steps: int, strength: float = 1.0) -> np.ndarray:
    """(steps,) LCMScheduler's timesteps: `steps` picks from the distillation grid of `original_inference_steps`.

    strength < 1 (img2img) shrinks that grid to its first `int(original_inference_steps * strength)` points, as
    LCMScheduler.set_timesteps(strength=...) does; all `steps` are kept.
    """
    cfg = _config(config)
    original_steps = cfg["original_inference_steps"]
    k = cfg["num_train_timesteps"] // original_steps
    origin = (np.arange(1, int(original_steps * strength) + 1) * k - 1)[::-1]
    if steps < 1 or len(origin) // steps < 1:
        raise ValueError(f"LCM: {steps} steps do not fit the {len(origin)}-point grid at strength {strength}")
    return origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)].astype(float)


SCHEDULE_FAMILIES = ("ddim", "euler", "dpm", "dpm_karras", "lcm")


def family_schedule(config: Mapping, family: str, steps: int, strength: float = 1.0) -> Schedule:
    """The sigmas and UNet timesteps a diffusers scheduler `family` visits for `steps` steps.

    family: one of SCHEDULE_FAMILIES; "ddim", "euler" and "dpm" space timesteps as DDIMScheduler,
    EulerDiscreteScheduler and DPMSolverMultistepScheduler do, "dpm_karras" is the latter with Karras sigmas
    (use_karras_sigmas=True), "lcm" LCMScheduler's distillation grid. config: a diffusers scheduler config (see
    CONFIG_DEFAULTS). strength < 1 is img2img: like diffusers' img2img `get_timesteps`, keep only the last
    `int(steps * strength)` steps (LCM instead rescales its grid, as its img2img pipeline does).
    """
    if family not in SCHEDULE_FAMILIES:
        raise ValueError(f"unknown schedule family {family!r}; known: {', '.join(SCHEDULE_FAMILIES)}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    cfg = _config(config)
    T = cfg["num_train_timesteps"]
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    ac = alphas_cumprod(cfg)
    train_sigmas = sigmas_from_alphas(ac)  # (T,), increasing

    if family == "lcm":
        timesteps = lcm_timesteps(cfg, steps, strength)
        sigmas = np.append(train_sigmas[timesteps.astype(np.int64)], 0.0)
    elif family == "ddim":  # steps from t to t - T // steps; past t=0 lands on alpha 1 (sigma 0) or alpha_0
        timesteps = spaced_timesteps(cfg, steps, "ddim")
        prev = int(timesteps[-1]) - T // steps
        last = train_sigmas[prev] if prev >= 0 else (0.0 if cfg["set_alpha_to_one"] else train_sigmas[0])
        sigmas = np.append(train_sigmas[timesteps.astype(np.int64)], last)
    elif family == "dpm_karras":  # Karras sigmas; the UNet gets the nearest integer timestep
        sigmas = get_sigmas_karras(steps, train_sigmas[0], train_sigmas[-1])
        timesteps = sigma_to_t(sigmas[:-1], np.log(train_sigmas))
        if cfg["beta_schedule"] != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    else:  # euler, dpm: sigmas interpolated at the (possibly fractional) timesteps
        timesteps = spaced_timesteps(cfg, steps, family)
        sigmas = np.append(np.interp(timesteps, np.arange(T), train_sigmas), 0.0)

    if family == "euler" and cfg["timestep_spacing"] in ("linspace", "trailing"):
        init_noise_sigma = float(sigmas.max())
    else:  # Euler 'leading', and the VE form of the VP samplers' unit noise
        init_noise_sigma = math.sqrt(float(sigmas[0]) ** 2 + 1)

    if strength < 1.0 and family != "lcm":
        t_start = steps - min(int(steps * strength), steps)
        if t_start >= steps:
            raise ValueError(f"strength {strength} leaves no steps out of {steps}")
        timesteps, sigmas = timesteps[t_start:], sigmas[t_start:]
    scaling = float(cfg["timestep_scaling"]) if family == "lcm" else None
    return Schedule(sigmas, timesteps, init_noise_sigma, ac, cfg["prediction_type"], scaling)


def make_schedule(config: Mapping, sampler: str, steps: int, strength: float = 1.0) -> Schedule:
    """The schedule of the family `sampler` follows in REGISTRY (see family_schedule), as its diffusers twin's.

    Noise an encoded image with `add_noise(schedule, latents, noise)`; decode `to_model_space(schedule, sample(...))`.
    """
    return family_schedule(config, sampler_record(sampler).family, steps, strength)


def add_noise(schedule: Schedule, latents: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """img2img start: the encoded image (B,C,H,W) noised to `schedule.sigmas[0]`, in VE space.

    Equals diffusers' `scheduler.add_noise(latents, noise, timesteps[:1])` for the Euler samplers, and that
    result times `sqrt(1 + sigmas[0]^2)` for the VP ones (DDIM, DPM++, LCM).
    """
    return latents + float(schedule.sigmas[0]) * noise


# ---------------------------------------------------------------------------------------------------------------
# The denoiser adapter
# ---------------------------------------------------------------------------------------------------------------


class Denoiser:
    """k-diffusion's D(x, sigma): the network's prediction turned into an estimate of the clean latents x0.

    model_fn(x_in (B,C,H,W), t () float64) -> raw prediction (B,C,H,W), with classifier-free guidance already
    applied by the caller, and cast to the network's dtypes there; t is one timestep for every row, for the
    caller to broadcast to the batch it runs (CFG doubles it). The network sees the VP input
    `x_in = x / sqrt(sigma^2 + 1)` at the timestep the schedule pairs with sigma (off the schedule's grid,
    interpolated in log sigma). schedule: a Schedule, or a bare (T,) alphas_cumprod array.
    LCM schedules add the consistency boundary condition `c_skip(t) * x_in + c_out(t) * x0` (Luo et al. 2023).
    """

    def __init__(
        self,
        model_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
        schedule: Schedule | np.ndarray,
        prediction_type: str | None = None,
        *,
        timestep_scaling: float | None = None,
    ):
        if isinstance(schedule, Schedule):
            ac = schedule.alphas_cumprod
            pairs = zip(schedule.sigmas[:-1], schedule.timesteps, strict=True)
            self._t_of_sigma = {float(s): float(t) for s, t in pairs}
            prediction_type = prediction_type or schedule.prediction_type
            timestep_scaling = schedule.timestep_scaling if timestep_scaling is None else timestep_scaling
        else:
            ac, self._t_of_sigma = schedule, {}
        if (prediction_type or "epsilon") not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.model_fn = model_fn
        self.prediction_type = prediction_type or "epsilon"
        self.timestep_scaling = timestep_scaling
        self.log_sigmas = np.log(sigmas_from_alphas(ac))

    def timestep(self, sigma: float) -> float:
        """UNet timestep for sigma: the schedule's own where it has one (bit-exact), else interpolated."""
        t = self._t_of_sigma.get(float(sigma))
        return float(sigma_to_t(sigma, self.log_sigmas)) if t is None else t

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        sigma = float(sigma)
        t = self.timestep(sigma)
        c_in = 1.0 / math.sqrt(sigma**2 + 1)
        x_in = x * c_in  # the VP latent diffusers feeds the UNet
        out = self.model_fn(x_in, np.asarray(t, dtype=np.float64))
        if self.prediction_type == "epsilon":
            denoised = x - sigma * out
        elif self.prediction_type == "v_prediction":  # v = alpha*eps - sigma_vp*x0  =>  x0 = alpha*x_vp - sigma_vp*v
            denoised = x_in * c_in - out * (sigma * c_in)
        else:
            denoised = out
        if self.timestep_scaling is not None:  # LCM: c_skip, c_out with sigma_data = 0.5 (LCMScheduler)
            scaled_t = t * self.timestep_scaling
            c_skip = 0.25 / (scaled_t**2 + 0.25)
            c_out = scaled_t / math.sqrt(scaled_t**2 + 0.25)
            denoised = c_skip * x_in + c_out * denoised
        return denoised


# ---------------------------------------------------------------------------------------------------------------
# Samplers: x is VE latents at sigmas[0]; the result is at sigmas[-1]. callback(i, x, denoised) after each step.
# ---------------------------------------------------------------------------------------------------------------


def sample_euler(denoise: DenoiseFn, x: np.ndarray, sigmas: np.ndarray, *, callback: Callback | None = None):
    """Euler method on the probability-flow ODE, Karras et al. (2022) arXiv:2206.00364 Alg. 2 with s_churn=0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        d = (x - denoised) / sigma  # dx/dsigma
        dt = sigma_next - sigma
        x = x + d * dt
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_ddim(denoise: DenoiseFn, x: np.ndarray, sigmas: np.ndarray, *, callback: Callback | None = None):
    """DDIM with eta=0, Song et al. (2021) arXiv:2010.02502 eq. 12; in VE space x_next = x0 + sigma_next * eps."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        eps = (x - denoised) / sigma
        x = denoised + sigma_next * eps
        if callback is not None:
            callback(i, x, denoised)
    return x


def get_ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): deterministic step target and fresh-noise level of an ancestral step (k-diffusion)."""
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def sample_euler_ancestral(
    denoise: DenoiseFn,
    x: np.ndarray,
    sigmas: np.ndarray,
    *,
    noise_sampler: NoiseSampler,
    eta: float = 1.0,
    callback: Callback | None = None,
):
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        dt = sigma_down - sigma
        x = x + d * dt
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_up
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_dpmpp_2m(denoise: DenoiseFn, x: np.ndarray, sigmas: np.ndarray, *, callback: Callback | None = None):
    """DPM-Solver++(2M), Lu et al. (2022) arXiv:2211.01095 Alg. 2; first order on the first and the final step."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        if sigma_next == 0:  # lambda = +inf: the exact solution is the denoised estimate
            x, h = denoised, None
        else:
            h = math.log(sigma) - math.log(sigma_next)  # step in lambda = -log(sigma)
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
        old_denoised, h_last = denoised, h
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_lcm(
    denoise: DenoiseFn,
    x: np.ndarray,
    sigmas: np.ndarray,
    *,
    noise_sampler: NoiseSampler,
    callback: Callback | None = None,
):
    """Multistep latent consistency sampling, Luo et al. (2023) arXiv:2310.04378 Alg. 1: denoise, re-noise."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)  # the Denoiser applies LCM's c_skip/c_out boundary condition
        x = denoised
        if sigma_next > 0:
            x = x + sigma_next * noise_sampler(sigma, sigma_next)
        if callback is not None:
            callback(i, x, denoised)
    return x


@dataclass(frozen=True)
class SamplerRecord:
    """One sampler: its loop, the schedule family it visits and the diffusers scheduler it reproduces.

    fn: the sampler loop, `fn(denoise, x, sigmas, *, callback)`, plus `noise_sampler` when stochastic.
    family: the schedule it visits (one of SCHEDULE_FAMILIES, see family_schedule).
    stochastic: draws fresh noise every step, so two libraries given the same initial noise draw different images.
    diffusers_class, diffusers_options: the diffusers scheduler's class name and the `from_config` options that make
        it the same algorithm; a name, resolved with `getattr(diffusers, name)` where diffusers is installed.
    """

    name: str
    fn: Callable[..., np.ndarray]
    family: str
    diffusers_class: str
    diffusers_options: Mapping = field(default_factory=dict)
    stochastic: bool = False


_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
REGISTRY: dict[str, SamplerRecord] = {
    r.name: r
    for r in (
        SamplerRecord("ddim", sample_ddim, "ddim", "DDIMScheduler"),
        SamplerRecord("euler", sample_euler, "euler", "EulerDiscreteScheduler"),
        SamplerRecord("euler_a", sample_euler_ancestral, "euler", "EulerAncestralDiscreteScheduler", stochastic=True),
        SamplerRecord("dpmpp_2m", sample_dpmpp_2m, "dpm", "DPMSolverMultistepScheduler", _DPMPP_2M),
        SamplerRecord(
            "dpmpp_2m_karras",
            sample_dpmpp_2m,
            "dpm_karras",
            "DPMSolverMultistepScheduler",
            {**_DPMPP_2M, "use_karras_sigmas": True},
        ),
        SamplerRecord("lcm", sample_lcm, "lcm", "LCMScheduler", stochastic=True),
    )
}
SAMPLERS: dict[str, Callable[..., np.ndarray]] = {name: r.fn for name, r in REGISTRY.items()}  # name -> loop


def sampler_record(name: str) -> SamplerRecord:
    """The registry's record for sampler `name`; ValueError naming the known samplers otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def sample(
    name: str,
    denoise: DenoiseFn,
    x: np.ndarray,
    schedule: Schedule,
    *,
    rng: np.random.Generator | None = None,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> np.ndarray:
    """Run sampler `name` over `schedule` from VE latents x (B,C,H,W); returns VE latents at `sigmas[-1]`.

    x: `noise * schedule.init_noise_sigma` (txt2img) or `add_noise(schedule, image_latents, noise)` (img2img).
    Pass the result through `to_model_space` before decoding. Stochastic samplers draw noise from
    `noise_sampler`, else from `rng` (a fresh default_rng when both are None). Any schedule will do; diffusers
    parity needs `make_schedule(config, name, ...)`'s.
    """
    record = sampler_record(name)
    kwargs: dict = {"callback": callback}
    if record.stochastic:
        if noise_sampler is None:
            gen = rng if rng is not None else np.random.default_rng()

            def noise_sampler(sigma: float, sigma_next: float) -> np.ndarray:
                return gen.standard_normal(x.shape).astype(x.dtype, copy=False)

        kwargs["noise_sampler"] = noise_sampler
    return record.fn(denoise, x, schedule.sigmas, **kwargs)


def to_model_space(schedule: Schedule, x: np.ndarray) -> np.ndarray:
    """The latents (B,C,H,W) to decode: what diffusers' loop ends with, the VP form `x / sqrt(1 + sigmas[-1]^2)`.

    A no-op when the schedule ends at sigma 0; only DDIM with set_alpha_to_one=False stops above it.
    """
    return x / math.sqrt(1 + float(schedule.sigmas[-1]) ** 2)
