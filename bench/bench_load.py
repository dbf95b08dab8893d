"""Loading: diffusers' KolorsPipeline.from_pretrained against kolors' on the same folder.

    python bench/bench_load.py --model /tmp/kolors-full            # bf16 on CPU, 3 timed loads per side
    python bench/bench_load.py --model /tmp/kolors-full --cold     # each load from the disk (root, Linux)

Every load runs in a fresh process, so each side's peak resident set (VmHWM) is its own and nothing is
reused from an earlier load. The processes alternate (diffusers, kolors, kolors, diffusers, ...) after one
untimed warm-up load per side that brings the files into the page cache for both alike. What a load then
finds in the page cache depends on the runs before it (17.8 GB of files and 16.5 GB of weights do not both fit
in 24 GB), so `--cold` empties the cache before every load instead: each side reads everything from the disk,
as after a reboot or with more weights than spare memory. Timed: the
from_pretrained call alone (the imports are reported apart). The report gives the median time of each side,
the ratio, the peak RSS while loading, and the weights' size in the target dtype: all the files' tensors
(what diffusers keeps) and what kolors keeps (it never reads ChatGLM's unused LM head, 0.5 GB at full size).

Goals (issue 3): kolors loads in at most 50% of diffusers' time, with a peak RSS at most 1.1x the size of the
weights in the target dtype.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/bench_load.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    DROP_CACHES,
    GiB,
    alternate_children,
    can_drop_page_cache,
    command_line,
    drop_page_cache,
    format_bytes,
    machine_info,
    peak_rss,
    rss,
)

SIDES = ("diffusers", "kolors")
TIME_GOAL = 0.5  # kolors' load time / diffusers'
MEMORY_GOAL = 1.1  # kolors' peak RSS while loading / the weights in the target dtype


def variant_of(model: Path) -> str | None:
    """ "fp16" when the folder holds only the fp16 variant, as the real repository does."""
    return "fp16" if any((model / "unet").glob("*.fp16.safetensors")) else None


def file_weights_bytes(model: Path, dtype: torch.dtype) -> int:
    """Bytes of every tensor in the chosen weight files, counted in `dtype` (floating tensors)."""
    from kolors.weights import Checkpoint, weight_files

    total = 0
    for component in ("text_encoder", "unet", "vae"):
        for entry in Checkpoint(weight_files(model / component, variant_of(model))).entries.values():
            itemsize = dtype.itemsize if entry.dtype.is_floating_point else entry.dtype.itemsize
            total += entry.nbytes // entry.dtype.itemsize * itemsize
    return total


def module_bytes(modules) -> int:
    """Bytes of the tensors the modules keep, packed UNet weights (outside the state_dict) included."""
    tensors = (t for m in modules for t in (*m.parameters(), *m.buffers()) if not t.is_meta)
    return sum(t.numel() * t.element_size() for t in tensors)


def quiet_diffusers() -> None:
    import diffusers
    import transformers

    for library in (diffusers, transformers):  # loading bars and notes would bury the report
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def load(side: str, model: Path, dtype: torch.dtype, device: str, **kwargs):
    """One side's pipeline, loaded the way its users load it, and its torch modules."""
    variant = variant_of(model)
    if side == "diffusers":
        from diffusers import KolorsPipeline

        pipe = KolorsPipeline.from_pretrained(model, variant=variant, torch_dtype=dtype)
        if device != "cpu":
            pipe = pipe.to(device)
        return pipe, [pipe.text_encoder, pipe.unet, pipe.vae]
    from kolors.pipeline import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(model, dtype=dtype, device=device, variant=variant, **kwargs)
    return pipe, [pipe.text_encoder, pipe.unet, pipe.vae]


# ---------------------------------------------------------------------------------------------------- processes


def child(args) -> None:
    """One load in this process: time, peak RSS (VmHWM: this process has done nothing else), weights kept."""
    start = time.perf_counter()
    if args.side == "diffusers":
        quiet_diffusers()
    import kolors.pipeline  # noqa: F401  (both sides import their library before the clock starts)

    imports = time.perf_counter() - start
    before = rss()
    start = time.perf_counter()
    _, modules = load(args.side, Path(args.model), getattr(torch, args.dtype), args.device)
    seconds = time.perf_counter() - start
    result = dict(
        seconds=seconds, imports=imports, rss_before=before, peak=peak_rss(), kept=module_bytes(modules)
    )
    Path(args.child_output).write_text(json.dumps(result))


def header(title: str, args, dtype: torch.dtype, notes: list[str]) -> list[str]:
    lines = [f"== {title} =="]
    lines += [f"{k:<13}: {v}" for k, v in machine_info(args.device).items()]
    lines += [
        f"{'command':<13}: {command_line()}",
        f"{'device':<13}: {args.device}",
        f"{'dtype':<13}: {str(dtype).replace('torch.', '')}",
        f"{'model':<13}: {args.model} (variant {variant_of(Path(args.model))})",
        *notes,
        "",
    ]
    return lines


def add_args(parser: argparse.ArgumentParser, repeats: int) -> argparse.ArgumentParser:
    parser.add_argument(
        "--model", required=True, help="a Kolors-diffusers folder (e.g. from fake_weights.py)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument(
        "--cold", action="store_true", help="empty the OS page cache before each load (Linux, as root)"
    )
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: one run, in a child process
    parser.add_argument("--child-output", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = add_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), repeats=3)
    args = parser.parse_args(argv)
    if args.side:
        return child(args)
    if not Path(args.model).is_dir():
        parser.error("--model must be a Kolors-diffusers folder, e.g. from: python bench/fake_weights.py DIR")
    if args.cold and not can_drop_page_cache():
        parser.error(f"--cold empties the page cache through {DROP_CACHES}, which needs root on Linux")
    argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    dtype = getattr(torch, args.dtype)

    before = drop_page_cache if args.cold else lambda: None
    with tempfile.TemporaryDirectory() as tmp:
        runs = alternate_children(__file__, argv, SIDES, args.warmup, args.repeats, Path(tmp), before)
    in_files = file_weights_bytes(Path(args.model), dtype)
    lines = header(
        "pipeline load (from_pretrained)",
        args,
        dtype,
        [
            f"{'weights':<13}: {format_bytes(in_files)} in {args.dtype} (all tensors of the files)",
            f"{'page cache':<13}: "
            + ("emptied before each load (--cold)" if args.cold else "as the runs before left it"),
        ],
    )
    lines.append(
        f"{'':<10} {'median':>9} {'runs (s)':<24} {'imports':>8} {'peak RSS*':>10} {'before':>9} {'kept':>10}"
    )
    medians = {}
    for side, results in runs.items():
        medians[side] = statistics.median(r["seconds"] for r in results)
        peak = statistics.median(r["peak"] for r in results)
        times = " ".join(f"{r['seconds']:.2f}" for r in results)
        imports = statistics.median(r["imports"] for r in results)
        lines.append(
            f"{side:<10} {medians[side]:>8.2f}s {times:<24} {imports:>7.2f}s {format_bytes(peak):>10} "
            f"{format_bytes(results[0]['rss_before']):>9} {format_bytes(results[0]['kept']):>10}"
        )
    ratio = medians["kolors"] / medians["diffusers"]
    kolors = runs["kolors"]
    peak, kept, before = (
        statistics.median(r["peak"] for r in kolors),
        kolors[0]["kept"],
        kolors[0]["rss_before"],
    )
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines += [
        "* median over the runs; 'before': RSS when from_pretrained started; 'kept': the loaded modules' tensors",
        "",
        f"time kolors/diffusers: {ratio:.2f} (goal <= {TIME_GOAL}: {met(ratio <= TIME_GOAL)}); "
        f"diffusers/kolors {1 / ratio:.2f}x",
        f"kolors peak RSS / weights kept ({format_bytes(kept)}): {peak / kept:.2f} "
        f"(goal <= {MEMORY_GOAL}: {met(peak / kept <= MEMORY_GOAL)}); without the {format_bytes(before)} "
        f"the process held before loading (Python, torch): {(peak - before) / kept:.2f}",
        f"kolors peak RSS / all the files' tensors in {args.dtype}: {peak / in_files:.2f}",
    ]
    print("\n".join(lines), flush=True)
    print(
        f"| load{', cold' if args.cold else ''}, {args.dtype}, {args.device} | {medians['diffusers']:.1f} s | {medians['kolors']:.1f} s | "
        f"{ratio:.2f} (<= {TIME_GOAL}) | peak {peak / GiB:.2f} GiB = {peak / kept:.2f}x weights "
        f"(<= {MEMORY_GOAL}x) |"
    )


if __name__ == "__main__":
    main()
