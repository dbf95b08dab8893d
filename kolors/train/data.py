"""Training data: a folder of images and their captions, aspect-ratio buckets, and the caches of what stays
frozen (VAE latents, text embeddings), so that the VAE and the text encoder can leave memory before training.

Captions come from same-name `.txt` files (kohya's convention), a `metadata.jsonl` of `{"file_name", "text"}`
lines (Hugging Face's imagefolder), or one caption for every image. Each image goes to the bucket (width and
height multiples of 64, about resolution² pixels) nearest its aspect ratio, is resized to cover it and
center-cropped; the SDXL size conditioning records the original size, the crop's top-left and the bucket.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from kolors.errors import KolorsError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUCKET_STEP = 64
MAX_ASPECT = 2.0  # buckets from 1:2 to 2:1, as kohya's defaults allow about


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def read_folder(folder: str | Path, caption: str | None = None, what: str = "training data") -> list[Example]:
    """The images of `folder` with their captions: `caption` for all when given, else metadata.jsonl's `text`,
    else each image's same-name .txt. A missing folder, no images or a missing caption is one clear error."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise KolorsError(f"{what} folder {folder} not found; pass a folder of images with .txt captions")
    try:
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as e:
        raise KolorsError(f"{what} folder {folder} cannot be read ({e.strerror or e})") from None
    if not images:
        raise KolorsError(
            f"{what} folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); put the images and their "
            "same-name .txt captions there"
        )
    if caption is not None:
        return [Example(p, caption) for p in images]
    metadata = folder / "metadata.jsonl"
    captions = _read_metadata(metadata) if metadata.is_file() else {}
    examples, missing = [], []
    for p in images:
        text = captions.get(p.name)
        txt = p.with_suffix(".txt")
        if text is None and txt.is_file():
            text = txt.read_text(encoding="utf-8").strip()
        if text is None:
            missing.append(p.name)
        else:
            examples.append(Example(p, text))
    if missing:
        raise KolorsError(
            f"{len(missing)} of {len(images)} images in {folder} have no caption (first: {missing[0]}); add "
            "same-name .txt files, a metadata.jsonl with file_name and text, or give one caption for all "
            "(--caption)"
        )
    return examples


def _read_metadata(path: Path) -> dict[str, str]:
    captions = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[Path(row["file_name"]).name] = str(row["text"])
        except (ValueError, KeyError, TypeError):
            raise KolorsError(
                f"{path} line {n} is not a JSON object with file_name and text: {line[:80]!r}"
            ) from None
    return captions


def check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < BUCKET_STEP:
        raise KolorsError(f"resolution must be a whole number of pixels >= {BUCKET_STEP}, not {resolution!r}")
    if resolution % BUCKET_STEP:
        lower = resolution - resolution % BUCKET_STEP
        raise KolorsError(
            f"resolution {resolution} is not a multiple of {BUCKET_STEP}; use {max(lower, BUCKET_STEP)} "
            f"or {lower + BUCKET_STEP}"
        )


def buckets(resolution: int) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of 64, at most resolution² pixels, aspect ratios up to 2:1 either way."""
    check_resolution(resolution)
    area, out = resolution * resolution, {(resolution, resolution)}
    for w in range(BUCKET_STEP, 2 * resolution + 1, BUCKET_STEP):
        h = min(area // w // BUCKET_STEP * BUCKET_STEP, 2 * resolution)
        if h >= BUCKET_STEP and max(w / h, h / w) <= MAX_ASPECT:
            out.add((w, h))
    return sorted(out)


def nearest_bucket(width: int, height: int, choices: Sequence[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(choices, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def fit(image: Image.Image, bucket: tuple[int, int]) -> tuple[Tensor, tuple[int, ...]]:
    """The image resized to cover `bucket` and center-cropped to it, as (3, h, w) in [-1, 1], and its six SDXL
    size ids: original (h, w), crop top-left (top, left), target (h, w)."""
    bw, bh = bucket
    scale = max(bw / image.width, bh / image.height)
    size = (max(bw, round(image.width * scale)), max(bh, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - bw) // 2, (size[1] - bh) // 2
    cropped = resized.crop((left, top, left + bw, top + bh))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return pixels, (image.height, image.width, top, left, bh, bw)


@dataclass
class LatentCache:
    """The frozen VAE's view of the training images, one entry per usable image."""

    examples: list[Example]
    mean: list[Tensor]  # (2 if flipped else 1, C, h, w): unscaled latent means (row 1: the mirrored image)
    std: list[Tensor]  # the same shape: the latent distribution's std, so each step draws its own latent
    time_ids: list[Tensor]  # (6,) each
    buckets: list[tuple[int, int]]
    skipped: list[str]  # "name (why)" of each image that could not be read


def cache_latents(
    examples: Sequence[Example],
    encode: Callable[[Tensor], tuple[Tensor, Tensor]],
    resolution: int,
    flip: bool,
) -> LatentCache:
    """Encode every image once (and its mirror image when `flip`) with `encode` (pixels (N, 3, h, w) -> latent
    mean and logvar). An image that cannot be read is skipped with a warning and counted."""
    choices = buckets(resolution)
    cache = LatentCache([], [], [], [], [], [])
    for example in examples:
        try:
            with Image.open(example.image) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            cache.skipped.append(f"{example.image.name} ({why})")
            warnings.warn(f"skipping unreadable image {example.image}: {why}", UserWarning, stacklevel=2)
            continue
        bucket = nearest_bucket(image.width, image.height, choices)
        pixels, ids = fit(image, bucket)
        batch = torch.stack([pixels, pixels.flip(-1)]) if flip else pixels[None]
        mean, logvar = encode(batch)
        cache.examples.append(example)
        cache.mean.append(mean.float().cpu())
        cache.std.append(torch.exp(0.5 * logvar.float()).cpu())
        cache.time_ids.append(torch.tensor(ids, dtype=torch.float32))
        cache.buckets.append(bucket)
    if cache.skipped:
        warnings.warn(
            f"skipped {len(cache.skipped)} of {len(examples)} images that could not be read: "
            + ", ".join(cache.skipped[:5]),
            UserWarning,
            stacklevel=2,
        )
    if not cache.examples:
        raise KolorsError(f"none of the {len(examples)} images could be read; first: {cache.skipped[0]}")
    return cache


# ------------------------------------------------------------------------------------------------ data order


def epoch_batches(
    buckets_of: Sequence[tuple[int, int]], batch: int, seed: int, epoch: int
) -> list[list[int]]:
    """One epoch's batches of example indices, each from one bucket: each bucket's examples shuffled and cut
    into batches (the last one filled up from the bucket's start, so every batch is full), then the batches
    shuffled. A function of (seed, epoch) alone: a resumed run, or one over more processes, sees the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(buckets_of):
        groups.setdefault(b, []).append(i)
    out = []
    for key in sorted(groups):
        members = [groups[key][j] for j in torch.randperm(len(groups[key]), generator=g).tolist()]
        n = math.ceil(len(members) / batch) * batch
        members = [members[j % len(members)] for j in range(n)]
        out += [members[j : j + batch] for j in range(0, n, batch)]
    return [out[j] for j in torch.randperm(len(out), generator=g).tolist()]


class DataOrder:
    """The global batch of micro-step `i` (its epoch's batches computed once per epoch)."""

    def __init__(self, buckets_of: Sequence[tuple[int, int]], batch: int, seed: int):
        self.buckets_of, self.batch, self.seed = list(buckets_of), batch, seed
        self.per_epoch = len(epoch_batches(self.buckets_of, batch, seed, 0))
        self._epoch, self._batches = -1, []

    def __call__(self, i: int) -> list[int]:
        epoch, j = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.buckets_of, self.batch, self.seed, epoch)
        return self._batches[j]
