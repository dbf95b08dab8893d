"""Sigma schedules and samplers as plain functions, reproducing diffusers' schedulers for Kolors.

Each sampler is the diffusers scheduler a Kolors user picks, built with `Cls.from_config(model's config, ...)`:

    euler         EulerDiscreteScheduler (what the Kolors config names, so the default)
    euler-a       EulerAncestralDiscreteScheduler
    heun          HeunDiscreteScheduler
    dpmpp-2m      DPMSolverMultistepScheduler(use_karras_sigmas=True)
    dpmpp-2m-sde  DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    unipc         UniPCMultistepScheduler
    ddim          DDIMScheduler
    lcm           LCMScheduler (for LCM-distilled UNets)

We do not offer EDMDPMSolverMultistepScheduler, which the Kolors model card suggests: it feeds EDM preconditioning
(timestep 0.25 * ln(sigma)) to this discrete-time epsilon UNet and gives pure noise (diffusers issue 8997, Kolors
issue 148); dpmpp-2m on Karras sigmas is the 25-step sampler that works.

Everything runs in k-diffusion's variance-exploding space, x = x0 + sigma * noise. diffusers' Euler family keeps
its sample in that space already; the others (DPM-Solver, UniPC, DDIM, LCM) keep x / sqrt(sigma^2 + 1), and their
updates rewritten in this space are k-diffusion's (DPM-Solver++(2M) is `sample_dpmpp_2m`, DDIM is Euler, LCM is
`sample_lcm`). A sampler calls `model(x, sigma) -> denoised x0` at the sigmas it chooses (Heun between two grid
points), and reports each step as `callback(step, num_steps, x, denoised)`. The model adapter (the pipeline's)
maps a sigma to diffusers' UNet timestep for it, scales the UNet input by 1 / sqrt(sigma^2 + 1) and returns
x - sigma * eps: diffusers' scale_model_input and predicted x0 for every one of these schedulers. Stochastic
samplers draw their noise through `noise(shape)`, which the pipeline builds from the call's generator so that the
draws come in diffusers' order. Sigmas are host floats (float32 values, as diffusers stores them), so no step
syncs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from kolors.config import ConfigError, check_positive, from_dict, read_json
from kolors.errors import KolorsError

Model = Callable[[Tensor, float], Tensor]  # (x in VE space, sigma) -> denoised x0
Callback = Callable[[int, int, Tensor, Tensor], None]  # (step, num_steps, x after the step, its denoised)
Noise = Callable[[Sequence[int]], Tensor]  # shape -> standard normal noise, drawn as diffusers draws it
# (x at a grid sigma, sigma) -> x as the pipeline constrains it there: inpainting with a 4-channel UNet puts the
# known region back, noised to sigma. Applied where diffusers' inpaint pipelines blend: after every step but the
# last, and to Heun's intermediate point (which diffusers' scheduler returns as a step of its own).
Keep = Callable[[Tensor, float], Tensor]

SAMPLERS = ("euler", "euler-a", "heun", "dpmpp-2m", "dpmpp-2m-sde", "unipc", "ddim", "lcm")
SCHEDULES = ("karras", "exponential")
# What AUTOMATIC1111 calls each sampler (with its default schedule), for the faces to list.
A1111_NAMES = {
    "euler": "Euler",
    "euler-a": "Euler a",
    "heun": "Heun",
    "dpmpp-2m": "DPM++ 2M Karras",
    "dpmpp-2m-sde": "DPM++ 2M SDE Karras",
    "unipc": "UniPC",
    "ddim": "DDIM",
    "lcm": "LCM",
}
# The diffusers scheduler each sampler reproduces; the model folder's class picks the default sampler.
DIFFUSERS_CLASSES = {
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp-2m": "DPMSolverMultistepScheduler",
    "dpmpp-2m-sde": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "ddim": "DDIMScheduler",
    "lcm": "LCMScheduler",
}
_SIGMA_FLAGS = {"euler", "heun", "dpmpp-2m", "dpmpp-2m-sde", "unipc"}  # diffusers has use_karras_sigmas there
_VP = {"dpmpp-2m", "dpmpp-2m-sde", "unipc", "ddim", "lcm"}  # diffusers keeps x / sqrt(sigma^2 + 1)
NOISE_IN_FLOAT32 = {"dpmpp-2m-sde"}  # the others draw step noise in the model's dtype, as diffusers does
_PER_STEP = {"targets", "skips"}  # sampler options with one value per step
LCM_WARN_GUIDANCE, LCM_WARN_STEPS = 2.0, 16  # past these, lcm is most likely on a model not distilled for it


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of scheduler_config.json that shape the schedule. None means the default of the scheduler
    class it is loaded into, as `Cls.from_config(config)` would fill it in; the others are diffusers' defaults."""

    num_train_timesteps: int
    beta_start: float
    beta_end: float
    beta_schedule: str
    class_name: str | None = None  # the diffusers class the model folder names
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    timestep_spacing: str | None = None  # linspace, but leading for DDIM and LCM
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None  # a pinned range for Karras and exponential sigmas
    sigma_max: float | None = None
    thresholding: bool = False
    clip_sample: bool | None = None  # True for DDIM, False elsewhere
    set_alpha_to_one: bool | None = None  # True for DDIM and LCM
    # DPM-Solver and UniPC
    algorithm_type: str = "dpmsolver++"
    solver_order: int = 2
    solver_type: str | None = None  # midpoint for DPM-Solver, bh2 for UniPC
    lower_order_final: bool = True
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    predict_x0: bool = True
    disable_corrector: tuple[int, ...] = ()
    # LCM
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0

    def __post_init__(self) -> None:
        check_positive(self, "num_train_timesteps", "beta_start", "beta_end")
        if self.steps_offset < 0:
            raise ConfigError(f"steps_offset={self.steps_offset} must be 0 or more")
        unsupported = {
            "prediction_type": (self.prediction_type, ("epsilon",)),
            "interpolation_type": (self.interpolation_type, ("linear",)),
            "timestep_spacing": (self.timestep_spacing, (None, "leading", "trailing", "linspace")),
            # diffusers reads "continuous" only for v-prediction; an epsilon model ignores it
            "timestep_type": (self.timestep_type, ("discrete", "continuous")),
            "final_sigmas_type": (self.final_sigmas_type, ("zero",)),
            "use_beta_sigmas": (self.use_beta_sigmas, (False,)),
        }
        if self.trained_betas is None:
            unsupported["beta_schedule"] = (self.beta_schedule, ("linear", "scaled_linear"))
        for key, (value, allowed) in unsupported.items():
            if value not in allowed:
                choices = ", ".join(repr(a) for a in allowed if a is not None)
                raise ConfigError(
                    f"scheduler config: {key}={value!r} is not supported (supported: {choices})"
                )
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise ConfigError("scheduler config: use_karras_sigmas and use_exponential_sigmas are both set")

    @classmethod
    def from_json(cls, data: dict, source: str = "scheduler config") -> SchedulerConfig:
        """From scheduler_config.json's contents; its `_class_name` becomes `class_name`."""
        return from_dict(cls, {**data, "class_name": data.get("_class_name")}, source=source)


def load_scheduler_config(path) -> SchedulerConfig:
    return SchedulerConfig.from_json(read_json(path), source=str(path))


@dataclass(frozen=True)
class Schedule:
    """What one call samples with: the sampler, its noise levels in k-diffusion (VE) space, diffusers' UNet
    timestep at each of them, and the sampler's options."""

    sampler: str
    sigmas: tuple[float, ...]  # steps + 1 values, descending; the last is 0.0 except for DDIM's final alpha
    timesteps: tuple[float, ...]  # the UNet timestep at each sigmas[i], exactly diffusers' value
    init_noise_sigma: float  # text-to-image starts from N(0, 1) noise times this
    requested: int  # the step count asked for (diffusers' image-to-image counts with it)
    final_scale: float = 1.0  # the latents are x * final_scale (VP samplers ending above sigma 0: DDIM)
    options: tuple[tuple[str, object], ...] = field(default=())  # keyword arguments of the sampler

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def tail(self, start: int) -> Schedule:
        """The schedule from step `start` on (image-to-image), per-step options sliced alike."""
        options = tuple((k, v[start:] if k in _PER_STEP else v) for k, v in self.options)
        return replace(self, sigmas=self.sigmas[start:], timesteps=self.timesteps[start:], options=options)


# ------------------------------------------------------------------------------------------ choosing


def default_sampler(config: SchedulerConfig) -> str:
    """The sampler for the diffusers class the model folder names (its flags hold: see `schedule`)."""
    name = config.class_name or "EulerDiscreteScheduler"
    if name == "DPMSolverMultistepScheduler":
        kinds = {"dpmsolver++": "dpmpp-2m", "sde-dpmsolver++": "dpmpp-2m-sde"}
        if config.algorithm_type not in kinds:
            raise KolorsError(
                f"the model's DPMSolverMultistepScheduler has algorithm_type={config.algorithm_type!r}, which kolors "
                "has no sampler for (it has dpmsolver++ and sde-dpmsolver++); pass sampler= one of: "
                + ", ".join(SAMPLERS)
            )
        return kinds[config.algorithm_type]
    for sampler, cls in DIFFUSERS_CLASSES.items():
        if cls == name:
            return sampler
    raise KolorsError(
        f"the model's scheduler {name} has no kolors sampler; pass sampler= one of: {', '.join(SAMPLERS)}"
    )


def check_sampler(sampler: str | None, kind: str | None = None) -> None:
    """A one-line error for an unknown sampler or schedule, or a schedule the sampler's scheduler lacks."""
    if sampler is not None and sampler not in SAMPLERS:
        raise KolorsError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if kind is not None and kind not in SCHEDULES:
        raise KolorsError(f"unknown schedule {kind!r}; choose one of: {', '.join(SCHEDULES)} (or None)")
    if kind is not None and sampler is not None and sampler not in _SIGMA_FLAGS:
        raise KolorsError(
            f"sampler {sampler} has no {kind} schedule (diffusers' {DIFFUSERS_CLASSES[sampler]} has none); "
            f"samplers with one: {', '.join(s for s in SAMPLERS if s in _SIGMA_FLAGS)}"
        )


def _spacing_of(config: SchedulerConfig, sampler: str, explicit: bool, kind: str | None) -> str | None:
    """'karras', 'exponential' or None (the spaced training timesteps), as diffusers' flags would say."""
    if kind is not None:
        return kind
    if sampler not in _SIGMA_FLAGS:
        return None
    if explicit and sampler in ("dpmpp-2m", "dpmpp-2m-sde"):
        return "karras"  # the names say Karras: from_config(config, use_karras_sigmas=True)
    if config.use_karras_sigmas:
        return "karras"
    return "exponential" if config.use_exponential_sigmas else None


def schedule(config: SchedulerConfig, sampler: str | None, steps: int, kind: str | None = None) -> Schedule:
    """The sampler, sigmas, UNet timesteps and initial noise scale diffusers uses for `steps` steps.

    `sampler=None` is the model folder's own scheduler with all its flags (diffusers' from_pretrained); a named
    sampler is its scheduler `from_config` the model's config, with Karras sigmas for the dpmpp ones. `kind` is
    the sigma schedule ("karras", "exponential"; None: the sampler's default)."""
    check_sampler(sampler, kind)
    explicit = sampler is not None
    sampler = sampler if explicit else default_sampler(config)
    check_sampler(sampler, kind)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise KolorsError(f"steps must be a whole number of at least 1, not {steps!r}")
    _check_config(config, sampler)
    spacing = _spacing_of(config, sampler, explicit, kind)
    if sampler in ("euler", "euler-a", "heun"):
        return _euler_schedule(config, sampler, steps, spacing)
    if sampler == "ddim":
        return _ddim_schedule(config, steps)
    if sampler == "lcm":
        return _lcm_schedule(config, steps)
    return _multistep_schedule(config, sampler, steps, spacing)


def _check_config(config: SchedulerConfig, sampler: str) -> None:
    """The flags of the sampler's diffusers class that kolors implements only at their usual values."""
    allowed: dict[str, tuple] = {"thresholding": (False,)}
    if sampler in ("heun", "ddim", "lcm"):
        allowed["clip_sample"] = (False,)
    if sampler in ("ddim", "lcm"):  # their alphas_cumprod reaches 0: an epsilon model's first x0 is inf
        allowed["rescale_betas_zero_snr"] = (False,)
    if sampler in ("dpmpp-2m", "dpmpp-2m-sde"):
        allowed.update(solver_order=(1, 2), lambda_min_clipped=(-math.inf,), variance_type=(None,))
        allowed.update(use_lu_lambdas=(False,))
    if sampler == "unipc":
        allowed.update(predict_x0=(True,), lower_order_final=(True,), disable_corrector=((),))
        allowed.update(use_flow_sigmas=(False,))
        # bh1's B(h) = -h is infinite on the last step to sigma 0: diffusers' images are NaN
        allowed["solver_type"] = (None, "bh2", "midpoint", "heun", "logrho")
    for key, ok in allowed.items():
        value = _clip_sample(config, sampler) if key == "clip_sample" else getattr(config, key)
        if value not in ok:
            raise ConfigError(
                f"scheduler config: {key}={value!r} is not supported by {sampler} ({DIFFUSERS_CLASSES[sampler]})"
            )


def _clip_sample(config: SchedulerConfig, sampler: str) -> bool:
    return config.clip_sample if config.clip_sample is not None else sampler == "ddim"


# ------------------------------------------------------------------------------------------ schedules
# These mirror diffusers' set_timesteps operation for operation (float32 torch for the training schedule,
# numpy float64/float32 where diffusers mixes them) so sigmas and timesteps agree to the bit. The tensors are
# built on the CPU on purpose: a schedule is host data, even under a `torch.device(...)` context.


def _train_sigmas(config: SchedulerConfig) -> np.ndarray:
    """sqrt((1 - alphas_cumprod) / alphas_cumprod) for t = 0 .. num_train_timesteps - 1, float32."""
    alphas_cumprod = train_alphas_cumprod(config)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def train_alphas_cumprod(config: SchedulerConfig) -> Tensor:
    """The training schedule's cumulative alphas (num_train_timesteps,), float32 on the CPU, as diffusers'
    schedulers compute them: what a trainer adds noise with (x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise)."""
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
    return alphas_cumprod


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
    """The Euler family's float32 timesteps, descending, spaced as in Table 2 of arXiv:2305.08891."""
    n = config.num_train_timesteps
    spacing = config.timestep_spacing or "linspace"
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        timesteps = (np.arange(0, steps) * (n // steps)).round()[::-1].copy().astype(np.float32)
        return timesteps + config.steps_offset
    ratio = n / steps  # trailing
    return np.arange(n, 0, -ratio).round().copy().astype(np.float32) - 1


def _multistep_timesteps(config: SchedulerConfig, steps: int) -> np.ndarray:
    """DPM-Solver's and UniPC's int64 timesteps: steps + 1 points with the last (0) dropped."""
    n = config.num_train_timesteps
    spacing = config.timestep_spacing or "linspace"
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = n // (steps + 1)
        timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        return timesteps + config.steps_offset
    return np.arange(n, 0, -n / steps).round().copy().astype(np.int64) - 1


def _karras(sigma_max: float, sigma_min: float, steps: int) -> np.ndarray:
    """Karras et al. 2022 (arXiv:2206.00364) eq. 5, rho = 7: steps sigmas from sigma_max down to sigma_min."""
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _exponential(sigma_max: float, sigma_min: float, steps: int) -> np.ndarray:
    """Sigmas evenly spaced in log sigma (diffusers' _convert_to_exponential)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))


def _convert(config: SchedulerConfig, spacing: str, high: float, low: float, steps: int) -> np.ndarray:
    """Karras or exponential sigmas over [low, high], unless the config pins the range."""
    sigma_min = config.sigma_min if config.sigma_min is not None else low
    sigma_max = config.sigma_max if config.sigma_max is not None else high
    return (_karras if spacing == "karras" else _exponential)(sigma_max, sigma_min, steps)


def _sigma_to_t(sigma: np.floating, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of `sigma`, linear in log sigma (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _euler_schedule(config: SchedulerConfig, sampler: str, steps: int, spacing: str | None) -> Schedule:
    """Euler(Ancestral)DiscreteScheduler and HeunDiscreteScheduler.set_timesteps: the spaced training timesteps
    and their interpolated sigmas (Heun's arrays are these with each inner point doubled)."""
    # HeunDiscreteScheduler has no rescale_betas_zero_snr: from_config drops it
    heun_config = replace(config, rescale_betas_zero_snr=False) if sampler == "heun" else config
    train_sigmas = _train_sigmas(heun_config)
    timesteps = _spaced_timesteps(config, steps)
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    if spacing is not None:
        # The range is that of the spaced sigmas (unless the config pins it); the timesteps stay fractional.
        sigmas = _convert(config, spacing, sigmas[0].item(), sigmas[-1].item(), steps)
        log_sigmas = np.log(train_sigmas)
        timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
    sigmas = np.concatenate([sigmas, [0]]).astype(np.float32)
    sigma_max = torch.from_numpy(sigmas).max()
    # "leading" starts from sqrt(sigma_max^2 + 1): the VE sample whose model input has unit variance.
    spaced = (config.timestep_spacing or "linspace") in ("linspace", "trailing")
    init = sigma_max if spaced else (sigma_max**2 + 1) ** 0.5
    return Schedule(sampler, _floats(sigmas), _floats(timesteps.astype(np.float32)), float(init), steps)


def _multistep_schedule(config: SchedulerConfig, sampler: str, steps: int, spacing: str | None) -> Schedule:
    """DPMSolverMultistepScheduler and UniPCMultistepScheduler.set_timesteps. Karras and exponential sigmas span
    the whole training range (not the spaced one); Karras timesteps are rounded, exponential ones truncated (the
    int64 cast)."""
    train_sigmas = _train_sigmas(config)
    log_sigmas = np.log(train_sigmas)
    if spacing is None:
        timesteps = _multistep_timesteps(config, steps)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    else:
        sigmas = _convert(config, spacing, train_sigmas[-1].item(), train_sigmas[0].item(), steps)
        timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        timesteps = timesteps.round() if spacing == "karras" else timesteps
    sigmas = np.concatenate([sigmas, [0]]).astype(np.float32)
    # diffusers starts from N(0, 1) in its variance-preserving space, x_vp = x_ve / sqrt(sigma_0^2 + 1).
    init = math.sqrt(float(sigmas[0]) ** 2 + 1)
    if sampler == "unipc":
        options = (("order", config.solver_order), ("solver", "bh2"))  # diffusers maps the DPM names to bh2
    else:
        solver = "heun" if config.solver_type == "heun" else "midpoint"  # likewise, UniPC's names to midpoint
        options = (("order", config.solver_order), ("solver", solver))
    timesteps = torch.from_numpy(timesteps).to(torch.int64).numpy()  # truncates, as diffusers' cast does
    return Schedule(sampler, _floats(sigmas), _floats(timesteps), init, steps, options=options)


def _vp_start(sigmas: Sequence[float]) -> float:
    return math.sqrt(sigmas[0] ** 2 + 1)


def _ddim_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """DDIMScheduler.set_timesteps. Each step goes from timestep t to t - num_train_timesteps // steps (the final
    alpha below 0), which for "linspace" and "trailing" spacing is not the next timestep: `targets`."""
    n = config.num_train_timesteps
    if steps > n:
        raise KolorsError(f"ddim takes at most {n} steps (the model's training steps), not {steps}")
    spacing = config.timestep_spacing or "leading"
    if spacing == "linspace":
        timesteps = np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        timesteps = (np.arange(0, steps) * (n // steps)).round()[::-1].copy().astype(np.int64)
        timesteps += config.steps_offset
    else:
        timesteps = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    train_sigmas = _train_sigmas(config)
    set_alpha_to_one = config.set_alpha_to_one if config.set_alpha_to_one is not None else True
    final = 0.0 if set_alpha_to_one else float(train_sigmas[0])
    prev = timesteps - n // steps
    targets = tuple(float(train_sigmas[p]) if p >= 0 else final for p in prev)
    sigmas = tuple(float(train_sigmas[t]) for t in timesteps) + (targets[-1],)
    options = () if targets == sigmas[1:] else (("targets", targets),)
    final_scale = 1 / math.sqrt(sigmas[-1] ** 2 + 1)
    return Schedule("ddim", sigmas, _floats(timesteps), _vp_start(sigmas), steps, final_scale, options)


def _lcm_schedule(config: SchedulerConfig, steps: int) -> Schedule:
    """LCMScheduler.set_timesteps: `steps` of the distillation's `original_inference_steps` timesteps, and the
    consistency model's boundary condition (c_skip, c_out) at each."""
    original = config.original_inference_steps
    if steps > original:
        raise KolorsError(
            f"lcm takes at most {original} steps (the distillation's original_inference_steps), not {steps}"
        )
    k = config.num_train_timesteps // original
    origin = (np.asarray(list(range(1, original + 1))) * k - 1)[::-1].copy()
    timesteps = origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]
    train_sigmas = _train_sigmas(config)
    sigmas = tuple(float(train_sigmas[t]) for t in timesteps) + (0.0,)
    skips = []
    for t, sigma in zip(timesteps, sigmas, strict=False):
        scaled = float(t) * config.timestep_scaling
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5  # sigma_data = 0.5
        skips.append((c_skip / math.sqrt(sigma**2 + 1), c_out))  # c_skip multiplies the VP sample
    options = (("skips", tuple(skips)),)
    return Schedule("lcm", sigmas, _floats(timesteps), _vp_start(sigmas), steps, options=options)


def _floats(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


# ------------------------------------------------------------------------------------------- samplers


def _default_noise(x: Tensor) -> Noise:
    return lambda shape: torch.randn(tuple(shape), device=x.device, dtype=x.dtype)


def _ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): an ancestral step to sigma_next is a deterministic one to sigma_down plus fresh
    noise of std sigma_up (k-diffusion's get_ancestral_step; with eta = 1, diffusers' Euler ancestral)."""
    sigma_up = eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def sample_euler(
    model: Model,
    x: Tensor,
    sigmas: Sequence[float],
    *,
    callback: Callback | None = None,
    keep: Keep | None = None,
) -> Tensor:
    """Euler method (Karras et al. 2022, Algorithm 2 without churn)."""
    n = len(sigmas) - 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if keep is not None and i < n - 1:
            x = keep(x, sigmas[i + 1])
        if callback is not None:
            callback(i, n, x, denoised)
    return x


def sample_euler_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Sequence[float],
    *,
    callback: Callback | None = None,
    keep: Keep | None = None,
    noise: Noise | None = None,
) -> Tensor:
    """Ancestral sampling with Euler steps (k-diffusion's sample_euler_ancestral, eta = 1)."""
    noise = noise or _default_noise(x)
    n = len(sigmas) - 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigma_down - sigmas[i])
        x = x + noise(x.shape) * sigma_up  # drawn on the last step too (sigma_up 0), as diffusers does
        if keep is not None and i < n - 1:
            x = keep(x, sigmas[i + 1])
        if callback is not None:
            callback(i, n, x, denoised)
    return x


def sample_heun(
    model: Model,
    x: Tensor,
    sigmas: Sequence[float],
    *,
    callback: Callback | None = None,
    keep: Keep | None = None,
) -> Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 1): a second evaluation at sigma_next, Euler on the last step."""
    n = len(sigmas) - 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            x_2 = x_2 if keep is None else keep(x_2, sigmas[i + 1])
            d_2 = (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
        if keep is not None and i < n - 1:
            x = keep(x, sigmas[i + 1])
        if callback is not None:
            callback(i, n, x, denoised)
    return x


def sample_dpmpp_2m(
    model: Model,
    x: Tensor,
    sigmas: Sequence[float],
    *,
    callback: Callback | None = None,
    keep: Keep | None = None,
    order: int = 2,
    solver: str = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095), as k-diffusion's sample_dpmpp_2m."""
    n = len(sigmas) - 1
    old_denoised = None
    for i in range(n):
        denoised = model(x, sigmas[i])
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0:
            # diffusers' final step is first order ("zero" final sigma): it lands on the prediction itself.
            x = denoised
        else:
            h = math.log(sigma / sigma_next)  # step in lambda = -log(sigma)
            x = (sigma_next / sigma) * x - math.expm1(-h) * denoised
            if old_denoised is not None and order == 2:  # the first step (img2img's too) is first order
                r = math.log(sigmas[i - 1] / sigma) / h
                c = -0.5 * math.expm1(-h) if solver == "midpoint" else math.expm1(-h) / h + 1
                x = x + c / r * (denoised - old_denoised)
        old_denoised = denoised
        if keep is not None and i < n - 1:
            x = keep(x, sigmas[i + 1])
        if callback is not None:
            callback(i, n, x, denoised)
    return x


def sample_dpmpp_2m_sde(
    model: Model,
    x: Tensor,
    sigmas: Sequence[float],
    *,
    callback: Callback | None = None,
    keep: Keep | None = None,
    noise: Noise | None = None,
    order: int = 2,
    solver: str = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, arXiv:2211.01095), eta = 1, with diffusers' plain per-step noise
    (not k-diffusion's Brownian tree)."""
    noise = noise or _default_noise(x)
    n = len(sigmas) - 1
    old_denoised = None
    for i in range(n):
        denoised = model(x, sigmas[i])
        z = noise(x.shape)  # drawn on every step, the last included, before the update
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            gain = -math.expm1(-2 * h)  # 1 - e^(-2h)
            x = (sigma_next / sigma) * math.exp(-h) * x + gain * denoised + sigma_next * math.sqrt(gain) * z
            if old_denoised is not None and order == 2:
                r = math.log(sigmas[i - 1] / sigma) / h
                c = 0.5 * gain if solver == "midpoint" else gain / (-2 * h) + 1
                x = x + c / r * (denoised - old_denoised)
        old_denoised = denoised
        if keep is not None and i < n - 1:
            x = keep(x, sigmas[i + 1])
        if callback is not None:
            callback(i, n, x, denoised)
    return x


def _unipc_coefficients(hh: float, rks: list[float], solver: str, full: bool) -> tuple[float, list[float]]:
    """B(h) and the rho weights of UniP (full=False, without the newest point) or UniC (Zhao et al. 2023,
    arXiv:2302.04867, Algorithms 1-2), solved on the host as diffusers solves them on the device."""
    h_phi_1 = math.expm1(hh)
    b_h = hh if solver == "bh1" else h_phi_1
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    p = len(rks)
    if not full:
        if p == 1:
            return b_h, []
        if p == 2:
            return b_h, [0.5]
        r = np.array([[rk ** (i - 1) for rk in rks[:-1]] for i in range(1, p)])
        return b_h, list(np.linalg.solve(r, np.array(b[:-1])))
    if p == 1:
        return b_h, [0.5]
    r = np.array([[rk ** (i - 1) for rk in rks] for i in range(1, p + 1)])
    return b_h, list(np.linalg.solve(r, np.array(b)))


def sample_unipc(
    model: Model,
    x: Tensor,
    sigmas: Sequence[float],
    *,
    callback: Callback | None = None,
    keep: Keep | None = None,
    order: int = 2,
    solver: str = "bh2",
) -> Tensor:
    """UniPC (Zhao et al. 2023, arXiv:2302.04867): a UniP predictor step and, from the second step on, a UniC
    corrector of the previous step with the new prediction (no extra model call). Data prediction, B(h) variant
    `solver`, lower orders on the first and last steps as diffusers."""
    n = len(sigmas) - 1
    lambdas = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    history: list[Tensor] = []  # the denoised of the last `order` steps, newest last
    x_last, last_order = None, 0
    for i in range(n):
        denoised = model(x, sigmas[i])
        if x_last is not None:  # UniC: redo the last step's update with this step's prediction
            h = lambdas[i] - lambdas[i - 1]
            m0 = history[-1]
            rks = [(lambdas[i - 1 - k] - lambdas[i - 1]) / h for k in range(1, last_order)] + [1.0]
            b_h, rhos = _unipc_coefficients(-h, rks, solver, full=True)
            x = (sigmas[i] / sigmas[i - 1]) * x_last - math.expm1(-h) * m0
            correction = rhos[-1] * (denoised - m0)
            for k in range(1, last_order):
                correction = correction + rhos[k - 1] / rks[k - 1] * (history[-(k + 1)] - m0)
            x = x - b_h * correction
        history = (history + [denoised])[-order:]
        this_order = min(order, n - i, len(history))
        x_last, last_order = x, this_order
        # UniP: the predictor step to sigmas[i + 1]
        h = lambdas[i + 1] - lambdas[i]
        rks = [(lambdas[i - k] - lambdas[i]) / h for k in range(1, this_order)] + [1.0]
        b_h, rhos = _unipc_coefficients(-h, rks, solver, full=False)
        x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * denoised
        for k in range(1, this_order):
            x = x - b_h * rhos[k - 1] / rks[k - 1] * (history[-(k + 1)] - denoised)
        if keep is not None and i < n - 1:
            x = keep(x, sigmas[i + 1])
        if callback is not None:
            callback(i, n, x, denoised)
    return x


def sample_ddim(
    model: Model,
    x: Tensor,
    sigmas: Sequence[float],
    *,
    callback: Callback | None = None,
    keep: Keep | None = None,
    noise: Noise | None = None,
    eta: float = 0.0,
    targets: Sequence[float] | None = None,
) -> Tensor:
    """DDIM (Song et al. 2020, arXiv:2010.02502): in this space an Euler step, ancestral with eta > 0. A step
    lands on targets[i] (diffusers' t - num_train_timesteps // steps); the sample, unchanged in diffusers' VP
    space, is then read at sigmas[i + 1]."""
    noise = noise or _default_noise(x)
    n = len(sigmas) - 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        target = sigmas[i + 1] if targets is None else targets[i]
        sigma_down, sigma_up = _ancestral_step(sigmas[i], target, eta)
        x = denoised + (x - denoised) * (sigma_down / sigmas[i])
        if eta > 0:
            x = x + noise(x.shape) * sigma_up
        if target != sigmas[i + 1]:
            x = x * math.sqrt((sigmas[i + 1] ** 2 + 1) / (target**2 + 1))
        if keep is not None and i < n - 1:
            x = keep(x, sigmas[i + 1])
        if callback is not None:
            callback(i, n, x, denoised)
    return x


def sample_lcm(
    model: Model,
    x: Tensor,
    sigmas: Sequence[float],
    *,
    callback: Callback | None = None,
    keep: Keep | None = None,
    noise: Noise | None = None,
    skips: Sequence[tuple[float, float]] | None = None,
) -> Tensor:
    """Latent consistency model sampling (Luo et al. 2023, arXiv:2310.04378): the consistency function's
    prediction, re-noised to the next sigma. `skips` are its (c_skip, c_out) boundary weights per step."""
    noise = noise or _default_noise(x)
    n = len(sigmas) - 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        if skips is not None:
            c_skip, c_out = skips[i]
            denoised = c_out * denoised + c_skip * x
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise(x.shape) * sigmas[i + 1]
        if keep is not None and i < n - 1:
            x = keep(x, sigmas[i + 1])
        if callback is not None:
            callback(i, n, x, denoised)
    return x


SAMPLE_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler-a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp-2m": sample_dpmpp_2m,
    "dpmpp-2m-sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "ddim": sample_ddim,
    "lcm": sample_lcm,
}
STOCHASTIC = {"euler-a", "dpmpp-2m-sde", "ddim", "lcm"}  # take noise= (ddim only with eta > 0)


def sample(
    sampler: str | Schedule,
    model: Model,
    x: Tensor,
    sigmas: Sequence[float] | None = None,
    *,
    callback: Callback | None = None,
    noise: Noise | None = None,
    keep: Keep | None = None,
    **options,
) -> Tensor:
    """Run a sampler from x at sigmas[0] down to sigmas[-1]: the denoised latents (in VE space). Given a
    Schedule, its sampler, sigmas and options."""
    if isinstance(sampler, Schedule):
        options = {**dict(sampler.options), **options}
        sigmas, sampler = sampler.sigmas, sampler.sampler
    check_sampler(sampler)
    if sampler in STOCHASTIC:
        options["noise"] = noise
    return SAMPLE_FUNCTIONS[sampler](model, x, list(sigmas), callback=callback, keep=keep, **options)


# ------------------------------------------------------------------------------------------- img2img


def img2img_start(schedule: Schedule, strength: float) -> int:
    """Index of the first step image-to-image keeps, as KolorsImg2ImgPipeline.get_timesteps. It counts with the
    requested steps (retrieve_timesteps passes them through), which "trailing" spacing can exceed by one, and
    slices `order` timesteps per step: Heun's doubled ones give the same step. Equals the step count, so that
    no step runs, when int(steps * strength) is 0."""
    if not 0.0 <= strength <= 1.0:
        raise KolorsError(f"strength must be between 0 and 1, not {strength!r}")
    n = schedule.requested
    init_timestep = min(int(n * strength), n)
    return min(max(n - init_timestep, 0), schedule.steps)


def add_noise(x0: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """The image-to-image start at noise level `sigma`, in VE space. All the diffusers schedulers agree: the
    Euler family's add_noise is this formula, the others' alpha * x0 + alpha * sigma * noise is it times
    alpha = 1 / sqrt(sigma^2 + 1), the VP scaling."""
    return x0 + noise * sigma


def is_vp(sampler: str) -> bool:
    """Whether diffusers keeps this sampler's sample in variance-preserving space."""
    return sampler in _VP
