"""Whole generation, end to end: diffusers' KolorsPipeline against kolors on the same weights.

    python bench/bench_generate.py --model /tmp/kolors-mid      # 512x512, 25 steps dpmpp-2m, bf16, CPU

Each run is one text-to-image call: encode the prompt and the empty negative, 25 DPM-Solver++(2M) Karras steps
with classifier-free guidance, VAE decode, image as a float array. diffusers uses
DPMSolverMultistepScheduler(use_karras_sigmas=True), the working 25-step sampler for Kolors; kolors uses
sampler="dpmpp-2m". Both get the same seed on a CPU generator, so the same initial noise.

Both pipelines are loaded into one process and run alternately when their weights fit in memory together;
otherwise (full size on a 24 GiB machine) each run has its own process (loading, warm-up, one timed run), the
sides alternating, and the report says so. The report ends with the largest difference between the two sides' images (pixels in [0, 1]):
in bf16 it is not zero because diffusers keeps latents in bf16 between steps and kolors in fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python bench/bench_generate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    SEED_PROMPT,
    GiB,
    MemoryWatch,
    Result,
    add_common_args,
    alternate,
    alternate_children,
    available_memory,
    format_bytes,
    memory_kind,
    report,
    setup,
    speed_row,
)

SIDES = ("diffusers", "kolors")
GOAL = 1.3  # issue 3, goal 3: at least 1.3x faster than diffusers end to end


def variant_of(model: Path) -> str | None:
    """ "fp16" when the folder holds only the fp16 variant (as the real repository does)."""
    return "fp16" if any((model / "unet").glob("*.fp16.safetensors")) else None


def weights_bytes(model: Path, dtype: torch.dtype) -> int:
    """Bytes one pipeline's weights take in `dtype`, from the files on disk."""
    from safetensors import safe_open

    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for file in model.glob("*/*.safetensors"):
        if ("fp16" in file.name) != (variant_of(model) == "fp16"):
            continue
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                total += int(np.prod(f.get_slice(key).get_shape())) * itemsize
    return total


# ---------------------------------------------------------------------------------------------------- sides


def load_side(side: str, model: Path, dtype: torch.dtype, device: torch.device, kolors_kwargs: dict):
    """The pipeline of one side and a callable that generates one image (a float array, pixels in [0, 1])."""
    variant = variant_of(model)
    if side == "diffusers":
        import diffusers
        import transformers
        from diffusers import DPMSolverMultistepScheduler
        from diffusers import KolorsPipeline as DiffusersKolorsPipeline

        for library in (diffusers, transformers):  # loading bars and deprecation notes would bury the report
            library.utils.logging.set_verbosity_error()
            library.utils.logging.disable_progress_bar()
        warnings.filterwarnings(
            "ignore", category=FutureWarning
        )  # torch_dtype: older diffusers know no other

        pipe = DiffusersKolorsPipeline.from_pretrained(model, variant=variant, torch_dtype=dtype).to(device)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, use_karras_sigmas=True
        )
        pipe.set_progress_bar_config(disable=True)

        def generate(prompt, size, steps, guidance, seed):
            generator = torch.Generator("cpu").manual_seed(seed)
            return pipe(
                prompt,
                negative_prompt="",
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generator,
                output_type="np",
            ).images

    else:
        from kolors.pipeline import KolorsPipeline

        pipe = KolorsPipeline.from_pretrained(
            model, dtype=dtype, device=device, variant=variant, **kolors_kwargs
        )
        pipe.set_progress_bar_config(disable=True)

        def generate(prompt, size, steps, guidance, seed):
            return pipe(
                prompt,
                negative_prompt="",
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=guidance,
                sampler="dpmpp-2m",
                seed=seed,
                output_type="np",
            ).images

    return pipe, generate


def run_sides(args, sides: list[str], device, dtype) -> tuple[dict[str, Result], list[str]]:
    """Load `sides` in this process and run them alternately; notes on loading for the report."""
    generators, notes = {}, []
    for side in sides:
        with MemoryWatch(device) as mem:
            start = time.perf_counter()
            pipe, generate = load_side(side, Path(args.model), dtype, device, args.kolors_kwargs)
            seconds = time.perf_counter() - start
        notes.append(
            f"{side} loaded in {seconds:.1f} s, {memory_kind(device)} while loading {format_bytes(mem.peak)}"
        )
        generators[side] = pipe, generate

    def call(side):
        _, generate = generators[side]
        return lambda: generate(args.prompt, args.size, args.steps, args.guidance, args.seed)

    results = alternate({s: call(s) for s in sides}, args.warmup, args.repeats, device=device)
    return results, notes


def run_children(args, workdir: Path) -> tuple[dict[str, Result], list[str]]:
    """Every run in a fresh process (this script with --side: its own load, warm-up and one timed run), the
    sides alternating, the runs merged per side."""
    runs = alternate_children(__file__, [*args.argv, "--repeats", "1"], SIDES, 0, args.repeats, workdir)
    results, notes = {}, []
    for side, side_runs in runs.items():
        peak = max(side_runs, key=lambda run: run["peak_memory"])
        result = Result(side, peak_memory=peak["peak_memory"], start_memory=peak["start_memory"])
        for round_, run in enumerate(side_runs, 1):
            result.warmup_times += run["warmup_times"]
            result.times += run["times"]
            result.peak_reset = result.peak_reset and run["peak_reset"]
            notes += [f"round {round_}: {note}" for note in run["notes"]]
        result.output = np.load(side_runs[-1]["output"])
        results[side] = result
    return results, notes


def main(argv: list[str] | None = None) -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=SEED_PROMPT)
    parser.add_argument(
        "--processes",
        default="auto",
        choices=["auto", "one", "two"],
        help="one: both sides in this process, alternating; two: each side in its own process, one after the "
        "other; auto: one when both pipelines fit in the available memory",
    )
    parser.add_argument(
        "--kolors-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra keyword for kolors' from_pretrained, e.g. memory=low (VALUE read as JSON if it parses)",
    )
    parser.add_argument(
        "--side", choices=SIDES, help=argparse.SUPPRESS
    )  # internal: one side, in a child process
    parser.add_argument("--child-output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    args.kolors_kwargs = {}
    for option in args.kolors_option:
        name, _, value = option.partition("=")
        try:
            args.kolors_kwargs[name] = json.loads(value)
        except json.JSONDecodeError:
            args.kolors_kwargs[name] = value
    if args.model is None or not Path(args.model).is_dir():
        parser.error("--model must be a Kolors-diffusers folder, e.g. from: python bench/fake_weights.py DIR")
    device, dtype = setup(args)

    if args.side:  # child: one side, results to files for the parent
        results, notes = run_sides(args, [args.side], device, dtype)
        r, out = results[args.side], Path(args.child_output)
        np.save(out.with_suffix(".npy"), np.asarray(r.output))
        fields = ("warmup_times", "times", "peak_memory", "start_memory", "peak_reset")
        data = {k: getattr(r, k) for k in fields} | {"notes": notes, "output": str(out.with_suffix(".npy"))}
        out.with_suffix(".json").write_text(json.dumps(data))
        return

    need, free = 2 * weights_bytes(Path(args.model), dtype), available_memory()
    processes = args.processes
    if processes == "auto":
        processes = "one" if device.type == "cuda" or need + 2 * GiB < free else "two"
    if processes == "one":
        results, notes = run_sides(args, list(SIDES), device, dtype)
        notes.insert(0, "both pipelines loaded in one process, runs alternating (peak memory includes both)")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results, notes = run_children(args, Path(tmp))
        notes.insert(
            0,
            f"each run in its own process, sides alternating: both sides need {format_bytes(need)}, "
            f"{format_bytes(free)} was available",
        )

    a, b = (np.asarray(results[s].output, dtype=np.float32) for s in SIDES)
    diff = np.abs(a - b)
    notes.append(
        f"images: max abs diff {diff.max():.4f}, mean {diff.mean():.5f} (pixels in [0, 1]); "
        f"finite: diffusers {np.isfinite(a).all()}, kolors {np.isfinite(b).all()}"
    )
    if args.kolors_kwargs:
        notes.append(f"kolors options: {args.kolors_kwargs}")
    shapes = (
        f"{args.size}x{args.size} image, latents 1x4x{args.size // 8}x{args.size // 8} (CFG batch 2), "
        f"{args.steps} steps dpmpp-2m Karras, guidance {args.guidance:g}, seed prompt + empty negative"
    )
    report(
        "whole generation (encode, denoise, decode)",
        results,
        dtype=dtype,
        device=device,
        shapes=f"{shapes}; model {args.model}",
        goal=GOAL,
        notes=notes,
    )
    print(speed_row(f"whole generation {args.size}px {args.steps} steps, >= {GOAL}x", results, goal=GOAL))


if __name__ == "__main__":
    main()
