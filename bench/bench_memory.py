"""Peak memory of one generation: diffusers, kolors, and kolors with memory="low", on the same folder.

    python bench/bench_memory.py --model /tmp/kolors-full              # 512x512, 2 steps, bf16, CPU
    python bench/bench_memory.py --model /tmp/kolors-full --strength 0.5 --steps 4   # image-to-image

Each side runs in its own fresh process: load the pipeline, then one text-to-image call (the seed prompt and
an empty negative, classifier-free guidance, DPM-Solver++(2M) Karras, VAE decode). The number that counts is
the process's peak resident set (VmHWM) over load and generation together; the peak of the generation alone
(the high-water mark reset after loading) and the resident set right after loading are given too. The
number of steps barely moves the peak, so the default is 2. Sides alternate when --repeats is above 1.
With --strength, the call is image-to-image instead (diffusers' KolorsImg2ImgPipeline, made from the loaded
pipeline): a fixed synthetic image of the same size is encoded by the VAE and denoised for strength x steps.

Goal (issue 3): kolors with memory="low" peaks at most 40% of diffusers' peak, with the image identical to
kolors' normal mode (checked here bit for bit).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python bench/bench_memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_load import (  # noqa: E402
    add_args,
    file_weights_bytes,
    header,
    load,
    module_bytes,
    quiet_diffusers,
)
from bench.common import (  # noqa: E402
    SEED_PROMPT,
    GiB,
    alternate_children,
    format_bytes,
    memory_total,
    peak_rss,
    reset_peak_rss,
    rss,
)

SIDES = ("diffusers", "kolors", "kolors-low")
GPU_SIDES = ("diffusers-offload",)  # diffusers with enable_model_cpu_offload(): on CUDA only
DIFFUSERS = ("diffusers", "diffusers-offload")
GOAL = 0.4  # kolors-low's peak / diffusers' peak
TOTAL = memory_total()


def init_image(size: int):
    """The same smooth synthetic picture on every side: colour ramps and a disc (the values do not matter)."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).astype(float)
    rgb = np.stack([x, y, 0.5 * (1 - disc) + disc * (1 - x)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def generate(side: str, pipe, args) -> np.ndarray:
    image = {} if args.strength is None else dict(image=init_image(args.size), strength=args.strength)
    common = image | dict(
        prompt=args.prompt,
        negative_prompt="",
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        output_type="np",
    )
    if side == "diffusers":
        from diffusers import DPMSolverMultistepScheduler, KolorsImg2ImgPipeline

        if args.strength is not None:  # the same components, no copy
            pipe = KolorsImg2ImgPipeline.from_pipe(pipe)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, use_karras_sigmas=True
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe(**common, generator=torch.Generator("cpu").manual_seed(args.seed)).images
    pipe.set_progress_bar_config(disable=True)
    return pipe(**common, sampler="dpmpp-2m", seed=args.seed).images


def child(args) -> None:
    """Load and generate once in this fresh process; the image goes next to the JSON for the comparison."""
    import json

    if args.side == "diffusers":
        quiet_diffusers()
    import kolors.pipeline  # noqa: F401

    side, device = args.side.split("-")[0], torch.device(args.device)
    gpu = device.type == "cuda"
    start = time.perf_counter()
    if args.side == "kolors-low":
        pipe, modules = load(side, Path(args.model), getattr(torch, args.dtype), args.device, memory="low")
    elif args.side == "diffusers-offload":  # diffusers' own answer on a GPU: each model visits the device
        pipe, modules = load(side, Path(args.model), getattr(torch, args.dtype), "cpu")
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe, modules = load(side, Path(args.model), getattr(torch, args.dtype), args.device)
    load_seconds, after_load, load_peak = time.perf_counter() - start, rss(), peak_rss()
    if gpu:
        gpu_after_load, gpu_load_peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    reset = reset_peak_rss()
    start = time.perf_counter()
    image = generate(side, pipe, args)
    result = dict(
        load_seconds=load_seconds,
        seconds=time.perf_counter() - start,
        load_peak=load_peak,
        after_load=after_load,
        generation_peak=peak_rss() if reset else None,
        peak=max(load_peak, peak_rss()),
        kept=module_bytes(modules),
    )
    if gpu:  # torch's max allocated on the device, over load and generation and over generation alone
        gpu_generation_peak = torch.cuda.max_memory_allocated()
        result |= dict(
            gpu_after_load=gpu_after_load,
            gpu_generation_peak=gpu_generation_peak,
            gpu_peak=max(gpu_load_peak, gpu_generation_peak),
        )
    out = Path(args.child_output)
    np.save(out.with_suffix(".npy"), image)
    result["image"] = str(out.with_suffix(".npy"))
    out.write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = add_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), repeats=1)
    parser.set_defaults(warmup=0)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=SEED_PROMPT)
    parser.add_argument("--keep-images", default=None, help="a folder to keep each side's image (.npy) in")
    parser.add_argument(
        "--strength", type=float, default=None, help="image-to-image of a synthetic image with this strength"
    )
    args = parser.parse_args(argv)
    if args.side:
        return child(args)
    if args.strength is not None and not (0 < args.strength <= 1 and int(args.steps * args.strength) >= 1):
        parser.error(
            "--strength must be in (0, 1] and leave a step: steps x strength >= 1, e.g. --steps 4 --strength 0.5"
        )
    if not Path(args.model).is_dir():
        parser.error("--model must be a Kolors-diffusers folder, e.g. from: python bench/fake_weights.py DIR")
    argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep_images or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        sides = SIDES + GPU_SIDES if torch.device(args.device).type == "cuda" else SIDES
        # diffusers may not fit the machine at all (killed by the OOM killer): that is a result too
        runs = alternate_children(
            __file__, argv, sides, args.warmup, args.repeats, workdir, may_die=DIFFUSERS
        )
        killed = {side: sum("killed" in r for r in rs) for side, rs in runs.items() if side in DIFFUSERS}
        runs = {side: [r for r in rs if "killed" not in r] for side, rs in runs.items()}
        images = {side: np.load(results[-1]["image"]) for side, results in runs.items() if results}
    in_files = file_weights_bytes(Path(args.model), dtype)
    notes = [
        f"{'weights':<13}: {format_bytes(in_files)} in {args.dtype} (all tensors of the files)",
        f"{'generation':<13}: {args.size}x{args.size}, {args.steps} steps dpmpp-2m Karras, guidance "
        f"{args.guidance:g}, seed prompt + empty negative, seed {args.seed}"
        + ("" if args.strength is None else f"; image-to-image, strength {args.strength:g}"),
    ]
    lines = header("peak memory of one generation (load + generate)", args, dtype, notes)
    lines.append(
        f"{'':<17} {'peak RSS':>10} {'after load':>11} {'gen. peak':>10} {'kept':>10} {'load':>8} {'generate':>9}"
    )
    for side, results in runs.items():
        if not results:
            lines.append(
                f"{side:<17} killed in every run, by the OOM killer (more than {format_bytes(TOTAL)})"
            )
            continue
        r = results[-1]
        gen_peak = format_bytes(r["generation_peak"]) if r["generation_peak"] is not None else "n/a"
        lines.append(
            f"{side:<17} {format_bytes(statistics.median(r['peak'] for r in results)):>10} "
            f"{format_bytes(r['after_load']):>11} {gen_peak:>10} "
            f"{format_bytes(r['kept']):>10} {r['load_seconds']:>7.1f}s {r['seconds']:>8.1f}s"
        )
    lines += [f"{side}: killed in {n} of {n + len(runs[side])} runs" for side, n in killed.items() if n]
    kind, key = ("GPU peak", "gpu_peak") if "gpu_peak" in runs["kolors"][-1] else ("peak RSS", "peak")
    peak = {side: statistics.median(r[key] for r in rs) if rs else None for side, rs in runs.items()}
    if key == "gpu_peak":
        lines += [
            "",
            f"{'':<17} {'GPU peak':>10} {'after load':>11} {'gen. peak':>10}   (torch max allocated)",
        ]
        lines += [
            f"{side:<17} {format_bytes(peak[side]):>10} {format_bytes(rs[-1]['gpu_after_load']):>11} "
            f"{format_bytes(rs[-1]['gpu_generation_peak']):>10}"
            for side, rs in runs.items()
            if rs
        ]
    # The goal is on the memory a generation runs out of: the host's on a CPU, the card's on a GPU. A
    # diffusers side that was killed needed more than the machine has, so the machine bounds the ratio.
    if not peak["diffusers"] and key == "gpu_peak":
        raise SystemExit("diffusers was killed on the host: no GPU peak to compare with")
    same = np.array_equal(images["kolors-low"], images["kolors"])
    diffusers, bound = (peak["diffusers"], "") if peak["diffusers"] else (TOTAL, "< ")
    ratio = peak["kolors-low"] / diffusers
    offload = peak.get("diffusers-offload")
    lines += [
        "",
        f"{kind}: kolors-low / diffusers {bound}{ratio:.2f} (goal <= {GOAL}: "
        f"{'met' if ratio <= GOAL else 'NOT met'}); kolors / diffusers: {bound}{peak['kolors'] / diffusers:.2f}"
        + (f"; kolors-low / diffusers-offload: {peak['kolors-low'] / offload:.2f}" if offload else ""),
        f"low-memory image identical to normal mode: {same} (max abs diff "
        f"{np.abs(images['kolors-low'] - images['kolors']).max():.3g})"
        + (
            f"; kolors vs diffusers max abs diff {np.abs(images['kolors'] - images['diffusers']).max():.3g}"
            if "diffusers" in images
            else ""
        ),
    ]
    print("\n".join(lines), flush=True)
    what = "generation" if args.strength is None else "image-to-image"
    print(
        f"| {kind} {args.size}px {what}, {args.dtype} | "
        + (f"{peak['diffusers'] / GiB:.2f} GiB" if peak["diffusers"] else f"killed (> {TOTAL / GiB:.1f} GiB)")
        + f" | {peak['kolors'] / GiB:.2f} GiB | {peak['kolors-low'] / GiB:.2f} GiB | {bound}{ratio:.2f} (<= {GOAL})"
        f" | {'identical' if same else 'DIFFERENT'} |"
    )


if __name__ == "__main__":
    main()
