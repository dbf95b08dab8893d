"""The output folder of a batch run: its manifest, its lock, and what is already done in it.

Each image is written to a temporary file and renamed when complete (request.save_png), then recorded in
DIR/manifest.jsonl, appended and fsynced per image. Running the same command again makes only what is missing:

- an image the manifest records and DIR holds is skipped;
- a leftover temporary file (a kill during a write) is deleted: no PNG under a final name is ever partial;
- a torn last manifest line (a kill during an append) is dropped, as are rows whose PNG was deleted (remade);
- a PNG in DIR but not in the manifest (a kill between the rename and the append) is read back: if it decodes
  and its `parameters` text is this job's request and seed, it is added to the manifest, else made again.

No file written here follows a symbolic link it did not make: the lock and the manifest are opened with
O_NOFOLLOW (a link there is an error, and the lock is never truncated), temporary files are created exclusively,
and a link standing where an image goes is not an image of ours: it is replaced by the image (a rename replaces
the link, never its target).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from kolors.batch.jobs import ImageSpec, say
from kolors.errors import KolorsError

try:
    import fcntl
except ImportError:  # Windows: no advisory lock, one run per folder is then up to the user
    fcntl = None

MANIFEST = "manifest.jsonl"
LOCK = ".kolors-batch.lock"
TEMP_FILES = ".*.png.tmp"  # what save_png writes before its rename
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 on Windows, where links need privileges to make


def open_nofollow(path: Path, flags: int, mode: str):
    """`open(path, mode)` that refuses a symbolic link at `path` (one line naming it) instead of following it."""
    try:
        fd = os.open(path, flags | NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError:
        if path.is_symlink():
            raise KolorsError(
                f"{path} is a symbolic link; kolors batch does not write through links it did not make "
                "(remove it)"
            ) from None
        raise
    return os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")


def is_plain_file(path: Path) -> bool:
    """A regular file, not a link to one."""
    return path.is_file() and not path.is_symlink()


class Manifest:
    """DIR/manifest.jsonl: one JSON row per finished image (an ImageSpec and the model), appended and fsynced
    as each image lands. Opening it drops torn lines and rows whose PNG is gone, rewriting it atomically."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / MANIFEST
        self.rows = self._load()
        self._file = open_nofollow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "a")

    def _load(self) -> dict[str, dict]:
        if not os.path.lexists(self.path):
            return {}
        with open_nofollow(self.path, os.O_RDONLY, "rb") as f:
            raw = f.read()
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
            if isinstance(name, str) and Path(name).name == name and is_plain_file(self.path.parent / name)
        }
        if not clean or len(kept) != len(rows):
            tmp = self.path.with_name(f".{MANIFEST}.tmp")
            tmp.unlink(missing_ok=True)  # a leftover (or a planted link): removed, never written through
            with open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "w") as f:
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
def claim(output_dir: Path) -> Iterator[None]:
    """Create the folder, hold its lock for the run (two runs on one folder would make images twice) and clear
    the temporary files an interrupted run left."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise KolorsError(f"output {output_dir} is a file; --output must be a folder") from None
    # Opened without truncating it (a lock file holds nothing) and without following a link someone put there.
    with open_nofollow(output_dir / LOCK, os.O_RDWR | os.O_CREAT, "r+b") as lock:
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


def plan(specs: list[ImageSpec], output_dir: Path, manifest: Manifest) -> tuple[list[ImageSpec], int]:
    """The images still to make, and how many are done already; re-adds finished PNGs the manifest missed."""
    pending, skipped, changed, adopted = [], 0, [], []
    legacy = _line_keyed(manifest)
    for spec in specs:
        row = manifest.rows.get(spec.file)
        if row is not None:
            skipped += 1
            if ImageSpec.from_row(row).params != spec.params:
                changed.append(spec.file)
            continue
        old = legacy.pop(_without_seed(spec), None) if spec.keyed_by == "content" else None
        if old is not None:  # made by an earlier kolors under its line number: the same job, kept
            adopted.append(old)
            skipped += 1
            continue
        model = _made_by(output_dir / spec.file, spec)
        if model is None:
            pending.append(spec)
        else:
            manifest.append(spec.row(model))
            skipped += 1
    if changed:
        say(
            f"kolors: {len(changed)} finished image(s), e.g. {changed[0]}, were made with other parameters "
            "than their jobs now ask for; kept (delete them to make them again)"
        )
    if adopted:
        say(
            f"kolors: {len(adopted)} image(s) named by line number by an earlier kolors, e.g. {adopted[0]}, are "
            "their jobs' images; kept under their names (jobs without an id are now named by their content)"
        )
    return pending, skipped


def _without_seed(spec: ImageSpec) -> tuple:
    return (spec.index, *(v for k, v in sorted(spec.params.items()) if k != "seed"))


def _line_keyed(manifest: Manifest) -> dict[tuple, str]:
    """The images of jobs without an id that runs before content keys named by line number (000042-0.png), by
    what they show (the seed aside: it was derived from the line), so upgrading does not make them again."""
    found = {}
    for name, row in manifest.rows.items():
        spec = ImageSpec.from_row(row)
        if spec.keyed_by == "line":
            found.setdefault(_without_seed(spec), name)
    return found


def _made_by(path: Path, spec: ImageSpec) -> str | None:
    """The model name of a complete PNG at `path` made for `spec`, or None (absent, unreadable, another's)."""
    if not is_plain_file(path):  # absent, or a link: not an image this folder made
        return None
    try:
        with Image.open(path) as im:
            im.load()
            text = im.text.get("parameters", "")
    except Exception:  # any decoding failure means: not a finished image of ours
        return None
    # The model is the one field not known before loading; the fields after it (strength, inpainting, ControlNet
    # units) must all be there, beside those known only once made (LoRA hashes).
    prefix, suffix = spec.infotext("\0").split("\0")
    if not text.startswith(prefix) or "\n" in text[len(prefix) :]:
        return None
    model, _, after = text[len(prefix) :].partition(", ")
    if suffix and not set(suffix.removeprefix(", ").split(", ")) <= set(after.split(", ")):
        return None
    return model
