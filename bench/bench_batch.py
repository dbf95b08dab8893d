"""Images per minute of `kolors batch` at --batch-size 1, 2 and 4, against running the CLI once per prompt.

    python bench/bench_batch.py                                   # the tiny test model, 64x64, 4 steps
    python bench/bench_batch.py --model /tmp/kolors-mid --width 256 --height 256 --steps 4 --prompts 4

Three measurements on the same model, prompts, seeds and settings:

- `kolors generate` once per prompt, each in its own process: what a shell loop over a prompt list costs
  (Python start, imports and the model load paid for every image);
- `kolors batch JOBS` in one process per batch size, end to end (start and load paid once);
- steady state: kolors.batch.run in this process with the pipeline already loaded and warmed up, so the number
  is generation alone and shows what batching the UNet calls gains.

Every run writes real PNGs into a temporary folder. The report ends with the largest pixel difference between
the batch sizes' images: batching must not change them beyond uint8 rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):  # run as `python bench/bench_batch.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import SEED_PROMPT, command_line, machine_info  # noqa: E402

SUBJECTS = [
    "a cat",
    "a red bicycle",
    "a lighthouse at dusk",
    "a bowl of noodles",
    "a snowy forest",
    "a robot",
]


def tiny_model(folder: Path) -> Path:
    """The tests' tiny random Kolors model, saved by diffusers (needs diffusers and the reference folder)."""
    from tests.reference import build_reference_pipeline, save_reference_pipeline

    return save_reference_pipeline(build_reference_pipeline(seed=0), folder / "Kolors-tiny")


def model_args(args) -> list[str]:
    return ["--model", str(args.model), "--dtype", args.dtype, "--device", args.device]


def size_args(args) -> list[str]:
    return ["--steps", str(args.steps), "--width", str(args.width), "--height", str(args.height)]


def cli(argv: list[str]) -> float:
    """Seconds one `python -m kolors.cli ...` process takes, start to exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kolors.cli", *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def per_minute(images: int, seconds: float) -> float:
    return 60.0 * images / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a Kolors-diffusers folder (default: the tiny test model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=8, help="jobs, one image each (default: 8)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,2,4")
    p.add_argument("--repeats", type=int, default=1, help="steady-state runs per batch size (median)")
    p.add_argument("--skip-cli", action="store_true", help="only the steady-state numbers")
    args = p.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    from kolors import KolorsPipeline
    from kolors.batch import run

    with tempfile.TemporaryDirectory(prefix="kolors-bench-batch-") as tmp:
        tmp = Path(tmp)
        if args.model is None:
            args.model = tiny_model(tmp)
        subjects = [SUBJECTS[i % len(SUBJECTS)] for i in range(args.prompts)]
        jobs = [{"prompt": f"{SEED_PROMPT}, {s}", "seed": 1000 + i} for i, s in enumerate(subjects)]
        jobs_file = tmp / "jobs.jsonl"
        jobs_file.write_text(
            "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in jobs), encoding="utf-8"
        )
        n = len(jobs)
        rows: list[tuple[str, float, float]] = []  # (what, seconds, images per minute)

        if not args.skip_cli:
            seconds = 0.0
            for i, job in enumerate(jobs):
                out = tmp / "cli" / f"{i}.png"
                out.parent.mkdir(exist_ok=True)
                argv = [
                    "generate",
                    job["prompt"],
                    "--seed",
                    str(job["seed"]),
                    "--output",
                    str(out),
                    "--quiet",
                ]
                seconds += cli(argv + model_args(args) + size_args(args))
                print(f"  kolors generate {i + 1}/{n}: {seconds:.1f} s so far", file=sys.stderr, flush=True)
            rows.append(("kolors generate, one process per prompt", seconds, per_minute(n, seconds)))
            for b in batch_sizes:
                argv = ["batch", str(jobs_file), "--output", str(tmp / f"cli-b{b}"), "--batch-size", str(b)]
                seconds = cli(argv + ["--quiet"] + model_args(args) + size_args(args))
                print(f"  kolors batch --batch-size {b}: {seconds:.1f} s", file=sys.stderr, flush=True)
                rows.append((f"kolors batch --batch-size {b}, one process", seconds, per_minute(n, seconds)))

        start = time.perf_counter()
        pipe = KolorsPipeline.from_pretrained(args.model, dtype=args.dtype, device=args.device)
        load = time.perf_counter() - start
        pipe.set_progress_bar_config(disable=True)
        settings = dict(steps=args.steps, width=args.width, height=args.height)
        for b in sorted(set(batch_sizes)):  # warm-up: each batch shape once (allocator, kernel choice)
            pipe(
                [jobs[0]["prompt"]] * b, num_inference_steps=args.steps, height=args.height, width=args.width
            )
        times: dict[int, list[float]] = {b: [] for b in batch_sizes}
        for r in range(args.repeats):
            for b in batch_sizes if r % 2 == 0 else batch_sizes[::-1]:  # alternate, so load drifts hit all
                out = tmp / f"steady-b{b}-{r}"
                summary = run(jobs, out, pipe=pipe, defaults=settings, batch_size=b, progress=False)
                assert summary.done == n, summary
                times[b].append(summary.seconds)
                print(f"  steady --batch-size {b}: {summary.seconds:.2f} s", file=sys.stderr, flush=True)
        for b in batch_sizes:
            seconds = statistics.median(times[b])
            rows.append((f"steady state --batch-size {b} (model loaded)", seconds, per_minute(n, seconds)))

        first = tmp / f"steady-b{batch_sizes[0]}-0"
        diff = 0
        for b in batch_sizes[1:]:
            for png in first.glob("*.png"):
                a = np.asarray(Image.open(png), dtype=np.int16)
                other = np.asarray(Image.open(tmp / f"steady-b{b}-0" / png.name), dtype=np.int16)
                diff = max(diff, int(np.abs(a - other).max()))

    print(f"== kolors batch: images per minute, {n} prompts, one image each ==")
    for key, value in machine_info(args.device).items():
        print(f"{key:<13}: {value}")
    print(f"{'command':<13}: {command_line()}")
    print(f"{'model':<13}: {args.model} ({pipe.name}), {args.dtype}, {args.device}")
    print(f"{'model load':<13}: {load:.1f} s in this process")
    print(f"{'settings':<13}: {args.width}x{args.height}, {args.steps} steps euler, guidance 5.0")
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"{'threads':<13}: torch {torch.get_num_threads()} (OMP_NUM_THREADS {omp})")
    print()
    print(f"{'':<48} {'seconds':>9} {'img/min':>9} {'vs per-prompt CLI':>18}")
    baseline = rows[0][1] if not args.skip_cli else None
    for what, seconds, rate in rows:
        ratio = f"{baseline / seconds:.2f}x" if baseline else ""
        print(f"{what:<48} {seconds:>9.2f} {rate:>9.1f} {ratio:>18}")
    print(f"largest pixel difference between batch sizes: {diff} (of 255)")


if __name__ == "__main__":
    main()
