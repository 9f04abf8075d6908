"""The numpy samplers against diffusers' schedulers, step by step, and against a closed-form Gaussian denoiser.

Both loops drive the same fake network, a deterministic nonlinear numpy function of (x_in, t); diffusers'
loop is exactly a pipeline's. Our latents are VE (`x0 + sigma * eps`); diffusers keeps VP latents for DDIM,
DPM++ and LCM, so ours are compared as `x / sqrt(1 + sigma^2)` there. The error measure is
`max|a - b| / max|b|` after every step.
"""

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from diffkiln.bench import torch_ref
from diffkiln.runtime import schedulers as S

MAX_REL_ERR = 1e-5
VP_SAMPLERS = tuple(n for n, r in S.REGISTRY.items() if r.family != "euler")  # diffusers keeps VP latents for these
SHAPE = (2, 4, 8, 8)


def sd_config(prediction_type="epsilon", timestep_spacing="leading", **overrides):
    """A Stable Diffusion 1.x/2.x scheduler config (set_alpha_to_one=False, as SD 1.x ships it)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "prediction_type": prediction_type,
        "timestep_spacing": timestep_spacing,
        **overrides,
    }


def fake_unet(x_in, t):
    """A deterministic, nonlinear stand-in for a UNet: (B,C,H,W), t scalar or (B,) -> (B,C,H,W) float64."""
    t = np.broadcast_to(np.asarray(t, dtype=np.float64).reshape(-1), (x_in.shape[0],)).reshape(-1, 1, 1, 1)
    return np.tanh(0.5 * x_in + 0.3 * np.roll(x_in, 1, axis=1)) + 0.05 * (t / 1000) * x_in + 0.02 * t / 1000


def diffusers_scheduler(sampler, config):
    pytest.importorskip("diffusers")
    return torch_ref.diffusers_scheduler(sampler, config)


def set_diffusers_timesteps(sched, sampler, steps, strength):
    """What the SD (or LCM) img2img pipeline does before its loop; returns the timesteps it loops over."""
    if (
        S.REGISTRY[sampler].family == "lcm"
    ):  # LatentConsistencyModelImg2ImgPipeline: the scheduler itself takes strength
        sched.set_timesteps(steps, strength=strength)
        return sched.timesteps
    from diffusers import StableDiffusionImg2ImgPipeline

    sched.set_timesteps(steps)
    if strength == 1.0:
        return sched.timesteps
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=sched), steps, strength, "cpu"
    )
    return timesteps


def run_diffusers(sampler, config, steps, noise, *, strength=1.0, image=None, seed=0):
    """diffusers' pipeline loop on the fake UNet, in float64; returns the latents before and after every step."""
    torch = pytest.importorskip("torch")
    sched = diffusers_scheduler(sampler, config)
    timesteps = set_diffusers_timesteps(sched, sampler, steps, strength)
    if image is None:
        latents = torch.from_numpy(noise) * sched.init_noise_sigma
    else:
        latents = sched.add_noise(torch.from_numpy(image), torch.from_numpy(noise), timesteps[:1])
    generator = torch.Generator().manual_seed(seed)
    kwargs = {"generator": generator} if S.REGISTRY[sampler].stochastic else {}
    out = [latents.numpy().copy()]
    for t in timesteps:
        x_in = sched.scale_model_input(latents, t)
        pred = torch.from_numpy(fake_unet(x_in.numpy(), t.numpy()))
        latents = sched.step(pred, t, latents, **kwargs).prev_sample
        out.append(latents.numpy().copy())
    return out


def torch_noise_sampler(shape, seed):
    """Draws what diffusers' step draws from torch.Generator(seed): randn(shape, float64) per noisy step."""
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=generator, dtype=torch.float64).numpy()


def run_ours(sampler, config, steps, noise, *, strength=1.0, image=None, seed=0):
    """Our loop on the same fake UNet; returns the latents before and after every step, in diffusers' space."""
    schedule = S.make_schedule(config, sampler, steps, strength)
    x = noise * schedule.init_noise_sigma if image is None else S.add_noise(schedule, image, noise)
    xs = [x]
    final = S.sample(
        sampler,
        S.Denoiser(fake_unet, schedule),
        x,
        schedule,
        noise_sampler=torch_noise_sampler(noise.shape, seed),
        callback=lambda i, x, denoised: xs.append(x),
    )
    np.testing.assert_array_equal(final, xs[-1])
    if sampler in VP_SAMPLERS:
        xs = [x / np.sqrt(1 + s**2) for x, s in zip(xs, schedule.sigmas, strict=True)]
    np.testing.assert_array_equal(S.to_model_space(schedule, final), xs[-1])  # what diffusers' loop ends with
    return xs


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def assert_same_trajectory(ours, ref):
    assert len(ours) == len(ref)
    errs = [rel_err(a, b) for a, b in zip(ours, ref, strict=True)]
    assert max(errs) <= MAX_REL_ERR, f"per-step relative errors: {np.array(errs)}"


@pytest.mark.parametrize("sampler", list(S.REGISTRY))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("spacing", "steps"), [("leading", 20), ("trailing", 20), ("trailing", 4)])
def test_matches_diffusers_every_step(sampler, prediction_type, spacing, steps):
    config = sd_config(prediction_type, spacing)
    noise = np.random.default_rng(0).standard_normal(SHAPE)
    assert_same_trajectory(run_ours(sampler, config, steps, noise), run_diffusers(sampler, config, steps, noise))


def test_ddim_matches_diffusers_with_alpha_to_one():
    """set_alpha_to_one=True: DDIM's last step lands on sigma 0 instead of the smallest training sigma."""
    config = sd_config("epsilon", "leading", set_alpha_to_one=True)
    noise = np.random.default_rng(1).standard_normal(SHAPE)
    assert S.make_schedule(config, "ddim", 10).sigmas[-1] == 0.0
    assert S.make_schedule(sd_config(), "ddim", 10).sigmas[-1] > 0.0
    assert_same_trajectory(run_ours("ddim", config, 10, noise), run_diffusers("ddim", config, 10, noise))


@pytest.mark.parametrize("sampler", list(S.REGISTRY))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_img2img_matches_diffusers_every_step(sampler, prediction_type):
    """strength 0.6: same truncated timesteps, same noised image (add_noise), same latents after every step."""
    config = sd_config(prediction_type)
    rng = np.random.default_rng(2)
    image, noise = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    steps = 4 if S.REGISTRY[sampler].family == "lcm" else 20
    ours = run_ours(sampler, config, steps, noise, strength=0.6, image=image)
    assert_same_trajectory(ours, run_diffusers(sampler, config, steps, noise, strength=0.6, image=image))


@pytest.mark.parametrize("sampler", list(S.REGISTRY))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [20, 4])
def test_timesteps_and_sigmas_match_diffusers(sampler, spacing, steps):
    config = sd_config("epsilon", spacing)
    schedule = S.make_schedule(config, sampler, steps)
    sched = diffusers_scheduler(sampler, config)
    sched.set_timesteps(steps)
    np.testing.assert_array_equal(schedule.timesteps, sched.timesteps.numpy().astype(np.float64))
    if sampler in VP_SAMPLERS:  # the training sigma at each timestep; diffusers starts from unit VP noise
        ac = sched.alphas_cumprod.numpy().astype(np.float64)
        if S.REGISTRY[sampler].family == "dpm_karras":
            ref = sched.sigmas.numpy()
        else:
            t = sched.timesteps.numpy()
            ref = np.append(np.sqrt((1 - ac[t]) / ac[t]), schedule.sigmas[-1])
        ref_init = np.sqrt(1 + ref[0] ** 2)
    else:
        ref, ref_init = sched.sigmas.numpy(), float(sched.init_noise_sigma)
    # diffusers' float32 alphas_cumprod is off by ~1e-6 near 1, i.e. up to ~1.3e-5 relative in the smallest sigmas
    np.testing.assert_allclose(schedule.sigmas, ref, rtol=3e-5, atol=0)
    assert schedule.init_noise_sigma == pytest.approx(ref_init, rel=1e-5)
    assert schedule.sigmas.shape == (steps + 1,) and schedule.timesteps.shape == (steps,)


@pytest.mark.parametrize("sampler", list(S.REGISTRY))
@pytest.mark.parametrize("steps", [20, 4, 25, 7])
def test_img2img_timesteps_match_diffusers_get_timesteps(sampler, steps):
    config = sd_config()
    sched = diffusers_scheduler(sampler, config)
    ref = set_diffusers_timesteps(sched, sampler, steps, 0.6).numpy().astype(np.float64)
    schedule = S.make_schedule(config, sampler, steps, strength=0.6)
    np.testing.assert_array_equal(schedule.timesteps, ref)
    assert len(schedule.sigmas) == len(ref) + 1


def test_alphas_cumprod_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for config in (sd_config(), sd_config(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)):
        ref = diffusers.DDIMScheduler.from_config(config).alphas_cumprod.numpy()
        ours = S.alphas_cumprod(config)
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, ref, rtol=3e-6)  # diffusers accumulates the product in float32


def test_karras_sigmas_and_sigma_to_t_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler.from_config(sd_config())
    train = S.sigmas_from_alphas(S.alphas_cumprod(sd_config()))
    ours = S.get_sigmas_karras(12, train[0], train[-1])
    assert ours[-1] == 0.0 and ours.shape == (13,)
    np.testing.assert_allclose(ours[:-1], sched._convert_to_karras(train[::-1], 12), rtol=1e-12)
    probe = np.concatenate([ours[:-1], [1e-4, 0.02, 3.3, 50.0], train[[0, 1, 500, 999]]])
    ref = np.array([sched._sigma_to_t(s, np.log(train)) for s in probe])
    np.testing.assert_allclose(S.sigma_to_t(probe, np.log(train)), ref, rtol=0, atol=1e-9)


def test_denoiser_uses_schedule_timesteps_and_interpolates_off_grid():
    schedule = S.make_schedule(sd_config(), "dpmpp_2m_karras", 8)
    seen = []
    den = S.Denoiser(lambda x_in, t: seen.append(t) or np.zeros_like(x_in), schedule)
    x = np.ones(SHAPE)
    for sigma, t in zip(schedule.sigmas[:-1], schedule.timesteps, strict=True):
        np.testing.assert_array_equal(den(x, sigma), x)  # zero epsilon: x is already clean
        assert den.timestep(sigma) == t
    assert all(t.shape == () and t.dtype == np.float64 for t in seen)
    bare = S.Denoiser(fake_unet, schedule.alphas_cumprod)  # no schedule: log-sigma interpolation
    train = S.sigmas_from_alphas(schedule.alphas_cumprod)
    assert bare.timestep(train[500]) == pytest.approx(500.0, abs=1e-9)
    assert bare.timestep(np.sqrt(train[500] * train[501])) == pytest.approx(500.5, abs=1e-3)


def gaussian_denoiser(s):
    """The ideal denoiser for data ~ N(0, s^2): E[x0 | x] = x * s^2 / (s^2 + sigma^2)."""
    return lambda x, sigma: x * (s**2 / (s**2 + sigma**2))


@pytest.mark.parametrize(("sampler", "tol"), [("euler", 0.03), ("ddim", 0.03), ("dpmpp_2m", 2e-3)])
def test_ode_samplers_solve_the_gaussian_flow(sampler, tol):
    """The probability-flow ODE maps z * sqrt(s^2 + sigma_max^2) to exactly z * s: samples have std s."""
    s, z = 0.5, np.random.default_rng(3).standard_normal(20_000)
    sigmas = S.get_sigmas_karras(100, 0.002, 80.0)
    x = S.SAMPLERS[sampler](gaussian_denoiser(s), z * np.sqrt(s**2 + sigmas[0] ** 2), sigmas)
    assert np.std(x) == pytest.approx(s * np.std(z), rel=tol)
    assert rel_err(x, z * s) <= tol


def test_euler_ancestral_keeps_the_gaussian_marginal():
    """Ancestral Euler is first order in distribution (std is ~6% low at 100 steps), so take 1000 steps."""
    s, rng = 0.5, np.random.default_rng(4)
    sigmas = S.get_sigmas_karras(1000, 0.002, 80.0)
    x0 = rng.standard_normal(20_000) * np.sqrt(s**2 + sigmas[0] ** 2)
    x = S.sample_euler_ancestral(
        gaussian_denoiser(s), x0, sigmas, noise_sampler=lambda *_: rng.standard_normal(x0.shape)
    )
    assert np.std(x) == pytest.approx(s, rel=0.02)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_conversions_recover_the_ideal_denoiser(prediction_type):
    """A network predicting the Gaussian's exact eps / v / x0, seen through the Denoiser, is the ideal denoiser."""
    s, schedule = 0.5, S.make_schedule(sd_config(prediction_type), "dpmpp_2m", 30)
    train = S.sigmas_from_alphas(schedule.alphas_cumprod)

    def model_fn(x_in, t):  # (B,C,H,W) VP input at integer timestep t -> the exact prediction
        sigma = train[int(t)]
        x = x_in * np.sqrt(1 + sigma**2)
        x0 = x * s**2 / (s**2 + sigma**2)
        eps = (x - x0) / sigma
        return {"epsilon": eps, "v_prediction": (eps - sigma * x0) / np.sqrt(1 + sigma**2), "sample": x0}[
            prediction_type
        ]

    z = np.random.default_rng(5).standard_normal((4, 4, 16, 16))
    x = z * np.sqrt(s**2 + schedule.sigmas[0] ** 2)
    out = S.sample("dpmpp_2m", S.Denoiser(model_fn, schedule), x, schedule)
    assert rel_err(out, S.sample_dpmpp_2m(gaussian_denoiser(s), x, schedule.sigmas)) <= 1e-12
    # The last step returns the denoised estimate at the smallest sigma, which scales the ODE solution there,
    # z * sqrt(s^2 + sigma^2), by s^2 / (s^2 + sigma^2); 30 steps of DPM++(2M) get within 1%.
    assert rel_err(out, z * s**2 / np.sqrt(s**2 + schedule.sigmas[-2] ** 2)) <= 1e-2


def test_sample_is_reproducible_with_rng_and_reports_every_step():
    schedule = S.make_schedule(sd_config(), "euler_a", 6)
    den, noise = S.Denoiser(fake_unet, schedule), np.random.default_rng(6).standard_normal(SHAPE)
    steps = []
    a = S.sample("euler_a", den, noise, schedule, rng=np.random.default_rng(7), callback=lambda i, *_: steps.append(i))
    b = S.sample("euler_a", den, noise, schedule, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert steps == list(range(6))


def test_unknown_sampler_family_and_strength_raise():
    schedule = S.make_schedule(sd_config(), "euler", 4)
    with pytest.raises(ValueError, match=r"unknown sampler 'heun'.*ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras"):
        S.sample("heun", S.Denoiser(fake_unet, schedule), np.zeros(SHAPE), schedule)
    with pytest.raises(ValueError, match="unknown sampler"):
        S.make_schedule(sd_config(), "heun", 4)
    with pytest.raises(ValueError, match="unknown schedule family 'euler_a'"):
        S.family_schedule(sd_config(), "euler_a", 4)
    with pytest.raises(ValueError, match="strength"):
        S.make_schedule(sd_config(), "euler", 4, strength=0.1)


def test_schedules_know_no_sampler():
    """A schedule is its family's: samplers sharing a family share it, and any sampler runs over any schedule."""
    config = sd_config()
    for name, record in S.REGISTRY.items():
        ours, family = S.make_schedule(config, name, 8, 0.6), S.family_schedule(config, record.family, 8, 0.6)
        np.testing.assert_array_equal(ours.sigmas, family.sigmas)
        np.testing.assert_array_equal(ours.timesteps, family.timesteps)
    schedule = S.make_schedule(config, "euler_a", 6)
    x = np.random.default_rng(8).standard_normal(SHAPE) * schedule.init_noise_sigma
    out = S.sample("ddim", S.Denoiser(fake_unet, schedule), x, schedule)
    np.testing.assert_array_equal(out, S.sample_ddim(S.Denoiser(fake_unet, schedule), x, schedule.sigmas))


@pytest.mark.parametrize("sampler", list(S.REGISTRY))
def test_registry_diffusers_twin_exists_and_takes_its_options(sampler):
    """Each record's class name resolves in diffusers and every option lands in the scheduler's config."""
    diffusers = pytest.importorskip("diffusers")
    record = S.REGISTRY[sampler]
    assert record.name == sampler and record.family in S.SCHEDULE_FAMILIES
    cls = getattr(diffusers, record.diffusers_class)
    assert issubclass(cls, diffusers.SchedulerMixin)
    sched = diffusers_scheduler(sampler, sd_config())
    assert type(sched) is cls
    assert {k: sched.config[k] for k in record.diffusers_options} == dict(record.diffusers_options)


def test_registry_is_the_only_sampler_table():
    """Every reader of sampler names (the bench's checks, the sampler view, torch_ref) reads the registry."""
    from diffkiln.bench.config import BenchConfig

    assert list(S.SAMPLERS) == list(S.REGISTRY)
    assert all(S.SAMPLERS[n] is r.fn for n, r in S.REGISTRY.items())
    for name, record in S.REGISTRY.items():
        BenchConfig(scheduler=name).check()
        assert BenchConfig(scheduler=name).deterministic is not record.stochastic
    assert not hasattr(torch_ref, "DIFFUSERS_SCHEDULERS")


def test_module_imports_without_the_pytorch_stack():
    heavy = ("torch", "diffusers", "transformers")
    code = f"import sys, diffkiln.runtime.schedulers; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
