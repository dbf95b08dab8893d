"""Sigma schedules and samplers as plain functions, reproducing diffusers' schedulers for Kolors.

Two samplers. `euler` is diffusers' EulerDiscreteScheduler built from the model's own scheduler_config.json,
what KolorsPipeline runs by default. `dpmpp-2m` is DPM-Solver++(2M) on Karras sigmas, diffusers'
`DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)`: the 25-step sampler. The Kolors
model card suggests diffusers' EDMDPMSolverMultistepScheduler for 25 steps, but that scheduler feeds EDM
preconditioning (timestep 0.25 * ln(sigma)) to this discrete-time epsilon UNet and gives pure noise
(diffusers issue 8997, Kolors issue 148); the same second-order multistep solver on the model's own
discrete schedule is what actually works in 25 steps, so that is what we offer, and we do not offer EDM.

Everything runs in k-diffusion's variance-exploding space, x = x0 + sigma * noise: diffusers' Euler sample is
already that; DPM-Solver's variance-preserving sample is x / sqrt(sigma^2 + 1), and its update rewritten in
this space is exactly k-diffusion's `sample_dpmpp_2m`. The samplers call `model(x, i) -> denoised x0`, where
i indexes the `sigmas` they were given; the model adapter (the pipeline's) scales the UNet input by
1 / sqrt(sigma^2 + 1) and returns x - sigma * eps, which is diffusers' scale_model_input and predicted x0 for
both schedulers. Sigmas are host floats (float32 values, as diffusers stores them), so no step syncs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kolors.config import ConfigError, check_positive
from kolors.errors import KolorsError

Model = Callable[[Tensor, int], Tensor]  # (x in VE space, step index into sigmas) -> denoised x0
Callback = Callable[[int, Tensor], None]  # (step index, x after that step)


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of scheduler_config.json that shape the schedule; defaults are diffusers' own."""

    num_train_timesteps: int
    beta_start: float
    beta_end: float
    beta_schedule: str
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"
    use_karras_sigmas: bool = False  # Euler only: dpmpp-2m always uses Karras sigmas
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None  # Euler's Karras bounds; DPMSolverMultistepScheduler has no such keys
    sigma_max: float | None = None
    thresholding: bool = False

    def __post_init__(self) -> None:
        check_positive(self, "num_train_timesteps", "beta_start", "beta_end")
        if self.steps_offset < 0:
            raise ConfigError(f"steps_offset={self.steps_offset} must be 0 or more")
        unsupported = {
            "prediction_type": (self.prediction_type, ("epsilon",)),
            "interpolation_type": (self.interpolation_type, ("linear",)),
            "timestep_spacing": (self.timestep_spacing, ("leading", "trailing", "linspace")),
            "timestep_type": (self.timestep_type, ("discrete",)),
            "final_sigmas_type": (self.final_sigmas_type, ("zero",)),
            "use_exponential_sigmas": (self.use_exponential_sigmas, (False,)),
            "use_beta_sigmas": (self.use_beta_sigmas, (False,)),
        }
        if self.trained_betas is None:
            unsupported["beta_schedule"] = (self.beta_schedule, ("linear", "scaled_linear"))
        for key, (value, allowed) in unsupported.items():
            if value not in allowed:
                choices = ", ".join(repr(a) for a in allowed)
                raise ConfigError(
                    f"scheduler config: {key}={value!r} is not supported (supported: {choices})"
                )


@dataclass(frozen=True)
class Schedule:
    """A sampler's noise levels for one step count, in k-diffusion (VE) space."""

    sigmas: tuple[float, ...]  # steps + 1 values, descending, the last 0.0
    timesteps: tuple[float, ...]  # the UNet timestep at each sigmas[i], exactly diffusers' value
    init_noise_sigma: float  # text-to-image starts from N(0, 1) noise times this

    @property
    def steps(self) -> int:
        return len(self.timesteps)


# ------------------------------------------------------------------------------------------ schedules
# These mirror diffusers' set_timesteps operation for operation (float32 torch for the training schedule,
# numpy float64/float32 where diffusers mixes them) so sigmas and timesteps agree to the bit. The tensors are
# built on the CPU on purpose: a schedule is host data, even under a `torch.device(...)` context.


def _train_sigmas(config: SchedulerConfig) -> np.ndarray:
    """sqrt((1 - alphas_cumprod) / alphas_cumprod) for t = 0 .. num_train_timesteps - 1, float32."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32, device="cpu")
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32, device="cpu")
    else:  # scaled_linear, the latent-diffusion schedule
        start, end = config.beta_start**0.5, config.beta_end**0.5
        betas = torch.linspace(start, end, n, dtype=torch.float32, device="cpu") ** 2
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if config.rescale_betas_zero_snr:
        alphas_cumprod[-1] = 2**-24  # near zero so the first sigma stays finite (diffusers' choice)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023 (arXiv:2305.08891), Algorithm 1: zero terminal SNR, the last step pure noise."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def _spaced_timesteps(config: SchedulerConfig, steps: int) -> np.ndarray:
    """Euler's discrete timesteps, descending, spaced as in Table 2 of arXiv:2305.08891."""
    n = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    if config.timestep_spacing == "leading":
        timesteps = (np.arange(0, steps) * (n // steps)).round()[::-1].copy().astype(np.float32)
        return timesteps + config.steps_offset
    ratio = n / steps  # trailing
    return np.arange(n, 0, -ratio).round().copy().astype(np.float32) - 1


def _karras(sigma_max: float, sigma_min: float, steps: int) -> np.ndarray:
    """Karras et al. 2022 (arXiv:2206.00364) eq. 5, rho = 7: steps sigmas from sigma_max down to sigma_min."""
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _sigma_to_t(sigma: np.floating, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of `sigma`, linear in log sigma (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _euler_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """EulerDiscreteScheduler.set_timesteps: the spaced training timesteps and their interpolated sigmas."""
    train_sigmas = _train_sigmas(config)
    timesteps = _spaced_timesteps(config, steps)
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    if config.use_karras_sigmas:
        # Euler's Karras range is that of the spaced sigmas (unless the config pins it), and its timesteps
        # stay fractional.
        sigma_min = config.sigma_min if config.sigma_min is not None else sigmas[-1].item()
        sigma_max = config.sigma_max if config.sigma_max is not None else sigmas[0].item()
        sigmas = _karras(sigma_max, sigma_min, steps)
        log_sigmas = np.log(train_sigmas)
        timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
    sigmas = np.concatenate([sigmas, [0]]).astype(np.float32)
    sigma_max = torch.from_numpy(sigmas).max()
    # "leading" starts from sqrt(sigma_max^2 + 1): the VE sample whose model input has unit variance.
    init = sigma_max if config.timestep_spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    return Schedule(_floats(sigmas), _floats(timesteps.astype(np.float32)), float(init))


def _dpmpp_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """DPMSolverMultistepScheduler.set_timesteps with use_karras_sigmas: Karras sigmas over the whole training
    range (not the spaced one, so timestep_spacing plays no part), timesteps rounded to integers."""
    if config.thresholding:
        raise ConfigError("scheduler config: thresholding=True is not supported by the dpmpp-2m sampler")
    train_sigmas = _train_sigmas(config)
    sigmas = _karras(train_sigmas[-1].item(), train_sigmas[0].item(), steps)
    log_sigmas = np.log(train_sigmas)
    timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas]).round()
    sigmas = np.concatenate([sigmas, [0]]).astype(np.float32)
    # diffusers starts from N(0, 1) in its variance-preserving space, x_vp = x_ve / sqrt(sigma_0^2 + 1).
    init = math.sqrt(float(sigmas[0]) ** 2 + 1)
    return Schedule(_floats(sigmas), _floats(timesteps.astype(np.int64)), init)


def _floats(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


# ------------------------------------------------------------------------------------------- samplers


def sample_euler(
    model: Model, x: Tensor, sigmas: Sequence[float], *, callback: Callback | None = None
) -> Tensor:
    """Euler method (Karras et al. 2022, Algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, i)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback(i, x)
    return x


def sample_dpmpp_2m(
    model: Model, x: Tensor, sigmas: Sequence[float], *, callback: Callback | None = None
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095), as k-diffusion's sample_dpmpp_2m."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, i)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0:
            # diffusers' final step is first order ("zero" final sigma): it lands on the prediction itself.
            x = denoised
        else:
            h = math.log(sigma / sigma_next)  # step in lambda = -log(sigma)
            d = denoised
            if old_denoised is not None:  # first step (of a fresh solver, img2img too) is first order
                r = math.log(sigmas[i - 1] / sigma) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
        old_denoised = denoised
        if callback is not None:
            callback(i, x)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"euler": sample_euler, "dpmpp-2m": sample_dpmpp_2m}
_SCHEDULES: dict[str, Callable[[SchedulerConfig, int], Schedule]] = {
    "euler": _euler_schedule,
    "dpmpp-2m": _dpmpp_schedule,
}


def _check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise KolorsError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def schedule(config: SchedulerConfig, sampler: str, steps: int) -> Schedule:
    """The sigmas, UNet timesteps and initial noise scale diffusers uses for `sampler` at `steps` steps."""
    _check_sampler(sampler)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise KolorsError(f"steps must be a whole number of at least 1, not {steps!r}")
    return _SCHEDULES[sampler](config, steps)


def sample(
    sampler: str, model: Model, x: Tensor, sigmas: Sequence[float], *, callback: Callback | None = None
) -> Tensor:
    """Run sampler `sampler` from x at sigmas[0] down to sigmas[-1] (0): the denoised latents."""
    _check_sampler(sampler)
    return SAMPLERS[sampler](model, x, sigmas, callback=callback)


# ------------------------------------------------------------------------------------------- img2img


def img2img_start(schedule: Schedule, strength: float, steps: int | None = None) -> int:
    """Index of the first step image-to-image keeps, as KolorsImg2ImgPipeline.get_timesteps (both schedulers
    are order 1). Equals the step count, so that no step runs, when int(steps * strength) is 0.

    The count is the schedule's own, as in diffusers, whose retrieve_timesteps replaces the requested
    `steps` by len(timesteps): they differ for "trailing" spacing at some counts (15 gives 16 timesteps)."""
    del steps  # the requested count: only the schedule's is right
    n = schedule.steps
    if not 0.0 <= strength <= 1.0:
        raise KolorsError(f"strength must be between 0 and 1, not {strength!r}")
    init_timestep = min(int(n * strength), n)
    return max(n - init_timestep, 0)


def add_noise(x0: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """The image-to-image start at noise level `sigma`, in VE space. Both diffusers schedulers agree: Euler's
    add_noise is this formula, DPM-Solver's alpha * x0 + alpha * sigma * noise is it times
    alpha = 1 / sqrt(sigma^2 + 1), the VP scaling."""
    return x0 + noise * sigma
