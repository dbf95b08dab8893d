"""Reading jobs: a JSONL object, a CSV row or a line of text each, checked as GenerationRequests and turned into
the images they ask for (ImageSpec), with their file names and seeds.

Image i of a job is named `KEY-i.png` (i from 0, as its seed's offset). KEY is the job's id made file-safe or,
for a job without an id, its content: the prompt's first words and a hash of the prompt and every parameter that
changes the image (`a_red_apple-3f9a1c2b7d.png`), so a job that moves in the file finds its image and a changed
job makes a new one; the manifest's `keyed_by` says which ("id" or "content"). Seeds: image i of a job has the
job's seed + i, as with `kolors generate`, so an image is the same made alone or in a batch. A job without a
seed gets one hashed from the base seed (--seed, default 0) and its KEY, so a rerun makes the same image.

Image-to-image and inpainting jobs name their `image` and `mask` files, relative to the jobs file; their content
(a hash) is part of what an image depends on, so editing the picture makes a new image. Their output takes the
image's own size (rounded down to 8); `width` and `height` do not apply. A job with a mask and no `strength`
gets inpainting's 0.9999. Image prompts name their files the same way: `ip_image` (with `ip_scale`) for the
IP-Adapter, `face_image` (with `face_scale`) for FaceID (the face found in it by insightface, --face-models).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from kolors.errors import KolorsError
from kolors.pipeline import load_image
from kolors.request import DEFAULT_LIMITS, FIELDS, ControlUnit, GenerationRequest, Limits, check_size

# A job's ControlNet: a ControlNet folder or repo, its control image file, weight, preprocessor and control mode.
CONTROL_FIELDS = ("controlnet", "control_image", "control_scale", "control_preprocess", "control_mode")
# A job's fields: the request's but a face embedding (its image, mask and image prompts as file names), plus an
# id and its ControlNet.
NOT_JOB_FIELDS = ("face_embeds",)
JOB_FIELDS = ("id", *(f for f in FIELDS if f not in NOT_JOB_FIELDS), *CONTROL_FIELDS)
FILE_FIELDS = ("image", "mask")
PROMPT_FILE_FIELDS = ("ip_image", "face_image")  # read by the pipeline from their paths, made absolute here
FACE_FIELDS = ("face_image", "face_scale")  # in manifest rows only when the job has a face, as ControlNet's
WHOLE_NUMBERS = {"seed", "steps", "width", "height", "num_images", "inpaint_padding"}
NUMBERS = {"guidance", "strength", "mask_blur", "control_scale", "ip_scale", "face_scale"}
FLAGS = {"mask_invert", "paste_back", "control_guess_mode"}
# What a job may leave out: GenerationRequest's defaults, which the CLI replaces by its own options.
DEFAULTS = {
    k: v
    for k, v in GenerationRequest(prompt="").as_dict().items()
    if k in JOB_FIELDS and k not in ("prompt", "seed")
}
# Fields added after manifests were first written, with the value an older row means.
LATER_FIELDS = {
    "schedule": None,
    "loras": (),
    "strength": 0.3,
    "mask_blur": 4.0,
    "mask_invert": False,
    "masked_content": "original",
    "inpaint_padding": None,
    "paste_back": True,
    "ip_image": None,
    "ip_scale": 0.5,
    "face_image": None,
    "face_scale": 0.8,
    "control_guess_mode": False,
    **dict.fromkeys(CONTROL_FIELDS),
}
# The fields every content key hashes; a later field joins the hash only when it differs from what older jobs
# meant, so jobs that do not use it keep their files' names.
KEYED_FIELDS = (
    *(
        "prompt",
        "negative_prompt",
        "steps",
        "guidance",
        "sampler",
        "schedule",
        "seed",
        "width",
        "height",
        "loras",
    ),
)
# What one image's pixels depend on, besides the model: its request with num_images 1 and its own seed (the
# image and mask by file name and content hash).
IMAGE_FIELDS = tuple(f for f in JOB_FIELDS if f not in ("id", "num_images"))
REQUEST_FIELDS = tuple(f for f in IMAGE_FIELDS if f not in FILE_FIELDS)


@dataclass(frozen=True)
class ImageSpec:
    """One image to make: its file, where it came from, and its request (one image, its own seed). A manifest
    row is the request's fields, the file's and the model."""

    file: str
    id: str | None
    line: int
    index: int
    request: GenerationRequest  # without its image and mask, which stay files until made (see `loaded`)
    keyed_by: str = "id"  # "id", or "content" for a job without one (files named by what it asks for)
    files: tuple[tuple[str, str, str], ...] = ()  # (field, path, sha256 prefix) of its image and mask

    @property
    def settings(self) -> tuple:
        """What the images of one pipeline call must share."""
        r = self.request
        inpaint = (r.strength, r.mask_blur, r.mask_invert, r.masked_content, r.inpaint_padding, r.paste_back)
        return (
            r.steps,
            r.guidance,
            r.sampler,
            r.schedule,
            r.width,
            r.height,
            r.loras,
            self.files,
            inpaint,
            (r.ip_image, r.ip_scale),
            (r.face_image, r.face_scale),
            self.control,
            r.control_guess_mode,
        )

    @property
    def control(self) -> tuple:
        """The job's ControlNet fields (None each without one)."""
        units = self.request.controlnets
        if not units:
            return (None,) * len(CONTROL_FIELDS)
        return (units[0].model, units[0].image, units[0].scale, units[0].preprocess, units[0].control_mode)

    @property
    def params(self) -> dict:
        """What the image's pixels depend on, besides the model."""
        control = dict(zip(CONTROL_FIELDS, self.control, strict=True))
        params = {k: control[k] if k in control else getattr(self.request, k) for k in REQUEST_FIELDS}
        for name in FILE_FIELDS:
            entry = next((f for f in self.files if f[0] == name), None)
            params[name], params[f"{name}_hash"] = (entry[1], entry[2]) if entry else (None, None)
        return params

    def images(self) -> dict:
        """Its image and mask, read from their files (the images of a batch group share them)."""
        return {name: load_image(path) for name, path, _ in self.files}

    def loaded(self, images: dict | None = None) -> GenerationRequest:
        """The request with its image and mask (read from their files unless given)."""
        images = self.images() if images is None else images
        return dataclasses.replace(self.request, **images) if images else self.request

    def infotext(self, model: str) -> str:
        """The parameters its PNG carries (but for what is known only once it is made: LoRA hashes). A job
        with an image has that image's size, rounded down to 8, as the pipeline makes it."""
        if not self.files:
            return self.request.infotext(self.request.seed, model)
        request = self.loaded()
        size = (request.image.width // 8 * 8, request.image.height // 8 * 8) if request.image else None
        return request.infotext(request.seed, model, size=size)

    def row(self, model: str | None = None) -> dict:
        row = {"file": self.file, "id": self.id, "keyed_by": self.keyed_by, "line": self.line}
        # ControlNet fields only when the job has one, guess mode only when on, FaceID's only with a face: other
        # jobs' rows stay as they were.
        absent = {**dict.fromkeys(CONTROL_FIELDS), "control_guess_mode": False}
        params = {k: v for k, v in self.params.items() if k not in absent or v != absent[k]}
        if self.request.face_image is None:
            params = {k: v for k, v in params.items() if k not in FACE_FIELDS}
        row = {**row, "index": self.index, **params}
        return row if model is None else {**row, "model": model}

    @classmethod
    def from_row(cls, row: Mapping) -> ImageSpec:
        """The spec of a manifest row; rows of runs before content keys have no keyed_by: by line number, and
        rows from before `schedule` existed lack it (None, the sampler's own)."""
        values = {k: row.get(k, LATER_FIELDS[k]) if k in LATER_FIELDS else row[k] for k in REQUEST_FIELDS}
        values["loras"] = tuple((str(name), float(scale)) for name, scale in values["loras"])  # JSON lists
        request = GenerationRequest(**_with_control(values))
        keyed_by = row.get("keyed_by", "id" if row["id"] is not None else "line")
        files = tuple((f, row[f], row.get(f"{f}_hash")) for f in FILE_FIELDS if row.get(f))
        return cls(row["file"], row["id"], row["line"], row["index"], request, keyed_by, files)


@dataclass(frozen=True)
class BadLine:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def parse_jobs(
    jobs: str | os.PathLike | Iterable[str | Mapping],
    *,
    defaults: Mapping | None = None,
    seed: int = 0,
    limits: Limits | None = DEFAULT_LIMITS,
) -> tuple[list[ImageSpec], list[BadLine]]:
    """The images a jobs file (or list) asks for, and the lines that could not be read, by line number; each job
    is checked under `limits` (the server's defaults unless given; None: the engine's own bounds only)."""
    unknown = sorted(set(defaults or {}) - set(DEFAULTS))
    if unknown:
        raise KolorsError(
            f"unknown default(s) {', '.join(map(repr, unknown))}; they are {', '.join(DEFAULTS)}"
        )
    defaults = {**DEFAULTS, **(defaults or {})}
    specs: list[ImageSpec] = []
    bad: list[BadLine] = []
    keys: dict[str, int] = {}  # casefolded file key -> line, so no two jobs share a file, even on macOS
    seen: dict[str, int] = {}  # content hash -> how many jobs without an id asked for exactly that
    base = Path(jobs).parent if isinstance(jobs, (str, os.PathLike)) else Path.cwd()
    for line, record, error in _records(jobs):
        try:
            if error:
                raise KolorsError(error)
            job = _job_specs(line, record, defaults, seed, limits, seen, base)
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
                say(f"kolors: {path.name}: ignoring columns {', '.join(map(repr, extra))}")
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


def _job_specs(
    line: int,
    record: dict,
    defaults: Mapping,
    base_seed: int,
    limits: Limits | None,
    seen: dict[str, int],
    base: Path = Path(),
) -> list[ImageSpec]:
    unknown = sorted(set(record) - set(JOB_FIELDS))
    if unknown:
        raise KolorsError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are {', '.join(JOB_FIELDS)}"
        )
    values = {**defaults, **{k: _typed(k, v) for k, v in record.items() if v is not None}}
    if not values.get("prompt", "").strip():
        raise KolorsError('no prompt; every job needs a non-empty "prompt"')
    job_id = values.pop("id", None)
    values["guidance"] = float(values["guidance"])
    if "mask" in values and "strength" not in record:
        values["strength"] = 0.9999  # inpainting's default, as the CLI's
    given = dict(values)  # a content key hashes the image prompts' paths as written, as it always has
    files, images = _read_files(values, base, limits)
    for name in PROMPT_FILE_FIELDS:
        if isinstance(values.get(name), str):
            values[name] = str((base / Path(values[name]).expanduser()).resolve())
    # the values as given, before a seed is derived
    GenerationRequest(**_with_control(values), **images).validate(limits)
    del images  # read to check them; made from their files later
    key = (
        _file_key(job_id)
        if job_id is not None
        else _content_key({**given, **{f"{n}_hash": h for n, _, h in files}}, base_seed, seen)
    )
    n = values["num_images"]
    if values.get("seed") is None:
        values["seed"] = derived_seed(base_seed, key)
    request = dataclasses.replace(GenerationRequest(**_with_control(values)), num_images=1)
    keyed_by = "id" if job_id is not None else "content"
    return [
        ImageSpec(
            f"{key}-{i}.png",
            job_id,
            line,
            i,
            dataclasses.replace(request, seed=request.seed + i),
            keyed_by,
            files,
        )
        for i in range(n)
    ]


def _with_control(values: Mapping) -> dict:
    """The request's fields of a job: its ControlNet fields as one ControlUnit."""
    values = dict(values)
    control = {k: values.pop(k, None) for k in CONTROL_FIELDS}
    if control["controlnet"] is None:
        if any(v is not None for v in control.values()):
            raise KolorsError(
                "control_image, control_scale, control_preprocess and control_mode need a controlnet"
            )
        return values
    if control["control_image"] is None:
        raise KolorsError("controlnet needs a control_image (an image file)")
    unit = ControlUnit(
        control["controlnet"],
        control["control_image"],
        0.7 if control["control_scale"] is None else control["control_scale"],
        control["control_preprocess"] or "none",
        control_mode=control["control_mode"] or "balanced",
    )
    return {**values, "controlnets": (unit,)}


def _read_files(values: dict, base: Path, limits: Limits | None) -> tuple[tuple, dict]:
    """A job's image and mask files: (field, absolute path, content hash) each, and the decoded images (to check).
    Paths are relative to the jobs file's folder."""
    files, images = [], {}
    for name in FILE_FIELDS:
        if name not in values:
            continue
        path = (base / values.pop(name)).resolve()
        images[name] = load_image(path)
        files.append((name, str(path), hashlib.sha256(path.read_bytes()).hexdigest()[:16]))
    if "image" in images:
        w, h = images["image"].size
        check_size(max(w - w % 8, 8), max(h - h % 8, 8), limits=limits)
    return tuple(files), images


def _content_key(values: Mapping, base_seed: int, seen: dict[str, int]) -> str:
    """The file key of a job without an id: its prompt's first words and a hash of what changes its images
    (not num_images: asking for more images keeps the first ones). The n-th identical job gets its own."""
    content = {k: values.get(k) for k in KEYED_FIELDS}
    content |= {
        k: values[k]
        for k, old in LATER_FIELDS.items()
        if k not in KEYED_FIELDS and k in values and values[k] != old
    }
    content |= {k: values[k] for k in ("image_hash", "mask_hash") if k in values}
    if content["seed"] is None:
        content["base_seed"] = base_seed  # its seed is derived from the base seed, so that changes it too
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:10]
    seen[digest] = seen.get(digest, 0) + 1
    if seen[digest] > 1:
        digest = f"{digest}.{seen[digest]}"
    words = re.sub(r"[^\w]+", "_", values["prompt"]).strip("_")[:24].strip("_")
    return f"{words}-{digest}" if words else digest


def _typed(name: str, value):
    """A field's value as its type; CSV gives text, so numbers written as text are accepted."""
    if name in WHOLE_NUMBERS:
        if isinstance(value, str) and re.fullmatch(r"\s*\+?\d+\s*", value):
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise KolorsError(f"{name} must be a whole number, not {value!r}")
    if name in NUMBERS:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
        raise KolorsError(f"{name} must be a number, not {value!r}")
    if name in FLAGS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        raise KolorsError(f"{name} must be true or false, not {value!r}")
    if name == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if name == "loras":
        return _loras(value)
    if isinstance(value, str):
        return value
    raise KolorsError(f"{name} must be text, not {value!r}")


def _loras(value) -> tuple[tuple[str, float], ...]:
    """A job's LoRAs: a list of "FILE:SCALE" texts, {"name": FILE, "scale": S} objects or [FILE, S] pairs; in a
    CSV cell, "FILE:SCALE" entries separated by ';'. The scale defaults to 1."""
    items = [v for v in value.split(";") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise KolorsError(f'loras must be a list like ["style.safetensors:0.8"], not {value!r}')
    loras = []
    for item in items:
        if isinstance(item, str):
            path, _, scale = item.strip().rpartition(":")
            try:
                loras.append((path, float(scale)) if path else (item.strip(), 1.0))
            except ValueError:
                loras.append((item.strip(), 1.0))
        elif isinstance(item, dict) and set(item) <= {"name", "scale"} and isinstance(item.get("name"), str):
            loras.append((item["name"], item.get("scale", 1.0)))
        elif isinstance(item, list) and len(item) == 2 and isinstance(item[0], str):
            loras.append((item[0], item[1]))
        else:
            raise KolorsError(f'a LoRA is "FILE:SCALE" or {{"name": FILE, "scale": S}}, not {item!r}')
    return tuple(loras)


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
