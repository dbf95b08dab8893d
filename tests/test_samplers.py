"""kolors.samplers against diffusers' schedulers: schedules to the bit, whole sampling loops (text-to-image and
image-to-image, stochastic ones on the same generator) with a fake epsilon model."""

from __future__ import annotations

import inspect
import json
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.kolors.pipeline_kolors_img2img import KolorsImg2ImgPipeline, retrieve_timesteps

from kolors.config import ConfigError, from_dict
from kolors.errors import KolorsError
from kolors.noise import randn
from kolors.pipeline import _SigmaGrid
from kolors.samplers import (
    A1111_NAMES,
    DIFFUSERS_CLASSES,
    SAMPLERS,
    SCHEDULES,
    SchedulerConfig,
    add_noise,
    default_sampler,
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

CLASSES = {
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
    "HeunDiscreteScheduler": HeunDiscreteScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "UniPCMultistepScheduler": UniPCMultistepScheduler,
    "DDIMScheduler": DDIMScheduler,
    "LCMScheduler": LCMScheduler,
}
STOCHASTIC = ("euler-a", "dpmpp-2m-sde", "lcm")
MAX_STEPS = {"lcm": 50}


def reference_scheduler(name: str, config: dict, kind: str | None = None):
    """What a diffusers user builds: `Cls.from_config(the model's config, ...)` for sampler `name`."""
    flags = {"use_karras_sigmas": kind == "karras", "use_exponential_sigmas": kind == "exponential"}
    flags = flags if kind else {}
    if name in ("dpmpp-2m", "dpmpp-2m-sde"):
        flags = flags or {"use_karras_sigmas": True}
        flags["algorithm_type"] = "sde-dpmsolver++" if name == "dpmpp-2m-sde" else "dpmsolver++"
    return CLASSES[DIFFUSERS_CLASSES[name]].from_config(config, **flags)


def fake_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic epsilon 'UNet', nonlinear in x and sensitive to a one-unit change of the timestep."""
    t = float(t)
    return torch.tanh(x * (1.0 + 0.5 * math.sin(t / 7.0))) + 0.1 * math.cos(t / 13.0)


def run_reference(scheduler, steps, noise, x0=None, strength=1.0, seed=0, eta=0.0) -> torch.Tensor:
    """diffusers' loop as KolorsPipeline (x0 None) or KolorsImg2ImgPipeline runs it, step noise from `seed`."""
    timesteps, n = retrieve_timesteps(scheduler, steps, "cpu")
    if x0 is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        timesteps, n = KolorsImg2ImgPipeline.get_timesteps(
            SimpleNamespace(scheduler=scheduler), n, strength, "cpu"
        )
        latents = scheduler.add_noise(x0, noise, timesteps[:1]) if len(timesteps) else x0
    params = inspect.signature(scheduler.step).parameters
    extra = {"generator": torch.Generator().manual_seed(seed)} if "generator" in params else {}
    extra.update({"eta": eta} if "eta" in params else {})
    for t in timesteps:
        eps = fake_eps(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents, **extra).prev_sample
    return latents


def run_ours(name, config, steps, noise, x0=None, strength=1.0, seed=0, eta=0.0, kind=None) -> torch.Tensor:
    """Our loop as the pipeline runs it: the schedule's tail at the img2img start, an epsilon adapter that looks
    the timestep up by sigma, step noise from `seed`."""
    plan = schedule(config, name, steps, kind)
    if x0 is not None:
        plan = plan.tail(img2img_start(plan, strength))
    if plan.steps == 0:
        return x0
    x = noise * plan.init_noise_sigma if x0 is None else add_noise(x0, noise, plan.sigmas[0])
    grid, g = _SigmaGrid(plan.sigmas[: len(plan.timesteps)]), torch.Generator().manual_seed(seed)

    def model(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = plan.timesteps[grid.index(sigma)]
        return x - sigma * fake_eps(x / math.sqrt(sigma**2 + 1), t)

    extra = {"eta": eta} if plan.sampler == "ddim" else {}
    out = sample(plan, model, x, noise=lambda shape: randn(shape, g), **extra)
    return out * plan.final_scale


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    assert ref.isfinite().all()
    scale = max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= rtol * scale, f"max abs diff {diff:.3g} > {rtol:g} * {scale:.3g}"


def kolors_config(**overrides) -> SchedulerConfig:
    return SchedulerConfig.from_json({**KOLORS, **overrides})


def reference_arrays(name: str, scheduler) -> tuple[list[float], list[float]]:
    """diffusers' sigmas and timesteps as ours lists them: Heun's inner points once, and for DDIM and LCM, which
    keep no sigmas, sqrt((1 - alpha) / alpha) at each timestep."""
    timesteps = [float(t) for t in scheduler.timesteps.tolist()]
    if name == "heun":
        return scheduler.sigmas.tolist()[::2] + [0.0], timesteps[::2]
    if name in ("ddim", "lcm"):
        a = scheduler.alphas_cumprod
        sigmas = [((1 - a[int(t)]) / a[int(t)]) ** 0.5 for t in scheduler.timesteps]
        return [float(s) for s in sigmas], timesteps
    return scheduler.sigmas.tolist(), timesteps


def skip_unsupported(name: str, variant: str) -> None:
    if variant == "zero-snr" and name in ("ddim", "lcm"):
        pytest.skip("refused with a ConfigError (test_errors): diffusers' images are inf")


def test_embedded_config_is_the_reference():
    path = REFERENCE / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        pytest.skip(f"the Kolors reference folder is absent ({REFERENCE})")
    real = json.loads(path.read_text())
    assert {k: real[k] for k in KOLORS} == KOLORS


def test_names_for_the_faces():
    assert set(A1111_NAMES) == set(SAMPLERS) == set(DIFFUSERS_CLASSES) and SCHEDULES == (
        "karras",
        "exponential",
    )
    assert A1111_NAMES["euler-a"] == "Euler a" and A1111_NAMES["dpmpp-2m-sde"] == "DPM++ 2M SDE Karras"


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_schedule_matches_diffusers(name, variant):
    """Every step count up to 100 (lcm: 50) on Kolors' own config, a spread of them on the others (time)."""
    skip_unsupported(name, variant)
    config = {**KOLORS, **VARIANTS[variant]}
    ours_config = SchedulerConfig.from_json(config)
    ref = reference_scheduler(name, config)
    top = MAX_STEPS.get(name, 100)
    spread = (1, 2, 3, 4, 7, 9, 14, 15, 25, 30, 33, 50, 64, 99, 100)
    for steps in range(1, top + 1) if variant == "kolors" else [s for s in spread if s <= top]:
        ref.set_timesteps(steps)
        s = schedule(ours_config, name, steps)
        sigmas, timesteps = reference_arrays(name, ref)
        # DDIM's last step goes to the final alpha (set_alpha_to_one: 1, else the first one's)
        if name == "ddim":
            sigmas.append(float(((1 - ref.final_alpha_cumprod) / ref.final_alpha_cumprod) ** 0.5))
        elif name == "lcm":
            sigmas.append(0.0)
        assert list(s.sigmas) == sigmas, f"{steps} steps"
        assert list(s.timesteps) == timesteps, f"{steps} steps"
        assert s.steps == len(s.timesteps) and s.sampler == name
        if name in ("euler", "euler-a", "heun"):
            assert s.init_noise_sigma == float(ref.init_noise_sigma)
        else:  # diffusers starts from N(0, 1) in VP space: sigma_0-scaled noise in ours
            assert ref.init_noise_sigma == 1.0
            assert s.init_noise_sigma == pytest.approx(math.sqrt(s.sigmas[0] ** 2 + 1), rel=1e-12)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp-2m", "dpmpp-2m-sde", "unipc"])
@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedule_kinds_match_diffusers_flags(name, kind):
    ref = reference_scheduler(name, KOLORS, kind)
    for steps in (1, 2, 5, 15, 25, 50):
        ref.set_timesteps(steps)
        s = schedule(kolors_config(), name, steps, kind)
        sigmas, timesteps = reference_arrays(name, ref)
        assert list(s.sigmas) == sigmas and list(s.timesteps) == timesteps, f"{steps} steps"


def test_dpmpp_karras_range_is_the_training_range():
    """diffusers' DPM-Solver takes the Karras range from all training sigmas, Euler's from the spaced ones."""
    dpm, euler = schedule(kolors_config(), "dpmpp-2m", 25), schedule(kolors_config(), "euler", 25, "karras")
    assert dpm.timesteps[0] == 1099.0 and dpm.timesteps[-1] == 0.0
    assert euler.timesteps[0] == 1057.0 and euler.sigmas[0] < dpm.sigmas[0]


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("variant", ["kolors", "trailing", "linspace"])
def test_sigma_grid_gives_every_timestep(name, variant):
    """The denoiser's sigma -> timestep lookup, evaluated in the sampler's order, is diffusers' timestep at every
    step (a sigma may repeat: DDIM's trailing -1 has the first step's sigma)."""
    config = kolors_config(**VARIANTS[variant])
    for steps in range(1, MAX_STEPS.get(name, 100) + 1):
        s = schedule(config, name, steps)
        grid = _SigmaGrid(s.sigmas[: len(s.timesteps)])
        assert [s.timesteps[grid.index(sigma)] for sigma in s.sigmas[:-1]] == list(s.timesteps)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 14, 15, 16, 25, 50])
def test_text_to_image_loop_matches_diffusers(name, steps):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    ref = run_reference(reference_scheduler(name, KOLORS), steps, noise, seed=steps)
    assert_close(run_ours(name, kolors_config(), steps, noise, seed=steps), ref)


@pytest.mark.parametrize("variant", ["kolors", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [4, 15, 25])
def test_ddim_with_eta_matches_diffusers(variant, steps):
    config = {**KOLORS, **VARIANTS[variant]}
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    for eta in (0.5, 1.0):
        ref = run_reference(reference_scheduler("ddim", config), steps, noise, seed=3, eta=eta)
        assert_close(run_ours("ddim", SchedulerConfig.from_json(config), steps, noise, seed=3, eta=eta), ref)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("variant", ["trailing", "linspace", "karras", "zero-snr", "sd-linear"])
def test_loop_matches_diffusers_on_other_configs(name, variant):
    skip_unsupported(name, variant)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    config = {**KOLORS, **VARIANTS[variant]}
    ref = run_reference(reference_scheduler(name, config), 20, noise, seed=2)
    assert_close(run_ours(name, SchedulerConfig.from_json(config), 20, noise, seed=2), ref)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp-2m", "dpmpp-2m-sde", "unipc"])
@pytest.mark.parametrize("kind", SCHEDULES)
def test_loop_with_schedule_kind_matches_diffusers(name, kind):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ref = run_reference(reference_scheduler(name, KOLORS, kind), 12, noise, seed=5)
    assert_close(run_ours(name, kolors_config(), 12, noise, seed=5, kind=kind), ref)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [10, 15, 25])
@pytest.mark.parametrize("strength", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("variant", ["kolors", "trailing"])
def test_image_to_image_loop_matches_diffusers(name, steps, strength, variant):
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g) * 2, torch.randn(1, 4, 8, 8, generator=g)
    config = {**KOLORS, **VARIANTS[variant]}
    ref = run_reference(reference_scheduler(name, config), steps, noise, x0, strength, seed=8)
    ours = run_ours(name, SchedulerConfig.from_json(config), steps, noise, x0, strength, seed=8)
    assert_close(ours, ref)


@pytest.mark.parametrize("name", SAMPLERS)
def test_add_noise_is_diffusers_add_noise_in_ve_space(name):
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ref_scheduler = reference_scheduler(name, KOLORS)
    ref_scheduler.set_timesteps(25)
    s = schedule(kolors_config(), name, 25)
    for start in (0, 5, 17, 24):
        index = start * ref_scheduler.order
        if hasattr(ref_scheduler, "set_begin_index"):
            ref_scheduler.set_begin_index(index)
        ref = ref_scheduler.add_noise(x0, noise, ref_scheduler.timesteps[index : index + 1].repeat(2))
        sigma = s.sigmas[start]
        vp_to_ve = 1.0 if name in ("euler", "euler-a", "heun") else math.sqrt(sigma**2 + 1)
        torch.testing.assert_close(add_noise(x0, noise, sigma), ref * vp_to_ve, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("variant", ["kolors", "trailing"])
def test_img2img_start_is_diffusers_get_timesteps(name, variant):
    """As the img2img pipeline calls it: retrieve_timesteps passes the requested count through (trailing spacing
    gives 16 timesteps for 15 steps on 1100 training steps), get_timesteps slices `order` per step."""
    config = {**KOLORS, **VARIANTS[variant]}
    scheduler = reference_scheduler(name, config)
    pipe = SimpleNamespace(scheduler=scheduler)
    for steps in (1, 2, 7, 15, 25, 30, 50):
        timesteps, n = retrieve_timesteps(scheduler, steps, "cpu")
        s = schedule(SchedulerConfig.from_json(config), name, steps)
        for strength in (0.0, 0.05, 0.3, 0.33, 0.5, 0.99, 1.0):
            timesteps, n = KolorsImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
            tail = s.tail(img2img_start(s, strength))
            ref = [float(t) for t in timesteps.tolist()]
            assert list(tail.timesteps) == (ref[::2] if name == "heun" else ref), (steps, strength)


@pytest.mark.parametrize("name", SAMPLERS)
def test_loops_never_read_tensors_back(name):
    """On the meta device any .item() or tensor-valued branch raises, so this fails on a host sync."""
    s = schedule(kolors_config(), name, 6)
    seen = []

    def model(x, sigma):
        return torch.tanh(x) * sigma

    x = torch.empty(1, 4, 8, 8, device="meta")
    noise = lambda shape: torch.empty(shape, device="meta")  # noqa: E731
    extra = {"eta": 1.0} if name == "ddim" else {}
    callback = lambda i, n, x, d: seen.append((i, n, x.device.type, d.device.type))  # noqa: E731
    out = sample(s, model, x, callback=callback, noise=noise, **extra)
    assert out.device.type == "meta" and out.shape == x.shape
    assert seen == [(i, 6, "meta", "meta") for i in range(6)]


@pytest.mark.parametrize("name", SAMPLERS)
def test_heun_evaluates_between_steps_and_callback_sees_each_step(name):
    s = schedule(kolors_config(), name, 5)
    seen, calls = [], []

    def model(x, sigma):
        calls.append(sigma)
        return 0.5 * x

    out = sample(s, model, torch.ones(2), callback=lambda i, n, x, d: seen.append((i, n, x, d)))
    assert [(i, n) for i, n, *_ in seen] == [(k, 5) for k in range(5)] and seen[-1][2] is out
    # Heun evaluates every inner grid point twice (end of one step, start of the next); the others once each
    expected = (
        [s.sigmas[0]] + [v for v in s.sigmas[1:-1] for _ in range(2)] if name == "heun" else s.sigmas[:-1]
    )
    assert calls == list(expected)


@pytest.mark.parametrize(
    "class_name, flags, sampler",
    [
        ("EulerDiscreteScheduler", {}, "euler"),
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler"),
        ("EulerAncestralDiscreteScheduler", {}, "euler-a"),
        ("HeunDiscreteScheduler", {"use_exponential_sigmas": True}, "heun"),
        ("DPMSolverMultistepScheduler", {}, "dpmpp-2m"),
        ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "solver_order": 1}, "dpmpp-2m"),
        (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
            "dpmpp-2m-sde",
        ),
        ("UniPCMultistepScheduler", {"use_karras_sigmas": True}, "unipc"),
        ("UniPCMultistepScheduler", {"solver_order": 3}, "unipc"),
        ("DDIMScheduler", {"set_alpha_to_one": True}, "ddim"),
        ("LCMScheduler", {}, "lcm"),
    ],
)
def test_the_model_folder_class_and_flags_choose_the_default(class_name, flags, sampler):
    """sampler=None is diffusers' from_pretrained of the folder: its class, with all the config's flags."""
    config = {**KOLORS, **flags, "_class_name": class_name}
    ours_config = SchedulerConfig.from_json(config)
    assert default_sampler(ours_config) == sampler
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    ref = run_reference(CLASSES[class_name].from_config(config), 12, noise, seed=1)
    assert_close(run_ours(None, ours_config, 12, noise, seed=1), ref)


def test_explicit_dpmpp_2m_keeps_karras_sigmas_on_a_dpm_config():
    config = kolors_config(_class_name="DPMSolverMultistepScheduler")
    assert schedule(config, "dpmpp-2m", 10).timesteps[0] == 1099.0  # Karras: the whole training range
    assert schedule(config, None, 10).timesteps != schedule(config, "dpmpp-2m", 10).timesteps


def test_errors():
    config = kolors_config()
    known = "euler, euler-a, heun, dpmpp-2m, dpmpp-2m-sde, unipc, ddim, lcm"
    with pytest.raises(KolorsError, match=f"unknown sampler 'edm-dpmpp-2m'; choose one of: {known}"):
        schedule(config, "edm-dpmpp-2m", 25)
    with pytest.raises(KolorsError, match="unknown sampler 'dpm'"):
        sample("dpm", lambda x, s: x, torch.zeros(1), (1.0, 0.0))
    with pytest.raises(KolorsError, match="unknown schedule 'beta'; choose one of: karras, exponential"):
        schedule(config, "euler", 25, "beta")
    with pytest.raises(KolorsError, match="sampler euler-a has no karras schedule"):
        schedule(config, "euler-a", 25, "karras")
    for steps in (0, -1, 2.5, True):
        with pytest.raises(KolorsError, match="steps"):
            schedule(config, "euler", steps)
    with pytest.raises(KolorsError, match="lcm takes at most 50 steps"):
        schedule(config, "lcm", 51)
    with pytest.raises(
        KolorsError, match="PNDMScheduler has no kolors sampler; pass sampler= one of: euler, "
    ):
        schedule(kolors_config(_class_name="PNDMScheduler"), None, 25)
    with pytest.raises(KolorsError, match="algorithm_type='dpmsolver'"):
        default_sampler(kolors_config(_class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver"))
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
    with pytest.raises(ConfigError, match=r"clip_sample=True is not supported by ddim \(DDIMScheduler\)"):
        schedule(
            SchedulerConfig.from_json({k: v for k, v in KOLORS.items() if k != "clip_sample"}), "ddim", 25
        )
    with pytest.raises(ConfigError, match="solver_type='bh1' is not supported by unipc"):
        schedule(kolors_config(solver_type="bh1"), "unipc", 25)
    for name in ("ddim", "lcm"):  # diffusers' images are inf there (alphas_cumprod reaches 0)
        with pytest.raises(ConfigError, match=f"rescale_betas_zero_snr=True is not supported by {name}"):
            schedule(kolors_config(**VARIANTS["zero-snr"]), name, 25)
    with pytest.raises(ConfigError, match="solver_order=3 is not supported by dpmpp-2m"):
        schedule(kolors_config(solver_order=3), "dpmpp-2m", 25)
    s = schedule(config, "euler", 10)
    with pytest.raises(KolorsError, match="strength"):
        img2img_start(s, 1.5)


def test_continuous_timestep_type_is_ignored_for_epsilon_models():
    """diffusers reads timestep_type="continuous" only for v-prediction."""
    ref = EulerDiscreteScheduler.from_config({**KOLORS, "timestep_type": "continuous"})
    ref.set_timesteps(10)
    s = schedule(kolors_config(timestep_type="continuous"), "euler", 10)
    assert (
        list(s.timesteps) == ref.timesteps.tolist() == list(schedule(kolors_config(), "euler", 10).timesteps)
    )


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_step_count_gives_finite_latents(name):
    """1..100 steps (lcm: its 50) text-to-image, a spread of them image-to-image, on Kolors' config."""
    config, g = kolors_config(), torch.Generator().manual_seed(0)
    noise, x0 = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    for steps in range(1, MAX_STEPS.get(name, 100) + 1):
        for image in (None, x0) if steps % 9 in (0, 1) else (None,):
            out = run_ours(
                name, config, steps, noise, image, strength=0.5, eta=1.0 if name == "ddim" else 0.0
            )
            assert out.isfinite().all(), f"{steps} steps, {'image' if image is not None else 'text'} to image"
