"""Many images from a jobs file: deterministic names, batched UNet calls, resumable after a crash or a kill.

A job is one request: a JSONL object, a CSV row or a line of text. Image i of a job is named `KEY-i.png`, KEY
being the job's id made file-safe or, without an id, its line number (`000042`). Each image is written to a
temporary file and renamed when complete (request.save_png), then recorded in DIR/manifest.jsonl, appended and
fsynced per image. Running the same command again makes only what is missing:

- an image the manifest records and DIR holds is skipped;
- a leftover temporary file (a kill during a write) is deleted: no PNG under a final name is ever partial;
- a torn last manifest line (a kill during an append) is dropped, as are rows whose PNG was deleted (remade);
- a PNG in DIR but not in the manifest (a kill between the rename and the append) is read back: if it decodes
  and its `parameters` text is this job's request and seed, it is added to the manifest, else made again.

Seeds: image i of a job has the job's seed + i, as with `kolors generate`, so an image is the same made alone
or in a batch. A job without a seed gets one hashed from the base seed (--seed, default 0) and its KEY, so a
rerun, or the same job moved to another line, makes the same image.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from kolors.errors import KolorsError
from kolors.pipeline import MAX_SEED, KolorsPipeline, PromptEmbeds
from kolors.request import GenerationRequest, save_png
from kolors.weights import DEFAULT_REPO

try:
    import fcntl
except ImportError:  # Windows: no advisory lock, one run per folder is then up to the user
    fcntl = None

MANIFEST = "manifest.jsonl"
LOCK = ".kolors-batch.lock"
TEMP_FILES = ".*.png.tmp"  # what save_png writes before its rename
JOB_FIELDS = tuple("id prompt negative_prompt seed steps guidance sampler width height num_images".split())
WHOLE_NUMBERS = {"seed", "steps", "width", "height", "num_images"}
# What a job may leave out: GenerationRequest's defaults, which the CLI replaces by its own options.
DEFAULTS = {
    k: v
    for k, v in asdict(GenerationRequest(prompt="")).items()
    if k in JOB_FIELDS and k not in ("prompt", "seed")
}


@dataclass(frozen=True)
class ImageSpec:
    """One image to make: all that decides its pixels and its file. A manifest row is this plus `model`."""

    file: str
    id: str | None
    line: int
    index: int
    seed: int
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    sampler: str
    width: int
    height: int

    @property
    def settings(self) -> tuple:
        """What the images of one pipeline call must share."""
        return (self.steps, self.guidance, self.sampler, self.width, self.height)

    @property
    def params(self) -> dict:
        """What the image's pixels depend on, besides the model."""
        return {k: v for k, v in asdict(self).items() if k not in ("file", "id", "line", "index")}

    def infotext(self, model: str) -> str:
        request = GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            steps=self.steps,
            guidance=self.guidance,
            sampler=self.sampler,
            seed=self.seed,
            width=self.width,
            height=self.height,
        )
        return request.infotext(self.seed, model)

    def row(self, model: str) -> dict:
        return {**asdict(self), "model": model}

    @classmethod
    def from_row(cls, row: Mapping) -> ImageSpec:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class BadLine:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class BatchSummary:
    done: int = 0
    skipped: int = 0  # already made by an earlier run
    failed: int = 0  # bad lines, plus images whose generation raised a KolorsError
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


# -------------------------------------------------------------------------------------------------- the run


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
) -> BatchSummary:
    """Make every image the jobs ask for that `output_dir` does not hold yet; see the module docstring.

    `jobs`: a .jsonl, .csv or text file, or a list of prompts and/or dicts with the JSONL fields. `defaults`:
    values for the fields a job leaves out (negative_prompt, steps, guidance, sampler, width, height,
    num_images). `seed`: the base of the seeds of jobs without one. `pipe`: an already loaded pipeline, else
    `model` is loaded (only if something is left to make), `load_options` being more from_pretrained keywords.
    `ray`: True starts a local Ray instance (or joins RAY_ADDRESS's), a string is a cluster address."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise KolorsError(f"batch size must be a whole number of at least 1, not {batch_size!r}")
    if ray:
        from kolors import batch_ray

        batch_ray.require_ray()
    started = time.perf_counter()
    source = Path(jobs).name if isinstance(jobs, (str, os.PathLike)) else "jobs"
    specs, bad = parse_jobs(jobs, defaults=defaults, seed=0 if seed is None else seed)
    for b in bad:
        if strict:
            raise KolorsError(f"{source} {b} (--strict stops at the first bad line)")
        _say(f"kolors: {source} {b}; skipped")
    summary = BatchSummary(failed=len(bad), bad_lines=bad)

    output_dir, load = Path(output_dir), dict(load_options or {})
    with _claim(output_dir), Manifest(output_dir) as manifest:
        pending, summary.skipped = _plan(specs, output_dir, manifest)
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
                batch_ray.run(
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
        _say(f"kolors: failed {error}")
    summary.seconds = time.perf_counter() - started
    _say(f"kolors batch: {summary}")
    return summary


def _run_local(pipe, pending, output_dir, finished, batch_size: int, strict: bool) -> None:
    shown = pipe.progress_bar
    pipe.set_progress_bar_config(disable=True)  # the batch has its own bar, over images
    cache = PromptCache(pipe)
    try:
        for chunk in batches(pending, batch_size):
            try:
                for row in make_images(pipe, cache, chunk, output_dir):
                    finished(row)
            except KolorsError as e:  # a request the model refuses; the other chunks go on
                if strict:
                    raise
                for spec in chunk:
                    finished({"file": spec.file, "error": str(e)})
    finally:
        pipe.progress_bar = shown


def batches(specs: list[ImageSpec], batch_size: int) -> Iterator[list[ImageSpec]]:
    """Up to `batch_size` images that can share one pipeline call (same size, steps, guidance and sampler),
    in job order within each group of settings."""
    groups: dict[tuple, list[ImageSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.settings, []).append(spec)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


def make_images(
    pipe: KolorsPipeline, cache: PromptCache, chunk: list[ImageSpec], output_dir: Path
) -> Iterator[dict]:
    """Generate `chunk` and write each PNG; yields each image's manifest row once its file is in place."""
    for spec, image in zip(chunk, generate(pipe, cache, chunk), strict=True):
        save_png(image, output_dir / spec.file, spec.infotext(pipe.label))
        yield spec.row(pipe.label)


def generate(pipe: KolorsPipeline, cache: PromptCache, chunk: list[ImageSpec], output_type: str = "pil"):
    """The images of `chunk` (one group of settings) from one pipeline call, one seed per image."""
    first = chunk[0]
    cfg = first.guidance > 1.0
    embeds = cache([s.prompt for s in chunk], [s.negative_prompt for s in chunk] if cfg else None)
    out = pipe(
        prompt_embeds=embeds,
        height=first.height,
        width=first.width,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance,
        sampler=first.sampler,
        seed=[s.seed for s in chunk],
        output_type=output_type,
    )
    return out.images


class PromptCache:
    """Text embeddings by text, so a prompt made many times, and the negative prompt most jobs share, are
    encoded once. Prompts and negatives are encoded as separate rows: the encoder sees each row on its own
    (padded to the same length), so this changes no image beyond float rounding."""

    def __init__(self, pipe: KolorsPipeline, size: int = 64):
        self.pipe, self.size = pipe, size
        self.rows: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __call__(self, prompts: list[str], negatives: list[str] | None = None) -> PromptEmbeds:
        texts = list(dict.fromkeys(prompts + (negatives or [])))
        found = {t: self.rows[t] for t in texts if t in self.rows}
        for t in found:
            self.rows.move_to_end(t)
        missing = [t for t in texts if t not in found]
        if missing:
            e = self.pipe.encode_prompt(missing, negative_prompt=None)
            for i, t in enumerate(missing):
                found[t] = self.rows[t] = (e.prompt_embeds[i : i + 1].clone(), e.pooled[i : i + 1].clone())
            while len(self.rows) > self.size:
                self.rows.popitem(last=False)

        def stack(ts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.cat([found[t][0] for t in ts]), torch.cat([found[t][1] for t in ts])

        if negatives is None:
            return PromptEmbeds(*stack(prompts))
        return PromptEmbeds(*stack(prompts), *stack(negatives))


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


# -------------------------------------------------------------------------------------------------- jobs


def parse_jobs(
    jobs: str | os.PathLike | Iterable[str | Mapping], *, defaults: Mapping | None = None, seed: int = 0
) -> tuple[list[ImageSpec], list[BadLine]]:
    """The images a jobs file (or list) asks for, and the lines that could not be read, by line number."""
    unknown = sorted(set(defaults or {}) - set(DEFAULTS))
    if unknown:
        raise KolorsError(
            f"unknown default(s) {', '.join(map(repr, unknown))}; they are {', '.join(DEFAULTS)}"
        )
    defaults = {**DEFAULTS, **(defaults or {})}
    specs: list[ImageSpec] = []
    bad: list[BadLine] = []
    keys: dict[str, int] = {}  # casefolded file key -> line, so no two jobs share a file, even on macOS
    for line, record, error in _records(jobs):
        try:
            if error:
                raise KolorsError(error)
            job = _job_specs(line, record, defaults, seed)
            key = job[0].file.rsplit("-", 1)[0]
            if key.casefold() in keys:
                raise KolorsError(
                    f"its files ({key}-N.png) would be line {keys[key.casefold()]}'s; "
                    "give each job its own id"
                )
            keys[key.casefold()] = line
            specs.extend(job)
        except KolorsError as e:
            bad.append(BadLine(line, str(e)))
    return specs, bad


def _records(jobs) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, fields, error) for each non-blank line or row of the jobs."""
    if not isinstance(jobs, (str, os.PathLike)):
        for n, item in enumerate(jobs, 1):
            if isinstance(item, str):
                yield n, {"prompt": item}, None
            elif isinstance(item, Mapping):
                yield n, dict(item), None
            else:
                yield n, None, f"a job must be a prompt or a dict of fields, not {type(item).__name__}"
        return
    path = Path(jobs)
    if not path.is_file():
        raise KolorsError(f"jobs file not found: {path}")
    try:
        if path.suffix.lower() == ".csv":
            yield from _csv_records(path)
            return
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise KolorsError(f"jobs file {path} is not UTF-8 text ({e.reason}); save it as UTF-8") from None
    # Split on newlines only: str.splitlines would also cut a JSON string at a raw U+2028.
    lines = [(n, s.strip()) for n, s in enumerate(text.split("\n"), 1) if s.strip()]
    if path.suffix.lower() not in (".jsonl", ".ndjson", ".json"):
        yield from ((n, {"prompt": s}, None) for n, s in lines)
        return
    if lines and lines[0][1].startswith("["):
        raise KolorsError(f"{path} holds a JSON array; write one JSON object per line, as a .jsonl file")
    for n, s in lines:
        try:
            record = json.loads(s)
        except json.JSONDecodeError as e:
            yield n, None, f"not valid JSON ({e.msg} at column {e.colno})"
            continue
        if isinstance(record, dict):
            yield n, record, None
        else:
            yield (
                n,
                None,
                f'a JSONL line must be an object like {{"prompt": "..."}}, not {type(record).__name__}',
            )


def _csv_records(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            if "prompt" not in header:
                raise KolorsError(f"{path} has no 'prompt' column in its header line; add one")
            extra = [h for h in header if h not in JOB_FIELDS]
            if extra:  # CSV exports often carry other columns: they are ignored, not errors
                _say(f"kolors: {path.name}: ignoring columns {', '.join(map(repr, extra))}")
            for row in reader:
                if None in row:
                    yield reader.line_num, None, "more cells than the header has columns"
                    continue
                # An empty cell means the default, as a missing key does in JSONL.
                yield (
                    reader.line_num,
                    {k: v for k, v in row.items() if k in JOB_FIELDS and v not in (None, "")},
                    None,
                )
        except csv.Error as e:
            raise KolorsError(f"{path} line {reader.line_num}: cannot read the CSV ({e})") from None


def _job_specs(line: int, record: dict, defaults: Mapping, base_seed: int) -> list[ImageSpec]:
    unknown = sorted(set(record) - set(JOB_FIELDS))
    if unknown:
        raise KolorsError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are {', '.join(JOB_FIELDS)}"
        )
    values = {**defaults, **{k: _typed(k, v) for k, v in record.items() if v is not None}}
    if not values.get("prompt", "").strip():
        raise KolorsError('no prompt; every job needs a non-empty "prompt"')
    job_id = values.pop("id", None)
    key = f"{line:06d}" if job_id is None else _file_key(job_id)
    n = values["num_images"]
    if values.get("seed") is None:
        values["seed"] = derived_seed(base_seed, key)
    request = GenerationRequest(**values)
    request.validate()
    if not 0 <= request.seed <= MAX_SEED - n + 1:
        raise KolorsError(
            f"seed must be between 0 and {MAX_SEED - n + 1} for {n} image(s), not {request.seed}"
        )
    common = {
        k: getattr(request, k) for k in ("prompt", "negative_prompt", "steps", "sampler", "width", "height")
    }
    common["guidance"] = float(request.guidance)
    return [
        ImageSpec(file=f"{key}-{i}.png", id=job_id, line=line, index=i, seed=request.seed + i, **common)
        for i in range(n)
    ]


def _typed(name: str, value):
    """A field's value as its type; CSV gives text, so numbers written as text are accepted."""
    if name in WHOLE_NUMBERS:
        if isinstance(value, str) and re.fullmatch(r"\s*\+?\d+\s*", value):
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise KolorsError(f"{name} must be a whole number, not {value!r}")
    if name == "guidance":
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
        raise KolorsError(f"guidance must be a number, not {value!r}")
    if name == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return value
    raise KolorsError(f"{name} must be text, not {value!r}")


def _file_key(job_id: str) -> str:
    """The job id as a file name stem: letters, digits, '.', '-' and '_' kept (any script), all else '_', no
    leading dot, at most 150 bytes; so a name never leaves the output folder or hides in it."""
    key = re.sub(r"[^\w.-]+", "_", job_id).lstrip(".")
    while len(key.encode()) > 150:
        key = key[:-1]
    if not key.strip("_"):
        raise KolorsError(f"id {job_id!r} leaves no usable file name; use letters or digits")
    return key


def derived_seed(base: int, key: str) -> int:
    """The seed of a job that names none: a hash of the base seed and the job's key, below 2**31 so that
    seed + image index stays a valid seed."""
    digest = hashlib.sha256(f"{base}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


# ----------------------------------------------------------------------------------------------- the folder


class Manifest:
    """DIR/manifest.jsonl: one JSON row per finished image (an ImageSpec and the model), appended and fsynced
    as each image lands. Opening it drops torn lines and rows whose PNG is gone, rewriting it atomically."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / MANIFEST
        self.rows = self._load()
        self._file = open(self.path, "a", encoding="utf-8")

    def _load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        raw = self.path.read_bytes()
        clean = raw.endswith(b"\n") or not raw
        rows: dict[str, dict] = {}
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file"]
                ImageSpec.from_row(row)
            except (ValueError, KeyError, TypeError):
                clean = False  # a torn or foreign line: dropped
                continue
            clean = clean and name not in rows
            rows[name] = row
        kept = {
            name: row
            for name, row in rows.items()
            if isinstance(name, str) and Path(name).name == name and (self.path.parent / name).is_file()
        }
        if not clean or len(kept) != len(rows):
            tmp = self.path.with_name(f".{MANIFEST}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(_json_line(row) for row in kept.values())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return kept

    def append(self, row: dict) -> None:
        self._file.write(_json_line(row))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows[row["file"]] = row

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


@contextmanager
def _claim(output_dir: Path) -> Iterator[None]:
    """Create the folder, hold its lock for the run (two runs on one folder would make images twice) and clear
    the temporary files an interrupted run left."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise KolorsError(f"output {output_dir} is a file; --output must be a folder") from None
    with open(output_dir / LOCK, "w") as lock:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise KolorsError(
                    f"another kolors batch is writing to {output_dir}; wait for it or choose another --output"
                ) from None
        for tmp in output_dir.glob(TEMP_FILES):
            tmp.unlink(missing_ok=True)
        yield


def _plan(specs: list[ImageSpec], output_dir: Path, manifest: Manifest) -> tuple[list[ImageSpec], int]:
    """The images still to make, and how many are done already; re-adds finished PNGs the manifest missed."""
    pending, skipped, changed = [], 0, []
    for spec in specs:
        row = manifest.rows.get(spec.file)
        if row is not None:
            skipped += 1
            if ImageSpec.from_row(row).params != spec.params:
                changed.append(spec.file)
            continue
        model = _made_by(output_dir / spec.file, spec)
        if model is None:
            pending.append(spec)
        else:
            manifest.append(spec.row(model))
            skipped += 1
    if changed:
        _say(
            f"kolors: {len(changed)} finished image(s), e.g. {changed[0]}, were made with other parameters "
            "than their jobs now ask for; kept (delete them to make them again)"
        )
    return pending, skipped


def _made_by(path: Path, spec: ImageSpec) -> str | None:
    """The model name of a complete PNG at `path` made for `spec`, or None (absent, unreadable, another's)."""
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            im.load()
            text = im.text.get("parameters", "")
    except Exception:  # any decoding failure means: not a finished image of ours
        return None
    expected = spec.infotext("")  # ends in ", Model: ": the model is the one field not known before loading
    if not text.startswith(expected) or "\n" in text[len(expected) :]:
        return None
    return text[len(expected) :]
