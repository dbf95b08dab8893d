"""One generation request, shared by the CLI, the server and batch jobs: its one validation, its seed rule, and
the PNG files it produces.

The faces build a GenerationRequest and hand it to `KolorsPipeline.generate`; nothing here knows the pipeline.
Every check lives in `check_values` (a server passes its `Limits`), and raises InvalidRequest naming the field,
so the CLI prints one line and the server answers 4xx naming it. Seeds: image i of a request has seed + i, so
each image reproduces on its own; a request without a seed gets a random one, recorded in its images.

Every PNG carries its parameters in a `parameters` text chunk in the AUTOMATIC1111 format, so any tool that
reads those (A1111's PNG Info, ComfyUI, civitai) can show and reproduce the image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from kolors import masks, samplers
from kolors.errors import KolorsError

MAX_SEED = 2**32 - 1
# The names a request may ask for, here so that the faces need not import samplers.
SAMPLERS, SCHEDULES, A1111_NAMES = samplers.SAMPLERS, samplers.SCHEDULES, samplers.A1111_NAMES
MASKED_CONTENT = masks.MASKED_CONTENT  # A1111's inpainting_fill 0..3


class InvalidRequest(KolorsError):
    """A request value out of bounds: `field` names the GenerationRequest field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Limits:
    """Upper bounds a server (or a batch run) puts on requests; None: no bound beyond the engine's own."""

    max_width: int | None = None
    max_height: int | None = None
    max_steps: int | None = None
    max_images: int | None = None


# The bounds `kolors serve` and `kolors batch` apply unless told otherwise (--max-width, ...): a request past
# them is refused before it reaches the device, where it would fail late or take the machine's memory.
DEFAULT_LIMITS = Limits(max_width=2048, max_height=2048, max_steps=150, max_images=8)


# Control image preprocessors (kolors.adapters.preprocess implements them), here so that the faces can list them.
PREPROCESSORS = ("none", "canny", "depth", "openpose", "dwpose")
# sd-webui-controlnet's control modes, by its names: how a ControlNet's residuals are weighted, and on which rows.
CONTROL_MODES = {
    "balanced": "Balanced",  # the weight on every residual, both guidance halves (diffusers' default)
    "prompt": "My prompt is more important",  # weights decaying towards the first skips, both halves
    "control": "ControlNet is more important",  # the same weights, the conditional half alone
}


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet of a request: a loaded ControlNet's name (or a folder or hub repo for the CLI and Python
    to load), its control image (made by `preprocess` from this image, or used as it is with "none"; a file path
    is read when the request runs: batch jobs name files, a server never does), its weight and the fractions of
    the steps where it acts. The default weight is Kolors' official sample's."""

    model: str
    image: Image.Image | str | None = field(default=None, compare=False, repr=False)
    scale: float = 0.7
    preprocess: str = "none"
    start: float = 0.0
    end: float = 1.0
    options: tuple[tuple[str, float], ...] = ()  # the preprocessor's options, e.g. (("low_threshold", 50),)
    control_mode: str = "balanced"  # a key of CONTROL_MODES


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    guidance: float = 5.0
    sampler: str = "euler"
    schedule: str | None = None  # "karras", "exponential"; None: the sampler's own (kolors.samplers)
    seed: int | None = None  # None: drawn at random by `with_seed` and recorded
    width: int = 1024
    height: int = 1024
    num_images: int = 1
    image: Image.Image | None = field(default=None, compare=False, repr=False)  # image-to-image's init image
    strength: float = 0.3
    loras: tuple[
        tuple[str, float], ...
    ] = ()  # (LoRA file or loaded adapter name, scale), applied to this request
    # Inpainting: `mask` over `image`, white = repaint (kolors.masks), with AUTOMATIC1111's options. The mask is
    # blurred `mask_blur` pixels, the original pasted back outside it; `inpaint_padding`: inpaint only the box
    # around the mask, padded so, at full size (A1111's "only masked", diffusers' padding_mask_crop).
    mask: Image.Image | None = field(default=None, compare=False, repr=False)
    mask_blur: float = 4.0
    mask_invert: bool = False
    masked_content: str = "original"  # or "fill", "latent noise", "latent nothing"
    inpaint_padding: int | None = None
    paste_back: bool = True
    # (name, A1111 short hash) of each LoRA, filled in once the LoRAs are loaded: the image's `Lora hashes`
    lora_hashes: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)
    controlnets: tuple[ControlUnit, ...] = ()  # ControlNets steering this request, in order
    # Image prompts: IP-Adapter-Plus' reference image and weight; FaceID-Plus' face photo (or, with face_embeds,
    # insightface's 512-d embedding of the face, the face crop itself) and weight. They need the adapter loaded.
    # An image may also be given as a path to its file (batch jobs): the pipeline reads it.
    ip_image: Image.Image | str | None = field(default=None, compare=False, repr=False)
    ip_scale: float = 0.5
    face_image: Image.Image | str | None = field(default=None, compare=False, repr=False)
    face_embeds: tuple[float, ...] | None = field(default=None, compare=False, repr=False)
    face_scale: float = 0.8
    # (kind, adapter name) of each image prompt, filled in by the pipeline: the image's parameters name them
    image_adapters: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)
    # diffusers' guess mode for every ControlNet: the conditional half alone, weights rising 0.1 to 1 over the
    # skips (each unit's control_mode is sd-webui-controlnet's weighting instead; the two do not combine)
    control_guess_mode: bool = False

    def validate(self, limits: Limits | None = None) -> GenerationRequest:
        """The one validation, before any model is loaded; returns the request itself."""
        check_values(
            steps=self.steps,
            guidance=self.guidance,
            sampler=self.sampler,
            schedule=self.schedule,
            strength=self.strength,
            num_images=self.num_images,
            size=None if self.image is not None else (self.width, self.height),
            limits=limits,
        )
        check_seed(self.seed, self.num_images)
        check_loras(self.loras)
        check_inpaint(self)
        check_controlnets(self.controlnets)
        check_guess_mode(self)
        check_image_prompts(self)
        return self

    def with_seed(self) -> GenerationRequest:
        """This request with its seed drawn, when it has none: the seed every image records."""
        return self if self.seed is not None else dataclasses.replace(self, seed=random_seed(self.num_images))

    @property
    def seeds(self) -> list[int]:
        """The seed of each image: seed, seed + 1, ... (draw one first with `with_seed`)."""
        if self.seed is None:
            raise KolorsError("the request has no seed yet; call with_seed() first")
        return [self.seed + i for i in range(self.num_images)]

    def infotext(self, seed: int, model: str, size: tuple[int, int] | None = None) -> str:
        """The AUTOMATIC1111 `parameters` text for the image made with `seed`; `size` is (width, height)."""
        width, height = size or (self.width, self.height)
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {self.sampler}",
            *([f"Schedule type: {self.schedule}"] if self.schedule else []),
            f"CFG scale: {self.guidance}",
            f"Seed: {seed}",
            f"Size: {width}x{height}",
            f"Model: {model}",
        ]
        if self.image is not None:
            fields.append(f"Denoising strength: {self.strength}")
        if self.mask is not None:  # A1111's names and values for its inpaint settings
            fields.append(f"Mask blur: {self.mask_blur:g}")
            if self.mask_invert:
                fields.append("Mask mode: Inpaint not masked")
            fields.append(f"Masked content: {self.masked_content}")
            if self.inpaint_padding is not None:
                fields += ["Inpaint area: Only masked", f"Masked area padding: {self.inpaint_padding}"]
        if self.lora_hashes:
            fields.append(
                f'Lora hashes: "{", ".join(f"{name}: {digest}" for name, digest in self.lora_hashes)}"'
            )
        for i, unit in enumerate(self.controlnets):  # as sd-webui-controlnet records its units
            fields.append(f'ControlNet {i}: "{control_infotext(unit)}"')
        if self.controlnets and self.control_guess_mode:  # not a unit field: A1111 would refuse the unit
            fields.append("Guess Mode: True")
        names = dict(self.image_adapters)
        for kind, label, image, scale in (
            ("ip", "IP-Adapter", self.ip_image, self.ip_scale),
            ("face", "FaceID", self.face_image, self.face_scale),
        ):
            if image is not None:
                name = names.get(kind, label.lower())
                fields.append(
                    f"{label}: {name}, {label} scale: {scale:g}, {label} image hash: {image_hash(image)}"
                )
        # A1111 keeps each LoRA as a <lora:name:scale> tag in the prompt it records: the image reproduces there.
        tags = "".join(f" <lora:{lora_name(name)}:{scale:g}>" for name, scale in self.loras)
        return f"{self.prompt}{tags}\nNegative prompt: {self.negative_prompt}\n{', '.join(fields)}"

    def as_dict(self) -> dict:
        """The fields as plain data (the images, the mask, the face embedding, the control images and the LoRAs'
        hashes left out)."""
        data = {name: getattr(self, name) for name in FIELDS if name not in IMAGE_FIELDS}
        data["controlnets"] = [
            {k: v for k, v in dataclasses.asdict(u).items() if k != "image"} for u in self.controlnets
        ]
        return data


# The request's scalar fields (the ControlNet units, with their images, travel apart: as_dict lists them).
FIELDS = tuple(
    f.name
    for f in dataclasses.fields(GenerationRequest)
    if f.name not in ("lora_hashes", "controlnets", "image_adapters")
)
IMAGE_FIELDS = ("image", "mask", "ip_image", "face_image", "face_embeds")
FACE_EMBEDDING_DIM = 512


def image_hash(image: Image.Image) -> str:
    """A short hash of an image's pixels (its first 10 sha256 hex digits, as A1111's short model hashes): the same
    reference image gives the same hash whatever file it came in."""

    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                im.load()
                image = im.copy()
        except (OSError, ValueError):
            return "unreadable"
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height} ".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:10]


def check_image_prompts(request: GenerationRequest) -> None:
    for name in ("ip_scale", "face_scale"):
        value = getattr(request, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise InvalidRequest(name, f"{name} must be a finite number >= 0, not {value!r} (0.5 is typical)")
    for name in ("ip_image", "face_image"):
        value = getattr(request, name)
        if isinstance(value, str) and not Path(value).expanduser().is_file():
            raise InvalidRequest(name, f"{name} file not found: {value}; give the path of a PNG or JPEG")
        if value is not None and not isinstance(value, (Image.Image, str)):
            raise InvalidRequest(name, f"{name} must be an image or the path of one")
    embeds = request.face_embeds
    if embeds is not None:
        if request.face_image is None:
            raise InvalidRequest(
                "face_embeds", "face_embeds needs face_image too (the face crop, for its CLIP features)"
            )
        ok = isinstance(embeds, (tuple, list)) and len(embeds) == FACE_EMBEDDING_DIM
        if not ok or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in embeds):
            raise InvalidRequest("face_embeds", f"face_embeds must be {FACE_EMBEDDING_DIM} finite numbers")


def lora_name(name_or_path: str) -> str:
    """A LoRA as A1111 names it: its file's stem (a loaded adapter's name stays as it is)."""
    return Path(name_or_path).stem if Path(name_or_path).suffix else str(name_or_path)


def control_infotext(unit: ControlUnit) -> str:
    """A ControlNet unit as sd-webui-controlnet writes it in an image's parameters (the control image is resized
    to the output size: its "Just Resize")."""
    options = dict(unit.options)
    thresholds = (
        [f"Threshold A: {float(options['low_threshold'])}, Threshold B: {float(options['high_threshold'])}"]
        if {"low_threshold", "high_threshold"} <= set(options)
        else []
    )
    return ", ".join(
        [
            f"Module: {unit.preprocess}",
            f"Model: {controlnet_label(unit.model)}",
            f"Weight: {unit.scale}",
            "Resize Mode: Just Resize",
            *([f"Processor Res: {options['resolution']}"] if "resolution" in options else []),
            *thresholds,
            f"Guidance Start: {unit.start}",
            f"Guidance End: {unit.end}",
            f"Control Mode: {CONTROL_MODES.get(unit.control_mode, unit.control_mode)}",
        ]
    )


def controlnet_label(model: str) -> str:
    """A ControlNet as an image's parameters name it: a loaded one's name, or its folder's or repo's last part."""
    return model.replace("\\", "/").rstrip("/").split("/")[-1] or model


def check_controlnets(units) -> None:
    """Each ControlNet unit: a model name, a control image, a known preprocessor, its weight and window."""
    for i, unit in enumerate(units):
        if not isinstance(unit, ControlUnit):
            raise InvalidRequest(
                "controlnets", f"ControlNet {i} must be a ControlUnit, not {type(unit).__name__}"
            )
        if not isinstance(unit.model, str) or not unit.model.strip():
            raise InvalidRequest(
                "controlnets", f"ControlNet {i} names no model; give a loaded ControlNet's name"
            )
        if not isinstance(unit.image, Image.Image) and not (isinstance(unit.image, str) and unit.image):
            raise InvalidRequest("controlnets", f"ControlNet {i} ({unit.model}) has no control image")
        if unit.preprocess not in PREPROCESSORS:
            raise InvalidRequest(
                "controlnets",
                f"unknown preprocessor {unit.preprocess!r} for ControlNet {i}; choose one of: {', '.join(PREPROCESSORS)}",
            )
        check_control(unit.scale, unit.start, unit.end)
        if unit.control_mode not in CONTROL_MODES:
            raise InvalidRequest(
                "controlnets",
                f"unknown control mode {unit.control_mode!r} for ControlNet {i}; choose one of: "
                f"{', '.join(CONTROL_MODES)}",
            )


def check_guess_mode(request: GenerationRequest) -> None:
    if not isinstance(request.control_guess_mode, bool):
        raise InvalidRequest(
            "control_guess_mode",
            f"control_guess_mode must be true or false, not {request.control_guess_mode!r}",
        )
    modes = {u.control_mode for u in request.controlnets} - {"balanced"}
    if request.control_guess_mode and modes:
        raise InvalidRequest(
            "control_guess_mode",
            f"guess mode is diffusers' weighting and control mode {sorted(modes)[0]!r} sd-webui-controlnet's; "
            "use one: guess mode with Balanced units, or a control mode without guess mode",
        )


def check_loras(loras) -> None:
    for entry in loras:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and entry[0]):
            raise InvalidRequest("loras", f"a LoRA is (file or name, scale), not {entry!r}")
        scale = entry[1]
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
            or scale < 0
        ):
            raise InvalidRequest(
                "loras", f"LoRA '{entry[0]}' scale must be a finite number >= 0, not {scale!r}"
            )


def check_inpaint(request: GenerationRequest) -> None:
    if request.mask is None:
        return
    if request.image is None:
        raise InvalidRequest("mask", "a mask needs the image it covers; send the image too")
    try:
        masks.check_mask(request.mask.convert("L"))
    except KolorsError as e:
        raise InvalidRequest("mask", str(e)) from None
    for name, check in (
        ("inpaint_padding", masks.check_padding),
        ("mask_blur", masks.check_blur),
        ("masked_content", masks.check_content),
    ):
        try:
            check(getattr(request, name), name)
        except KolorsError as e:
            raise InvalidRequest(name, str(e)) from None


# ---------------------------------------------------------------------------------------------------- checks


def check_values(
    *,
    steps: int,
    guidance: float,
    sampler: str | None,
    strength: float,
    num_images: int,
    schedule: str | None = None,
    size: tuple[int, int] | None = None,
    multiple: int = 8,
    limits: Limits | None = None,
) -> None:
    """Every request check, shared by GenerationRequest, the pipeline's keyword call and the server: one line
    each, naming the field. `size` is (width, height), None when an init image sets it."""
    limits = limits or Limits()
    if not _whole(steps) or steps < 1:
        raise InvalidRequest("steps", f"steps must be a whole number of at least 1, not {steps!r}")
    if limits.max_steps is not None and steps > limits.max_steps:
        raise InvalidRequest("steps", f"{steps} steps is over the limit of {limits.max_steps}")
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, (int, float))
        or not math.isfinite(guidance)
        or guidance < 0
    ):
        raise InvalidRequest(
            "guidance", f"guidance scale must be a finite number >= 0, not {guidance!r} (5.0 is typical)"
        )
    try:
        samplers.check_sampler(sampler, schedule)
    except KolorsError as e:
        raise InvalidRequest(
            "schedule" if "schedule" in str(e).split(";")[0] else "sampler", str(e)
        ) from None
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise InvalidRequest(
            "strength", f"strength must be between 0 and 1, not {strength!r} (0.3 keeps most of the image)"
        )
    if not _whole(num_images) or num_images < 1:
        raise InvalidRequest("num_images", f"number of images must be at least 1, not {num_images!r}")
    if limits.max_images is not None and num_images > limits.max_images:
        raise InvalidRequest(
            "num_images",
            f"{num_images} images is over the limit of {limits.max_images} per request",
        )
    if size is not None:
        check_size(*size, multiple=multiple, limits=limits)


def check_size(width: int, height: int, *, multiple: int = 8, limits: Limits | None = None) -> None:
    """Width and height: whole multiples of `multiple` (the VAE's factor), within `limits`."""
    limits = limits or Limits()
    for name, value, limit in (("width", width, limits.max_width), ("height", height, limits.max_height)):
        if not _whole(value) or value < multiple:
            raise InvalidRequest(
                name, f"{name} must be a whole number of at least {multiple} pixels, not {value!r}"
            )
        if value % multiple:
            low = value - value % multiple
            raise InvalidRequest(
                name, f"{name} {value} is not a multiple of {multiple}; use {low} or {low + multiple}"
            )
        if limit is not None and value > limit:
            raise InvalidRequest(name, f"{name} {value} is over the limit of {limit} pixels")


def check_control(scale: float, start: float, end: float, field: str = "controlnets") -> None:
    """One ControlNet's weight (a finite number) and its window: the fractions of the steps where it acts."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidRequest(
            field, f"ControlNet scale must be a finite number (0.7 is typical), not {scale!r}"
        )
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise InvalidRequest(field, f"ControlNet guidance {name} must be between 0 and 1, not {value!r}")
    if start >= end:
        raise InvalidRequest(field, f"ControlNet guidance start {start} must be below its end {end}")


def check_seed(seed: int | None, count: int = 1) -> None:
    """A seed (None: to be drawn) whose `count` images' seeds seed .. seed + count - 1 are all valid."""
    if seed is None:
        return
    high = MAX_SEED - count + 1
    if not _whole(seed) or not 0 <= seed <= high:
        per = f" for {count} images (image i gets seed + i)" if count > 1 else ""
        raise InvalidRequest("seed", f"seed must be a whole number between 0 and {high}{per}, not {seed!r}")


def random_seed(count: int = 1) -> int:
    """A random first seed for `count` images, so that every seed + i stays valid."""
    return random.randint(0, MAX_SEED - max(count, 1) + 1)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------- PNG files


def png_info(infotext: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    return info


def png_bytes(image: Image.Image, infotext: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(infotext))
    return buf.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike, infotext: str) -> Path:
    """Write the PNG to a temporary file in the same folder and rename it into place, so an interrupted run never
    leaves a half-written image under the final name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_info(infotext))
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
