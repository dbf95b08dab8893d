"""Each sampler's own cost per step, beside diffusers' scheduler for it: the loop run with a trivial model.

The model is one multiply (`x * c`, timed alone too), so the rest of the loop is the sampler: its tensor
updates, the sigma -> timestep lookup of the pipeline's denoiser, and for the stochastic samplers the step
noise drawn from a CPU generator as the pipeline draws it. diffusers' side is its scheduler's loop as
KolorsPipeline runs it (scale_model_input, step) with the same trivial epsilon. A UNet step is far longer (a
1024x1024 step on an H200 is ~47 ms, on this CPU minutes), so these numbers say how much of a step the
sampler is.

    python bench/bench_samplers.py --steps 25 --repeats 5            # 1x4x128x128 latents, float32
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REFERENCE, add_common_args, alternate, command_line, machine_info, setup, sync, timed  # noqa: E402
from kolors import samplers  # noqa: E402
from kolors.noise import randn  # noqa: E402
from kolors.pipeline import _SigmaGrid  # noqa: E402

KOLORS_SCHEDULER = {  # Kwai-Kolors/Kolors-diffusers scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.014,
    "clip_sample": False,
    "num_train_timesteps": 1100,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def scheduler_config() -> dict:
    path = REFERENCE / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text()) if path.is_file() else KOLORS_SCHEDULER


def kolors_loop(name: str, config: samplers.SchedulerConfig, steps: int, x: torch.Tensor, dtype: torch.dtype):
    c = torch.tensor(0.5, device=x.device)

    def run():
        plan = samplers.schedule(config, name, steps)
        grid, g = _SigmaGrid(plan.sigmas[: len(plan.timesteps)]), torch.Generator().manual_seed(0)

        def model(x, sigma):
            grid.index(sigma)
            return x * c

        def noise(shape):
            return randn(shape, g, x.device, dtype).float()

        return samplers.sample(plan, model, x * plan.init_noise_sigma, noise=noise)

    return run


def diffusers_loop(name: str, config: dict, steps: int, x: torch.Tensor):
    from tests.test_samplers import reference_scheduler

    scheduler = reference_scheduler(name, config)
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    c = torch.tensor(0.5, device=x.device)

    def run():
        scheduler.set_timesteps(steps, device=x.device)
        extra = {"generator": torch.Generator().manual_seed(0)} if accepts_generator else {}
        latents = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = scheduler.scale_model_input(latents, t) * c
            latents = scheduler.step(eps, t, latents, **extra).prev_sample
        return latents

    return run


def main(argv: list[str] | None = None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), repeats=5)
    parser.set_defaults(dtype="float32")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=128, help="latent side (128: a 1024x1024 image)")
    parser.add_argument("--samplers", nargs="*", default=list(samplers.SAMPLERS))
    parser.add_argument("--no-diffusers", action="store_true", help="time kolors only")
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    config_json = scheduler_config()
    config = samplers.SchedulerConfig.from_json(config_json)
    x = torch.randn(1, 4, args.size, args.size, device=device)
    c = torch.tensor(0.5, device=device)
    calls = 200
    model_s = (
        statistics.median(timed(lambda: [x * c for _ in range(calls)], device)[0] for _ in range(5)) / calls
    )

    print(f"# {command_line()}")
    for key, value in machine_info(device).items():
        print(f"# {key}: {value}")
    print(
        f"# latents 1x4x{args.size}x{args.size} float32 on {device}, {args.steps} steps, noise dtype {args.dtype}"
    )
    print(
        f"# trivial model (x * c) alone: {model_s * 1e3:.3f} ms a call (Heun calls it twice a step); each loop "
        "includes its schedule (kolors' schedule(), diffusers' set_timesteps) and the model calls"
    )
    print("| sampler | kolors ms/step | diffusers ms/step | diffusers / kolors |")
    print("| --- | ---: | ---: | ---: |")
    rows = {}
    for name in args.samplers:
        steps = min(args.steps, 50) if name == "lcm" else args.steps
        fns = {"kolors": kolors_loop(name, config, steps, x, dtype)}
        if not args.no_diffusers:
            fns["diffusers"] = diffusers_loop(name, config_json, steps, x)
        results = alternate(fns, warmup=args.warmup, repeats=args.repeats, device=device, verbose=False)
        sync(device)
        per_step = {k: r.median / steps * 1e3 for k, r in results.items()}
        theirs = per_step.get("diffusers", float("nan"))
        print(f"| {name} | {per_step['kolors']:.3f} | {theirs:.3f} | {theirs / per_step['kolors']:.2f}x |")
        rows[name] = per_step
    return rows


if __name__ == "__main__":
    main()
