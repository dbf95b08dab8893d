"""A batch run: every image the jobs ask for that the output folder does not hold yet, with batched UNet calls,
on this machine or on a Ray cluster (kolors.batch.on_ray). Reading jobs: kolors.batch.jobs; the folder, its
manifest and what resuming skips: kolors.batch.folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kolors.batch.folder import Manifest, claim, plan
from kolors.batch.jobs import BadLine, parse_jobs, say
from kolors.batch.make import batches, make_images
from kolors.errors import KolorsError
from kolors.pipeline import DEFAULT_REPO, KolorsPipeline
from kolors.request import DEFAULT_LIMITS, Limits


@dataclass
class BatchSummary:
    done: int = 0
    skipped: int = 0  # already made by an earlier run
    failed: int = 0  # bad lines, plus images whose generation failed (each reported with its reason)
    seconds: float = 0.0  # the whole run, model loading included
    load_seconds: float = 0.0
    bad_lines: list[BadLine] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def seconds_per_image(self) -> float | None:
        """Generation time per image made (model loading left out)."""
        return (self.seconds - self.load_seconds) / self.done if self.done else None

    def __str__(self) -> str:
        s = f"{self.done} done, {self.skipped} skipped (already done), {self.failed} failed"
        s += f" in {self.seconds:.1f} s"
        if self.done:
            s += f" ({self.seconds_per_image:.2f} s/image after {self.load_seconds:.1f} s loading)"
        return s


def run(
    jobs: str | os.PathLike | Iterable[str | Mapping],
    output_dir: str | os.PathLike,
    *,
    model: str | os.PathLike = DEFAULT_REPO,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    variant: str | None = None,
    load_options: Mapping | None = None,
    pipe: KolorsPipeline | None = None,
    defaults: Mapping | None = None,
    seed: int | None = 0,
    batch_size: int = 1,
    strict: bool = False,
    ray: bool | str = False,
    ray_actors: int | None = None,
    ray_cpus_per_actor: int = 4,
    progress: bool = True,
    limits: Limits | None = DEFAULT_LIMITS,
) -> BatchSummary:
    """Make every image the jobs ask for that `output_dir` does not hold yet; see the module docstring.

    `jobs`: a .jsonl, .csv or text file, or a list of prompts and/or dicts with the JSONL fields. `defaults`:
    values for the fields a job leaves out (negative_prompt, steps, guidance, sampler, width, height,
    num_images). `seed`: the base of the seeds of jobs without one. `pipe`: an already loaded pipeline, else
    `model` is loaded (only if something is left to make), `load_options` being more from_pretrained keywords.
    `ray`: True starts a local Ray instance (or joins RAY_ADDRESS's), a string is a cluster address. `limits`:
    the bounds every job is checked under, the server's by default (None: the engine's own only)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise KolorsError(f"batch size must be a whole number of at least 1, not {batch_size!r}")
    if ray:
        from kolors.batch import on_ray

        on_ray.require_ray()
    started = time.perf_counter()
    source = Path(jobs).name if isinstance(jobs, (str, os.PathLike)) else "jobs"
    specs, bad = parse_jobs(jobs, defaults=defaults, seed=0 if seed is None else seed, limits=limits)
    for b in bad:
        if strict:
            raise KolorsError(f"{source} {b} (--strict stops at the first bad line)")
        say(f"kolors: {source} {b}; skipped")
    summary = BatchSummary(failed=len(bad), bad_lines=bad)

    output_dir, load = Path(output_dir), dict(load_options or {})
    with claim(output_dir), Manifest(output_dir) as manifest:
        pending, summary.skipped = plan(specs, output_dir, manifest)
        bar = tqdm(total=len(pending), unit="img", desc="kolors batch", disable=not progress or not pending)

        def finished(row: dict) -> None:
            if "error" in row:
                summary.failed += 1
                summary.errors.append(f"{row['file']}: {row['error']}")
            else:
                manifest.append(row)
                summary.done += 1
            bar.update()

        try:
            if pending and ray:
                on_ray.run(
                    [s for group in batches(pending, len(pending)) for s in group],
                    output_dir,
                    finished,
                    address=None if ray is True else ray,
                    batch_size=batch_size,
                    actors=ray_actors,
                    cpus_per_actor=ray_cpus_per_actor,
                    model_options=dict(
                        model=str(model),
                        dtype=str(dtype).removeprefix("torch."),
                        device=str(device),
                        variant=variant,
                        **load,
                    ),
                )
            elif pending:
                if pipe is None:
                    t = time.perf_counter()
                    pipe = KolorsPipeline.from_pretrained(
                        model, dtype=dtype, device=device, variant=variant, **load
                    )
                    summary.load_seconds = time.perf_counter() - t
                _run_local(pipe, pending, output_dir, finished, batch_size, strict)
        finally:
            bar.close()
    for error in summary.errors:
        say(f"kolors: failed {error}")
    summary.seconds = time.perf_counter() - started
    say(f"kolors batch: {summary}")
    return summary


def _run_local(pipe, pending, output_dir, finished, batch_size: int, strict: bool) -> None:
    shown = pipe.progress_bar
    pipe.set_progress_bar_config(disable=True)  # the batch has its own bar, over images
    try:
        for chunk in batches(pending, batch_size):
            try:
                for row in make_images(pipe, chunk, output_dir):
                    finished(row)
            except (
                Exception
            ) as e:  # this chunk's images fail (a refused request, out of memory, a bug); the rest go on
                if strict:
                    raise
                reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
                reason = (
                    reason if isinstance(e, KolorsError) else f"{type(e).__name__}: {reason}".rstrip(": ")
                )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                for spec in chunk:
                    finished({"file": spec.file, "error": reason})
    finally:
        pipe.set_progress_bar_config(disable=not shown)
