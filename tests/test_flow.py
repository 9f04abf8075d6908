"""Flow matching (diffkiln.runtime.flow) against diffusers' FlowMatchEulerDiscreteScheduler and FluxPipeline.

The schedule must equal what FluxPipeline's `retrieve_timesteps(scheduler, n, sigmas=linspace(1, 1/n, n), mu=...)`
leaves in `scheduler.sigmas`/`scheduler.timesteps`; the sampler must track `scheduler.step` after every step on a
fixed nonlinear velocity; packing must equal FluxPipeline's static methods.
"""

import numpy as np
import pytest

from diffkiln.errors import DiffkilnError
from diffkiln.runtime import flow as F

FLUX_DEV = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
FLUX_SCHNELL = {**FLUX_DEV, "shift": 1.0, "use_dynamic_shifting": False}
CONFIGS = {
    "dev": FLUX_DEV,
    "schnell": FLUX_SCHNELL,
    "dev_terminal": {**FLUX_DEV, "shift_terminal": 0.1},
    "static_shift3_terminal": {**FLUX_SCHNELL, "shift": 3.0, "shift_terminal": 0.05},
    "linear_shift": {**FLUX_DEV, "time_shift_type": "linear"},
    "karras": {**FLUX_DEV, "use_karras_sigmas": True},
    "exponential": {**FLUX_SCHNELL, "shift": 3.0, "use_exponential_sigmas": True},
    "defaults": {},
}
# Packed lengths: 256x256 (256 tokens), 512x512 (1024), 1024x1024 (4096), one past the max, one odd size.
SEQ_LENS = (256, 1024, 4096, 6400, 24 * 40)
STEPS = (1, 4, 28, 50)


def diffusers_schedule(config, steps, image_seq_len, use_flow_sigmas=False):
    """FluxPipeline.__call__ step 5, verbatim but for the pipeline object: the scheduler's sigmas and timesteps."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = None if use_flow_sigmas else np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(
        image_seq_len,
        sched.config.get("base_image_seq_len", 256),
        sched.config.get("max_image_seq_len", 4096),
        sched.config.get("base_shift", 0.5),
        sched.config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
    return sched, sched.sigmas.numpy(), timesteps.numpy()


def test_calculate_shift_equals_diffusers():
    pytest.importorskip("diffusers")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for n in (0, 256, 1000, 4096, 16384):
        assert F.calculate_shift(n) == calculate_shift(n)
        assert F.calculate_shift(n, 128, 2048, 0.3, 1.2) == calculate_shift(n, 128, 2048, 0.3, 1.2)
    assert F.calculate_shift(256) == pytest.approx(0.5)
    assert F.calculate_shift(4096) == pytest.approx(1.15)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps", STEPS)
def test_flow_sigmas_equal_diffusers(name, steps):
    config = CONFIGS[name]
    if steps == 1 and config.get("shift_terminal"):  # diffusers returns NaN here; we refuse
        with pytest.raises(F.FlowConfigError, match="shift_terminal"):
            F.flow_sigmas(config, steps, 1024)
        return
    for seq_len in SEQ_LENS:
        _, ref_sigmas, ref_timesteps = diffusers_schedule(config, steps, seq_len)
        sigmas = F.flow_sigmas(config, steps, seq_len)
        assert sigmas.dtype == np.float32 and sigmas.shape == (steps + 1,)
        assert sigmas[-1] == 0
        np.testing.assert_allclose(sigmas, ref_sigmas, rtol=0, atol=1e-6, err_msg=f"{name} {seq_len}")
        timesteps = F.flow_timesteps(sigmas, config.get("num_train_timesteps", 1000))
        assert timesteps.dtype == np.float32
        np.testing.assert_allclose(timesteps, ref_timesteps, rtol=1e-6, atol=0, err_msg=f"{name} {seq_len}")
        if name in ("dev", "schnell", "dev_terminal", "linear_shift", "static_shift3_terminal", "defaults"):
            np.testing.assert_array_equal(sigmas, ref_sigmas)  # float32 throughout: bit for bit
            np.testing.assert_array_equal(timesteps, ref_timesteps)


@pytest.mark.parametrize("config", [FLUX_DEV, FLUX_SCHNELL, {**FLUX_SCHNELL, "shift": 3.0}])
def test_flow_sigmas_without_pipeline_sigmas(config):
    """use_flow_sigmas (FluxPipeline passes sigmas=None): set_timesteps spaces the training range itself."""
    for steps in (4, 28):
        for seq_len in (256, 4096):
            _, ref_sigmas, _ = diffusers_schedule(config, steps, seq_len, use_flow_sigmas=True)
            sigmas = F.flow_sigmas({**config, "use_flow_sigmas": True}, steps, seq_len)
            np.testing.assert_allclose(sigmas, ref_sigmas, rtol=0, atol=1e-6)


def test_flux_dev_shift_is_resolution_dependent():
    small, large = F.flow_sigmas(FLUX_DEV, 4, 256), F.flow_sigmas(FLUX_DEV, 4, 4096)
    assert small[0] == large[0] == 1.0
    assert np.all(large[1:-1] > small[1:-1])  # larger images spend longer at high noise
    np.testing.assert_array_equal(F.flow_sigmas(FLUX_SCHNELL, 4, 256), [1.0, 0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize(
    "key",
    ["use_beta_sigmas", "invert_sigmas", "stochastic_sampling", "time_shift_type", "both"],
)
def test_refused_configs(key):
    bad = {
        "use_beta_sigmas": {"use_beta_sigmas": True},
        "invert_sigmas": {"invert_sigmas": True},
        "stochastic_sampling": {"stochastic_sampling": True},
        "time_shift_type": {"time_shift_type": "cosine"},
        "both": {"use_karras_sigmas": True, "use_exponential_sigmas": True},
    }[key]
    with pytest.raises(F.FlowConfigError) as info:
        F.flow_sigmas({**FLUX_DEV, **bad}, 4, 1024)
    message = str(info.value)
    assert isinstance(info.value, DiffkilnError) and "\n" not in message
    assert next(iter(bad)) in message
    with pytest.raises(ValueError, match="steps"):
        F.flow_sigmas(FLUX_DEV, 0, 1024)


def fake_transformer(x, sigma):
    """A deterministic nonlinear stand-in for the Flux transformer: (B, N, D) packed latents -> velocity."""
    s = np.float32(sigma)
    return (np.tanh(0.7 * x + 0.2 * np.roll(x, 1, axis=-1)) * (1 + s) - 0.3 * s * x + 0.05).astype(x.dtype)


@pytest.mark.parametrize(
    ("name", "steps", "dtype"),
    [
        ("dev", 28, np.float32),
        ("schnell", 4, np.float32),
        ("dev_terminal", 8, np.float32),
        ("dev", 6, np.float64),
        ("dev", 6, np.float16),  # fp16 velocity: diffusers casts each step's result back to fp16, and so do we
    ],
)
def test_sample_flow_euler_tracks_scheduler_step(name, steps, dtype):
    torch = pytest.importorskip("torch")
    config = CONFIGS[name]
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 16, 8, 12)).astype(dtype)  # (B, C, h, w) latents: 24 packed tokens of 64
    x0 = F.pack_latents(latents)
    seq_len = x0.shape[1]
    sched, _, timesteps = diffusers_schedule(config, steps, seq_len)
    sched.set_begin_index(0)
    sigmas = F.flow_sigmas(config, steps, seq_len)

    ours = []
    F.sample_flow_euler(fake_transformer, x0, sigmas, callback=lambda i, x, v: ours.append(x))
    assert len(ours) == steps

    ref = torch.from_numpy(x0)
    for i, t in enumerate(sched.timesteps):
        # what the transformer is given: timestep / 1000, in the latents' dtype
        sigma_in = (t.expand(ref.shape[0]).to(ref.dtype) / 1000)[0].item()
        assert abs(sigma_in - float(sigmas[i])) <= (1e-3 if dtype == np.float16 else 1e-6)  # fp16 timestep
        v = torch.from_numpy(fake_transformer(ref.numpy(), sigmas[i]))
        ref = sched.step(v, t, ref, return_dict=False)[0]
        assert ours[i].dtype == ref.numpy().dtype == dtype
        err = np.max(np.abs(ours[i] - ref.numpy())) / np.max(np.abs(ref.numpy()))
        assert err <= 1e-5, f"step {i}: relative error {err:.2e}"
        np.testing.assert_array_equal(ours[i], ref.numpy())  # same float32 arithmetic: bit for bit
    assert len(timesteps) == steps


def test_sample_flow_euler_is_exact_on_straight_paths():
    """With the true velocity of a straight path, Euler lands on x0 at sigma 0 whatever the schedule."""
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((1, 6, 8)).astype(np.float32)
    noise = rng.standard_normal((1, 6, 8)).astype(np.float32)
    out = F.sample_flow_euler(lambda x, s: noise - x0, noise, F.flow_sigmas(FLUX_DEV, 7, 6))
    np.testing.assert_allclose(out, x0, atol=1e-5)


def test_pack_unpack_round_trip_and_diffusers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import FluxPipeline

    rng = np.random.default_rng(2)
    for B, C, h, w in [(1, 16, 4, 6), (2, 16, 8, 8), (3, 4, 2, 10)]:
        latents = rng.standard_normal((B, C, h, w)).astype(np.float32)
        packed = F.pack_latents(latents)
        assert packed.shape == (B, (h // 2) * (w // 2), 4 * C)
        ref = FluxPipeline._pack_latents(torch.from_numpy(latents), B, C, h, w).numpy()
        np.testing.assert_array_equal(packed, ref)
        np.testing.assert_array_equal(F.unpack_latents(packed, h, w), latents)
        # _unpack_latents takes pixel sizes and the VAE scale factor (8): latent side h is pixel side 8 h
        ref_unpacked = FluxPipeline._unpack_latents(torch.from_numpy(packed), 8 * h, 8 * w, 8).numpy()
        np.testing.assert_array_equal(F.unpack_latents(packed, h, w), ref_unpacked)
        ids = F.image_ids(h, w)
        ref_ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, "cpu", torch.float32).numpy()
        assert ids.dtype == np.float32
        np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(F.text_ids(5), np.zeros((5, 3), np.float32))
    assert F.text_ids(5).dtype == np.float32
    with pytest.raises(ValueError, match="even"):
        F.pack_latents(np.zeros((1, 16, 3, 4), np.float32))
    with pytest.raises(ValueError, match="unpack"):
        F.unpack_latents(np.zeros((1, 6, 64), np.float32), 4, 4)
