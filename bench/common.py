"""What every benchmark shares: the machine, a synced timer, interleaved runs, peak memory, one report format.

A benchmark compares diffusers and kolors on the same weights in one process. The contenders run interleaved
(A B, B A, A B, ...) so that a noisy machine slows both alike and the ratio holds; each side's number is the
median of its timed runs after the warm-up. Peak memory is the process's resident high-water mark on CPU
(reset before each run where the kernel allows, so it is that run's peak) and torch's max allocated on CUDA.

    from bench.common import alternate, report
    results = alternate({"diffusers": run_diffusers, "kolors": run_kolors}, warmup=1, repeats=3)
    report("UNet step", results, dtype=torch.bfloat16, shapes="latents 2x4x64x64", goal=1.15)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

GiB = 1024**3
REFERENCE = Path(
    os.environ.get("KOLORS_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "kolors-reference")
)
# The Kolors model card's example prompt: 27 tokens, with an empty negative 31 real rows of 512.
SEED_PROMPT = '一张瓢虫的照片，微距，变焦，高质量，电影，拿着一个牌子，写着"可图"'


# ---------------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> str:
    """torch's vector ISA and whether bf16 (and AMX) matmuls run natively: bf16 numbers depend on it."""
    features = [torch.backends.cpu.get_cpu_capability()]
    for name, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx", "_is_amx_tile_supported")):
        if getattr(torch.cpu, probe, lambda: False)():
            features.append(name)
    return ", ".join(features)


def machine_info(device: torch.device | str = "cpu") -> dict[str, str]:
    """The facts a reader needs to compare numbers across machines."""
    info = {
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "cpu features": cpu_features(),
        "memory": f"{memory_total() / GiB:.1f} GiB",
        # Other work on the machine slows both sides alike (they alternate) but widens the spread of runs.
        "load average": " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device).index or 0)
        info["gpu"] = f"{props.name}, {props.total_memory / GiB:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        info["gpu"] = "none"
    return info


def _meminfo(field_name: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_total() -> int:
    """The machine's memory (MemTotal), 0 where /proc/meminfo is not."""
    return _meminfo("MemTotal")


def available_memory() -> int:
    """Bytes the kernel can give without swapping (MemAvailable), 0 where unknown."""
    return _meminfo("MemAvailable")


# ---------------------------------------------------------------------------------------------------- memory


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss() -> int:
    """Resident set size now, in bytes."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


def peak_rss() -> int:
    """The process's resident high-water mark in bytes (since start or the last reset_peak_rss)."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS, and never resets
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024
    return kib * 1024


def reset_peak_rss() -> bool:
    """Set the high-water mark to the current RSS (Linux: write 5 to /proc/self/clear_refs). False where the
    kernel does not allow it: the peak then counts from process start, which reports must say."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class MemoryWatch:
    """Peak memory of a region: resident set on CPU, torch's max allocated on CUDA."""

    device: torch.device
    start: int = 0
    peak: int = 0
    reset_ok: bool = True

    def __enter__(self) -> MemoryWatch:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.reset_ok = reset_peak_rss()
            self.start = rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss()


def memory_kind(device: torch.device) -> str:
    return "max allocated (CUDA)" if device.type == "cuda" else "peak RSS"


# ---------------------------------------------------------------------------------------------------- timing


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[float, object]:
    """(seconds, result) of one call, synced on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


@dataclass
class Result:
    """One contender's runs: the warm-up and the timed runs' times, and the peak memory of the timed runs."""

    name: str
    warmup_times: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    peak_memory: int = 0  # bytes: highest peak of any timed run
    start_memory: int = 0  # bytes: memory in use when that run started (models of both sides, if loaded)
    peak_reset: bool = True  # False: the CPU peak could not be reset and counts from process start
    output: object = None  # the last run's return value (e.g. images, to compare the two sides)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def alternate(
    fns: dict[str, Callable[[], object]],
    warmup: int = 1,
    repeats: int = 3,
    *,
    device: torch.device | str = "cpu",
    keep_output: bool = True,
    verbose: bool = True,
) -> dict[str, Result]:
    """Run the contenders interleaved, `warmup` untimed-for-the-median rounds then `repeats` timed rounds.
    The order flips every round (A B, B A, ...) so neither side always runs on a cache the other warmed."""
    device = torch.device(device)
    results = {name: Result(name) for name in fns}
    names = list(fns)
    for round_ in range(warmup + repeats):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            with MemoryWatch(device) as mem:
                seconds, output = timed(fns[name], device)
            result = results[name]
            label = "warm-up" if round_ < warmup else f"run {round_ - warmup + 1}/{repeats}"
            if round_ < warmup:
                result.warmup_times.append(seconds)
            else:
                result.times.append(seconds)
                if mem.peak >= result.peak_memory:
                    result.peak_memory, result.start_memory = mem.peak, mem.start
                result.peak_reset = result.peak_reset and mem.reset_ok
            if keep_output:
                result.output = output
            del output
            if verbose:
                print(f"  {name:<12} {label:<10} {seconds:9.3f} s", file=sys.stderr, flush=True)
    return results


# ---------------------------------------------------------------------------------------------------- report


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def format_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / 1024**2:.0f} MiB"


def report(
    title: str,
    results: dict[str, Result],
    *,
    dtype: torch.dtype | str,
    shapes: str,
    device: torch.device | str = "cpu",
    baseline: str = "diffusers",
    goal: float | None = None,
    notes: list[str] | None = None,
) -> str:
    """Print and return the uniform report: machine, command, dtype, shapes, each side's median, the ratio
    baseline/other (above 1: faster than the baseline), and each side's peak memory."""
    device = torch.device(device)
    lines = [f"== {title} =="]
    for key, value in machine_info(device).items():
        lines.append(f"{key:<13}: {value}")
    lines += [
        f"{'command':<13}: {command_line()}",
        f"{'device':<13}: {device}",
        f"{'dtype':<13}: {str(dtype).replace('torch.', '')}",
        f"{'shapes':<13}: {shapes}",
        "",
        f"{'':<12} {'median':>10} {'runs (s)':<28} {'warm-up (s)':<14} {memory_kind(device)}",
    ]
    for r in results.values():
        runs = " ".join(f"{t:.3f}" for t in r.times)
        warm = " ".join(f"{t:.3f}" for t in r.warmup_times)
        mem = f"{format_bytes(r.peak_memory)} (at start {format_bytes(r.start_memory)})"
        if not r.peak_reset:
            mem += " since process start"
        lines.append(f"{r.name:<12} {r.median:>9.3f}s {runs:<28} {warm:<14} {mem}")
    if baseline in results:
        for r in results.values():
            if r.name == baseline:
                continue
            ratio = results[baseline].median / r.median
            verdict = ""
            if goal is not None:
                verdict = f"  (goal >= {goal:g}x: {'met' if ratio >= goal else 'NOT met'})"
            lines.append(f"ratio {baseline}/{r.name}: {ratio:.2f}x{verdict}")
    lines += notes or []
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def speed_row(goal_text: str, results: dict[str, Result], *, goal: float, baseline: str = "diffusers") -> str:
    """One BENCHMARKS.md table row: | goal | diffusers | kolors | ratio | met |."""
    base, other = results[baseline], next(r for r in results.values() if r.name != baseline)
    ratio = base.median / other.median
    return (
        f"| {goal_text} | {base.median:.2f} s | {other.median:.2f} s | {ratio:.2f}x | "
        f"{'met' if ratio >= goal else 'not met'} |"
    )


# ---------------------------------------------------------------------------------------------------- helpers


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_page_cache() -> None:
    """Empty the OS page cache (Linux, as root), so the next run reads every file from the disk as after a
    reboot: the one state of the cache that does not depend on what ran before."""
    os.sync()
    DROP_CACHES.write_text("3\n")


def can_drop_page_cache() -> bool:
    return os.access(DROP_CACHES, os.W_OK)


def run_child(script: str, argv: list[str], side: str, out: Path) -> dict:
    """Run `script --side SIDE` in a fresh Python; it writes its result as JSON to `out`. A child killed by a
    signal (the kernel's OOM killer sends SIGKILL) gives {"killed": "SIGKILL"} instead; an error raises."""
    done = subprocess.run([sys.executable, script, *argv, "--side", side, "--child-output", str(out)])
    if done.returncode < 0:
        return {"killed": signal.Signals(-done.returncode).name}
    done.check_returncode()
    return json.loads(out.read_text())


def alternate_children(
    script: str,
    argv: list[str],
    sides,
    warmup: int,
    repeats: int,
    workdir: Path,
    before: Callable[[], None] = lambda: None,
    may_die: Collection[str] = (),
) -> dict[str, list[dict]]:
    """Each side `warmup` untimed then `repeats` timed times, each in a new process (writing into `workdir`),
    the order flipping every round so neither side always follows the other; `before()` runs before each.
    A side in `may_die` that is killed (out of memory) has {"killed": SIGNAL} for that run; any other stops it all."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for round_ in range(warmup + repeats):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            before()
            result = run_child(script, argv, side, workdir / f"{side}-{round_}.json")
            if "killed" in result and side not in may_die:
                raise SystemExit(f"{side} was killed by {result['killed']} (out of memory? see dmesg)")
            label = "warm-up" if round_ < warmup else f"run {round_ - warmup + 1}/{repeats}"
            print(f"  {side:<12} {label:<10} {json.dumps(result)}", file=sys.stderr, flush=True)
            if round_ >= warmup:
                runs[side].append(result)
    return runs


def add_common_args(parser: argparse.ArgumentParser, *, repeats: int = 3) -> argparse.ArgumentParser:
    """--model, --dtype, --device, --threads, --warmup, --repeats: the same spelling in every benchmark."""
    parser.add_argument("--model", default=None, help="a Kolors-diffusers folder (e.g. from fake_weights.py)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Apply --threads, turn off autograd, and return (device, dtype)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    return torch.device(args.device), getattr(torch, args.dtype)


def matmul_rate(
    dtype: torch.dtype = torch.bfloat16, device: str = "cpu", n: int = 2048, repeats: int = 5
) -> float:
    """The machine's measured dense matmul rate in FLOP/s (best of `repeats` n×n×n products): the roof a
    model's achieved rate is compared against."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: thread pool, kernel choice
    best = min(timed(lambda: a @ b, device)[0] for _ in range(repeats))
    return 2 * n**3 / best


def max_abs_diff(a, b) -> float:
    """Largest absolute difference of two images or arrays (PIL images, numpy arrays or tensors)."""
    import numpy as np

    def as_array(x):
        if isinstance(x, list | tuple):
            return np.stack([as_array(i) for i in x])
        if isinstance(x, torch.Tensor):
            return x.detach().float().cpu().numpy()
        return np.asarray(x, dtype=np.float32)

    return float(np.abs(as_array(a) - as_array(b)).max())
