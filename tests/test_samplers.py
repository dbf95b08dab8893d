"""kolors.samplers against diffusers' EulerDiscreteScheduler and DPMSolverMultistepScheduler (Karras sigmas):
schedules to the bit, whole sampling loops (text-to-image and image-to-image) with a fake epsilon model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.pipelines.kolors.pipeline_kolors_img2img import KolorsImg2ImgPipeline

from kolors.config import ConfigError, from_dict
from kolors.samplers import (
    SAMPLERS,
    SchedulerConfig,
    add_noise,
    img2img_start,
    sample,
    schedule,
)
from tests.reference import REFERENCE

# Kwai-Kolors/Kolors-diffusers scheduler/scheduler_config.json (checked against the reference copy below).
KOLORS = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.014,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1100,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

VARIANTS = {
    "kolors": {},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "karras": {"use_karras_sigmas": True},
    "sd-linear": {"beta_schedule": "linear", "num_train_timesteps": 1000, "steps_offset": 0},
    "zero-snr": {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
}


def reference_scheduler(name: str, config: dict):
    """What a diffusers user builds: the model's Euler scheduler, or DPM-Solver++ Karras from its config."""
    euler = EulerDiscreteScheduler.from_config(config)
    if name == "euler":
        return euler
    return DPMSolverMultistepScheduler.from_config(euler.config, use_karras_sigmas=True)


def fake_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic epsilon 'UNet', nonlinear in x and sensitive to a one-unit change of the timestep."""
    t = float(t)
    return torch.tanh(x * (1.0 + 0.5 * math.sin(t / 7.0))) + 0.1 * math.cos(t / 13.0)


def run_reference(scheduler, steps: int, noise: torch.Tensor, x0=None, strength: float = 1.0) -> torch.Tensor:
    """diffusers' loop as KolorsPipeline (x0 None) or KolorsImg2ImgPipeline runs it."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if x0 is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        t_start = max(steps - min(int(steps * strength), steps), 0) * scheduler.order
        timesteps = timesteps[t_start:]
        scheduler.set_begin_index(t_start)
        latents = scheduler.add_noise(x0, noise, timesteps[:1])
    for t in timesteps:
        eps = fake_eps(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def run_ours(name: str, config, steps: int, noise: torch.Tensor, x0=None, strength: float = 1.0):
    """Our loop as the pipeline runs it: the schedule sliced at the img2img start, an epsilon adapter."""
    s = schedule(config, name, steps)
    start = 0 if x0 is None else img2img_start(s, strength, steps)
    sigmas, timesteps = s.sigmas[start:], s.timesteps[start:]
    x = noise * s.init_noise_sigma if x0 is None else add_noise(x0, noise, sigmas[0])

    def model(x: torch.Tensor, i: int) -> torch.Tensor:
        sigma = sigmas[i]
        return x - sigma * fake_eps(x / math.sqrt(sigma**2 + 1), timesteps[i])

    return sample(name, model, x, sigmas)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= rtol * scale, f"max abs diff {diff:.3g} > {rtol:g} * {scale:.3g}"


def kolors_config(**overrides) -> SchedulerConfig:
    return from_dict(SchedulerConfig, {**KOLORS, **overrides})


def test_embedded_config_is_the_reference():
    path = REFERENCE / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        pytest.skip(f"the Kolors reference folder is absent ({REFERENCE})")
    real = json.loads(path.read_text())
    assert {k: real[k] for k in KOLORS} == KOLORS


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_schedule_matches_diffusers(name, variant):
    """Every step count up to 100 on Kolors' own config, a spread of them on the others (time)."""
    config = {**KOLORS, **VARIANTS[variant]}
    ours_config = from_dict(SchedulerConfig, config)
    ref = reference_scheduler(name, config)
    counts = range(1, 101) if variant == "kolors" else (1, 2, 3, 4, 7, 9, 14, 15, 25, 30, 33, 50, 64, 99, 100)
    for steps in counts:
        ref.set_timesteps(steps)
        s = schedule(ours_config, name, steps)
        assert s.sigmas == tuple(ref.sigmas.tolist()), f"{steps} steps"
        assert s.timesteps == tuple(float(t) for t in ref.timesteps.tolist()), f"{steps} steps"
        assert s.steps == len(ref.timesteps) and s.sigmas[-1] == 0.0
        if name == "euler":
            assert s.init_noise_sigma == float(ref.init_noise_sigma)
        else:  # diffusers starts from N(0, 1) in VP space: sigma_0-scaled noise in ours
            assert ref.init_noise_sigma == 1.0
            assert s.init_noise_sigma == pytest.approx(math.sqrt(s.sigmas[0] ** 2 + 1), rel=1e-12)


def test_dpmpp_karras_range_is_the_training_range():
    """diffusers' DPM-Solver takes the Karras range from all training sigmas, Euler's from the spaced ones."""
    config = kolors_config()
    dpm, euler = (
        schedule(config, "dpmpp-2m", 25),
        schedule(kolors_config(use_karras_sigmas=True), "euler", 25),
    )
    assert dpm.timesteps[0] == 1099.0 and dpm.timesteps[-1] == 0.0
    assert euler.timesteps[0] == 1057.0 and euler.sigmas[0] < dpm.sigmas[0]


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 14, 15, 16, 25, 50])
def test_text_to_image_loop_matches_diffusers(name, steps):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    ref = run_reference(reference_scheduler(name, KOLORS), steps, noise)
    ours = run_ours(name, kolors_config(), steps, noise)
    assert_close(ours, ref)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("variant", ["trailing", "karras", "zero-snr"])
def test_loop_matches_diffusers_on_other_configs(name, variant):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    config = {**KOLORS, **VARIANTS[variant]}
    ref = run_reference(reference_scheduler(name, config), 20, noise)
    assert_close(run_ours(name, from_dict(SchedulerConfig, config), 20, noise), ref)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("strength", [0.3, 0.5, 1.0])
def test_image_to_image_loop_matches_diffusers(name, steps, strength):
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g) * 2, torch.randn(1, 4, 8, 8, generator=g)
    ref = run_reference(reference_scheduler(name, KOLORS), steps, noise, x0, strength)
    ours = run_ours(name, kolors_config(), steps, noise, x0, strength)
    assert_close(ours, ref)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_add_noise_is_diffusers_add_noise_in_ve_space(name):
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ref_scheduler = reference_scheduler(name, KOLORS)
    ref_scheduler.set_timesteps(25)
    s = schedule(kolors_config(), name, 25)
    for start in (0, 5, 17, 24):
        ref_scheduler.set_begin_index(start)
        ref = ref_scheduler.add_noise(x0, noise, ref_scheduler.timesteps[start : start + 1].repeat(2))
        sigma = s.sigmas[start]
        vp_to_ve = 1.0 if name == "euler" else math.sqrt(sigma**2 + 1)
        torch.testing.assert_close(add_noise(x0, noise, sigma), ref * vp_to_ve, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("variant", ["kolors", "trailing"])
def test_img2img_start_is_diffusers_get_timesteps(name, variant):
    """As the img2img pipeline calls it: after retrieve_timesteps, which recounts the steps (trailing spacing
    gives 16 timesteps for 15 steps on 1100 training steps)."""
    config = {**KOLORS, **VARIANTS[variant]}
    scheduler = reference_scheduler(name, config)
    pipe = SimpleNamespace(scheduler=scheduler)
    for steps in (1, 2, 7, 15, 25, 30, 50):
        scheduler.set_timesteps(steps)
        s = schedule(from_dict(SchedulerConfig, config), name, steps)
        for strength in (0.0, 0.05, 0.3, 0.33, 0.5, 0.99, 1.0):
            timesteps, n = KolorsImg2ImgPipeline.get_timesteps(
                pipe, len(scheduler.timesteps), strength, "cpu"
            )
            start = img2img_start(s, strength, steps)
            assert s.timesteps[start:] == tuple(float(t) for t in timesteps.tolist())
            assert s.steps - start == n


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_loops_never_read_tensors_back(name):
    """On the meta device any .item() or tensor-valued branch raises, so this fails on a host sync."""
    s = schedule(kolors_config(), name, 6)
    seen = []

    def model(x, i):
        return torch.tanh(x) * s.sigmas[i]

    x = torch.empty(1, 4, 8, 8, device="meta")
    out = sample(name, model, x, s.sigmas, callback=lambda i, x: seen.append((i, x.device.type)))
    assert out.device.type == "meta" and out.shape == x.shape
    assert seen == [(i, "meta") for i in range(6)]


def test_callback_sees_each_step_and_the_result():
    s = schedule(kolors_config(), "dpmpp-2m", 5)
    seen = []
    out = sample(
        "dpmpp-2m", lambda x, i: 0.5 * x, torch.ones(2), s.sigmas, callback=lambda i, x: seen.append((i, x))
    )
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4] and seen[-1][1] is out


def test_errors():
    config = kolors_config()
    with pytest.raises(ValueError, match="euler, dpmpp-2m"):
        schedule(config, "edm-dpmpp-2m", 25)
    with pytest.raises(ValueError, match="euler, dpmpp-2m"):
        sample("heun", lambda x, i: x, torch.zeros(1), (1.0, 0.0))
    for steps in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            schedule(config, "euler", steps)
    with pytest.raises(ConfigError, match="prediction_type='v_prediction'"):
        kolors_config(prediction_type="v_prediction")
    with pytest.raises(ConfigError, match="timestep_spacing"):
        kolors_config(timestep_spacing="karras")
    with pytest.raises(ConfigError, match="beta_schedule"):
        kolors_config(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ConfigError, match="lacks the field 'beta_end'"):
        from_dict(SchedulerConfig, {k: v for k, v in KOLORS.items() if k != "beta_end"})
    with pytest.raises(ConfigError, match="thresholding"):
        schedule(kolors_config(thresholding=True), "dpmpp-2m", 25)
    s = schedule(config, "euler", 10)
    with pytest.raises(ValueError, match="strength"):
        img2img_start(s, 1.5, 10)
