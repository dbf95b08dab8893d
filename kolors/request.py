"""One generation request, shared by the CLI, the server and batch jobs, and the PNG files it produces.

Every PNG carries its parameters in a `parameters` text chunk in the AUTOMATIC1111 format, so any tool that
reads those (A1111's PNG Info, ComfyUI, civitai) can show and reproduce the image.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from kolors.pipeline import KolorsPipeline, validate, validate_size


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    guidance: float = 5.0
    sampler: str = "euler"
    seed: int | None = None  # None: drawn at random and recorded
    width: int = 1024
    height: int = 1024
    num_images: int = 1
    image: Image.Image | None = field(
        default=None, compare=False, repr=False
    )  # init image for image-to-image
    strength: float = 0.3

    def validate(self) -> None:
        """The cheap checks, before any model is loaded."""
        validate(
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            sampler=self.sampler,
            strength=self.strength,
            num_images_per_prompt=self.num_images,
        )
        if self.image is None:
            validate_size(self.height, self.width)

    def run(self, pipe: KolorsPipeline, **kwargs) -> list[tuple[Image.Image, int]]:
        """Generate: (image, seed) pairs, image i seeded by seed + i so each one reproduces on its own."""
        self.validate()
        out = pipe(
            self.prompt,
            negative_prompt=self.negative_prompt,
            height=None if self.image else self.height,
            width=None if self.image else self.width,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            sampler=self.sampler,
            seed=None if self.seed is None else [self.seed + i for i in range(self.num_images)],
            num_images_per_prompt=self.num_images,
            image=self.image,
            strength=self.strength,
            **kwargs,
        )
        return list(zip(out.images, out.seeds, strict=True))

    def infotext(self, seed: int, model: str, size: tuple[int, int] | None = None) -> str:
        """The AUTOMATIC1111 `parameters` text for the image made with `seed`; `size` is (width, height)."""
        width, height = size or (self.width, self.height)
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {self.sampler}",
            f"CFG scale: {self.guidance}",
            f"Seed: {seed}",
            f"Size: {width}x{height}",
            f"Model: {model}",
        ]
        if self.image is not None:
            fields.append(f"Denoising strength: {self.strength}")
        return f"{self.prompt}\nNegative prompt: {self.negative_prompt}\n{', '.join(fields)}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("image")
        return d


def png_bytes_info(infotext: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    return info


def save_png(image: Image.Image, path: str | os.PathLike, infotext: str) -> Path:
    """Write the PNG to a temporary file in the same folder and rename it into place, so an interrupted run never
    leaves a half-written image under the final name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_bytes_info(infotext))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; an image is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it, racy under threads


def read_parameters(path: str | os.PathLike) -> str | None:
    """The `parameters` text chunk of a PNG, if any."""
    with Image.open(path) as im:
        return im.text.get("parameters") if hasattr(im, "text") else None
