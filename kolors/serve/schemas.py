"""The HTTP API's bodies and limits: AUTOMATIC1111's and OpenAI's request fields as pydantic models, and the
checks that turn them into GenerationRequests under this server's limits.

Every check raises RequestError naming the field, so a bad request answers 4xx with a message a person can act
on; uploads are measured before they are decoded, and decoded only under a pixel limit.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from kolors.errors import KolorsError
from kolors.request import (
    A1111_NAMES,
    DEFAULT_LIMITS,
    MASKED_CONTENT,
    MAX_SEED,
    SAMPLERS,
    SCHEDULES,
    GenerationRequest,
    InvalidRequest,
    Limits,
    check_size,
)

MAX_PROMPT_CHARS = 10_000
BASE64_CHUNK = 1 << 16  # characters of base64 decoded at a time (64 KiB: well under a millisecond each)
DEFAULT_STEPS = 50
UPLOAD_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF"]
A1111_SCHEDULES = {"karras": "Karras", "exponential": "Exponential"}


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None  # Bearer token every API call must carry; None: no key
    queue_size: int = 64  # jobs waiting (the running ones not counted); more answer 429
    max_width: int = DEFAULT_LIMITS.max_width
    max_height: int = DEFAULT_LIMITS.max_height
    max_steps: int = DEFAULT_LIMITS.max_steps
    max_n: int = DEFAULT_LIMITS.max_images  # images per request
    max_upload_mb: float = 20.0
    max_upload_pixels: int = 4096 * 4096  # an upload is decoded only under this many pixels
    max_decodes: int = 2  # uploads decoded at once; more wait (each may take hundreds of MB while decoded)
    url_ttl: float = 3600.0  # seconds a response_format=url image stays downloadable
    url_store_mb: float = 512.0  # memory for those images; the oldest go first
    preview_every: int = 1  # a live preview for /sdapi/v1/progress every this many steps; 0: none
    lora_dir: str | None = None  # the LoRAs requests may name: the files in this folder, by their stem
    allowed_hosts: tuple[str, ...] = ()  # Host names answered without a key, beyond the loopback ones
    # Names clients may ask for (vLLM's --served-model-name); the first is the one answers carry. Empty: the
    # model's own name. OpenAI's own model names are accepted too, for clients that hard-code one.
    served_model_names: tuple[str, ...] = ()

    def check(self) -> None:
        for name in (
            "queue_size",
            "max_width",
            "max_height",
            "max_steps",
            "max_n",
            "max_upload_pixels",
            "max_decodes",
        ):
            if getattr(self, name) < 1:
                raise KolorsError(f"{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise KolorsError(
                f"lora-dir {self.lora_dir} is not a folder; give the folder that holds the LoRA files"
            )
        if not isinstance(self.preview_every, int) or self.preview_every < 0:
            raise KolorsError(f"preview-every must be a whole number >= 0, not {self.preview_every}")
        for name in ("max_upload_mb", "url_ttl", "url_store_mb"):
            if not getattr(self, name) > 0:
                raise KolorsError(f"{name.replace('_', '-')} must be positive, not {getattr(self, name)}")
        if self.max_width % 8 or self.max_height % 8:
            raise KolorsError("max-width and max-height must be multiples of 8")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def limits(self) -> Limits:
        return Limits(self.max_width, self.max_height, self.max_steps, self.max_n)


class RequestError(Exception):
    """A bad request: 422 (400 on OpenAI routes) naming the field."""

    def __init__(self, field: str | None, message: str, status: int = 422):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.status = field, status


class Detail(BaseModel):
    detail: str


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


# ---------------------------------------------------------------------------------------------------- requests


class A1111Request(BaseModel):
    """The fields AUTOMATIC1111 clients send; the others are ignored, as AUTOMATIC1111 does."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    prompt: str | None = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: random; image i gets seed + i")
    steps: int | None = Field(None, ge=1, description="default 50 (or this server's maximum if lower)")
    cfg_scale: float = Field(5.0, ge=0, le=100)
    width: int | None = Field(None, ge=8, description="multiple of 8; default the model's native size")
    height: int | None = Field(None, ge=8, description="multiple of 8; default the model's native size")
    sampler_name: str | None = Field(None, description="see /sdapi/v1/samplers; default Euler")
    sampler_index: str | None = Field(None, description="the older name of sampler_name")
    scheduler: str | None = Field(None, description="Automatic (the sampler's own), Karras or Exponential")
    batch_size: int = Field(1, ge=1, description="images per pipeline call")
    n_iter: int = Field(1, ge=1, description="pipeline calls, one after the other")
    # What AUTOMATIC1111 can do and kolors cannot: refused (422 naming the field) when it would change the
    # images, so a client never gets other images than it asked for with a 200. Cosmetic fields (save_images,
    # send_images, do_not_save_samples, do_not_save_grid, ...) are ignored, as any unknown field.
    enable_hr: bool = Field(False, description="hires fix: not supported, must be false")
    restore_faces: bool | None = Field(None, description="face restoration: not supported, must be false")
    tiling: bool | None = Field(None, description="tiling: not supported, must be false")
    script_name: str | None = Field(None, description="scripts: not supported, must be empty")
    alwayson_scripts: dict[str, Any] | None = Field(
        None, description="extensions: only ControlNet (sd-webui-controlnet's units in args)"
    )
    override_settings: dict[str, Any] | None = Field(
        None, description="only sd_model_checkpoint is read: it must name the served model"
    )
    force_task_id: str | None = Field(
        None,
        max_length=200,
        description="the id to follow this job by: POST /internal/progress's id_task, /sdapi/v1/interrupt's",
    )

    def refuse_unsupported(self, answers_to) -> None:
        """A 422 naming the first field whose value would make other images than kolors can make."""
        refused = {
            "enable_hr": "hires fix is not supported; leave enable_hr false and ask for the size directly",
            "restore_faces": "face restoration is not supported; leave restore_faces false",
            "tiling": "tiling is not supported; leave tiling false",
            "script_name": "scripts are not supported; leave script_name empty",
        }
        for name, message in refused.items():
            if getattr(self, name):
                raise RequestError(name, message)
        for key in self.alwayson_scripts or {}:
            if key.lower() != "controlnet":
                raise RequestError(
                    f"alwayson_scripts.{key}",
                    "extensions other than ControlNet (ADetailer, ...) are not supported; send only ControlNet",
                )
        wanted = (self.override_settings or {}).get("sd_model_checkpoint")
        if wanted and not answers_to(str(wanted)):
            raise RequestError(
                "override_settings.sd_model_checkpoint",
                f"this server serves one model and cannot load {str(wanted)!r}",
            )


class Txt2ImgRequest(A1111Request):
    """AUTOMATIC1111's txt2img body."""


class Img2ImgRequest(A1111Request):
    """AUTOMATIC1111's img2img body: the init image is resized to width x height when they are given, else
    kept at its own size (rounded down to a multiple of 8)."""

    init_images: list[str] = Field(
        min_length=1, description="base64 PNG/JPEG/WebP, with or without a data: prefix; the first is used"
    )
    denoising_strength: float = Field(0.75, ge=0, le=1)
    mask: str | None = Field(
        None, description="inpainting: base64 mask, white (or opaque) = repaint, resized to the image"
    )
    mask_blur: float = Field(4, ge=0, le=256, description="pixels")
    inpainting_fill: int = Field(
        0, ge=0, le=3, description="masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing"
    )
    inpaint_full_res: bool = Field(True, description="inpaint only the masked area, at full resolution")
    inpaint_full_res_padding: int = Field(0, ge=0, description="pixels around the masked area")
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: repaint what the mask leaves black")
    include_init_images: bool = False


class A1111Response(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


class LoraChoice(BaseModel):
    name: str = Field(
        min_length=1, description="a LoRA file's name in the server's --lora-dir (see /sdapi/v1/loras)"
    )
    scale: float = Field(1.0, ge=0, le=10, allow_inf_nan=False)


class OpenAIControlNet(BaseModel):
    """One ControlNet of an OpenAI request (Kolors' extension field)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(
        min_length=1, description="a ControlNet this server loaded (GET /controlnet/model_list)"
    )
    image: str = Field(min_length=1, description="the control image, base64")
    scale: float = Field(0.7, ge=0, le=10)
    preprocess: str = Field("none", description="none, canny, depth, openpose or dwpose")
    start: float = Field(0.0, ge=0, le=1)
    end: float = Field(1.0, ge=0, le=1)
    control_mode: str = Field(
        "balanced",
        description="sd-webui-controlnet's control mode: balanced, prompt (My prompt is more important) or "
        "control (ControlNet is more important)",
    )


class OpenAIImageRequest(BaseModel):
    """OpenAI's images/generations body, plus Kolors' own fields."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(
        None,
        description="a served name (GET /v1/models), 'kolors', or one of OpenAI's (dall-e-2, dall-e-3, ...)",
    )
    n: int | None = Field(1, ge=1)
    size: str | None = Field(None, description="WxH, multiples of 8, or auto (the model's native size)")
    response_format: Literal["b64_json", "url"] | None = None
    stream: bool | None = Field(None, description="streaming is not supported")
    negative_prompt: str | None = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(
        None, ge=-1, le=MAX_SEED, description="-1 or absent: random; image i gets seed + i"
    )
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    sampler: str | None = Field(
        None,
        description="euler (default), euler-a, heun, dpmpp-2m, dpmpp-2m-sde, unipc, ddim, lcm, or an A1111 name",
    )
    schedule: str | None = Field(None, description="karras or exponential; absent: the sampler's own")
    loras: list[LoraChoice] | None = Field(None, description="LoRAs from the server's --lora-dir, by name")
    controlnet: list[OpenAIControlNet] | None = Field(
        None, description="ControlNets this server loaded, each with its control image"
    )
    control_guess_mode: bool = Field(
        False,
        description="diffusers' guess mode for the ControlNets: the conditional half alone, weights rising "
        "from 0.1 to 1 over the skips (with balanced units only)",
    )
    ip_adapter_image: str | None = Field(
        None, description="reference image (base64 PNG/JPEG/WebP) for the server's --ip-adapter"
    )
    ip_adapter_scale: float | None = Field(None, ge=0, le=10, description="its weight (default 0.5)")
    face_image: str | None = Field(
        None, description="a photo of the face to keep (base64 PNG/JPEG/WebP) for the server's --faceid"
    )
    face_scale: float | None = Field(None, ge=0, le=10, description="its weight (default 0.8)")
    face_embeds: list[float] | None = Field(
        None,
        min_length=512,
        max_length=512,
        description="insightface's 512-d embedding of the face, with face_image the face crop: no face detection",
    )


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    seed: int


class OpenAIImagesResponse(BaseModel):
    created: int
    model: str | None = None  # the served name, whatever name the client asked for
    data: list[OpenAIImage]
    size: str
    output_format: str = "png"


# ---------------------------------------------------------------------------------------------------- checks


LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")
LORA_SUFFIXES = (".safetensors", ".pt", ".bin")


def lora_files(folder: str | None) -> dict[str, Path]:
    """The LoRAs in `folder` (recursively) by file stem, as A1111's Lora folder."""
    if folder is None:
        return {}
    files = sorted(f for f in Path(folder).rglob("*") if f.suffix.lower() in LORA_SUFFIXES and f.is_file())
    return {f.stem: f for f in files}


def lora_file(name: str, loras: dict[str, Path], field: str) -> str:
    if name not in loras:
        known = ", ".join(sorted(loras)) or "none: start the server with --lora-dir DIR"
        raise RequestError(field, f"unknown LoRA {name!r}; this server has: {known}")
    return str(loras[name])


def take_lora_tags(prompt: str, loras: dict[str, Path]) -> tuple[str, tuple[tuple[str, float], ...]]:
    """A1111's <lora:NAME:SCALE> tags taken out of the prompt, as (prompt without them, ((file, scale), ...))."""
    chosen = []
    for name, scale in LORA_TAG.findall(prompt):
        try:
            value = float(scale) if scale.strip() else 1.0
        except ValueError:
            raise RequestError("prompt", f"<lora:{name}:{scale}> has no number for its scale") from None
        chosen.append((lora_file(name.strip(), loras, "prompt"), value))
    text = " ".join(LORA_TAG.sub(" ", prompt).split()) if chosen else prompt
    return text, tuple(chosen)


def checked(request: GenerationRequest, config: ServerConfig, fields: dict[str, str]) -> GenerationRequest:
    """`request` validated under this server's limits, its seed drawn when absent; a bad value is a
    RequestError naming the API's own field (`fields` maps GenerationRequest's names to the API's)."""
    try:
        return request.validate(config.limits).with_seed()
    except InvalidRequest as e:
        raise RequestError(fields.get(e.field, e.field), str(e)) from None


def default_steps(steps: int | None, config: ServerConfig) -> int:
    return min(DEFAULT_STEPS, config.max_steps) if steps is None else steps


def a1111_aliases(sampler: str) -> list[str]:
    """Other names clients send for `sampler`: ours, k-diffusion's (k_euler_a), and A1111's without " Karras"."""
    title = A1111_NAMES[sampler]
    return [
        n for n in (sampler, "k_" + sampler.replace("-", "_"), title.removesuffix(" Karras")) if n != title
    ]


def resolve_sampler(
    name: str | None, schedule: str | None = None, field: str = "sampler"
) -> tuple[str, str | None]:
    """A sampler name as A1111 or Kolors spells it (any case), and an A1111 scheduler (Automatic, Karras,
    Exponential), as (sampler, schedule). "X Karras" for a sampler whose own schedule is not Karras asks for
    its Karras schedule, as A1111's names do."""
    kind = None
    if schedule not in (None, "") and schedule.lower() != "automatic":
        kind = schedule.lower()
        if kind not in SCHEDULES:
            known = ", ".join(["Automatic", *A1111_SCHEDULES.values()])
            raise RequestError(
                "scheduler" if field == "sampler_name" else "schedule",
                f"unknown schedule {schedule!r}; choose one of: {known}",
            )
    if name is None or name == "":
        return "euler", kind
    wanted = name.strip().lower()
    for key in SAMPLERS:
        if wanted in {n.lower() for n in (A1111_NAMES[key], *a1111_aliases(key))}:
            return key, kind
    for key in SAMPLERS:  # "Euler Karras": the sampler with a schedule of its name
        for suffix, schedule_name in A1111_SCHEDULES.items():
            if wanted in {
                f"{n.lower()} {schedule_name.lower()}" for n in (A1111_NAMES[key], *a1111_aliases(key))
            }:
                return key, kind or suffix
    known = ", ".join(A1111_NAMES[k] for k in SAMPLERS)
    raise RequestError(field, f"unknown sampler {name!r}; choose one of: {known} (or {', '.join(SAMPLERS)})")


def parse_size(size: str | None, default: tuple[int, int], config: ServerConfig) -> tuple[int, int] | None:
    """OpenAI's "WxH" as (width, height); "auto" or absent: `default` (None means the image's own)."""
    if size is None or size == "auto":
        return default
    m = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", size)
    if not m:
        raise RequestError("size", f"{size!r} is not WIDTHxHEIGHT, e.g. 1024x1024, or auto")
    return checked_size(int(m[1]), int(m[2]), config, field="size")


def checked_size(width: int, height: int, config: ServerConfig, field: str | None = None) -> tuple[int, int]:
    """An output size within this server's limits; a bad one names `field`, else width or height."""
    try:
        check_size(width, height, limits=config.limits)
    except InvalidRequest as e:
        raise RequestError(field or e.field, str(e)) from None
    return width, height


def decode_base64(data: str, config: ServerConfig, field: str) -> bytes:
    """A base64 image, with or without a data:image/...;base64, prefix; its length is checked before decoding."""
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(field, "a data: URL must be base64 (data:image/png;base64,...)")
    if len(data) > math.ceil(config.max_upload_bytes / 3) * 4 + 1024:
        raise RequestError(
            field, f"image is over this server's upload limit of {config.max_upload_mb:g} MB", 413
        )
    parts, carry = [], ""
    try:
        for start in range(0, len(data), BASE64_CHUNK):
            piece = carry + "".join(data[start : start + BASE64_CHUNK].split())  # whitespace dropped
            cut = len(piece) - len(piece) % 4
            parts.append(base64.b64decode(piece[:cut], validate=True))
            carry = piece[cut:]
            time.sleep(0)  # let go of the GIL between pieces: the event loop's thread gets its turn
        if carry:
            raise ValueError("truncated")
    except (binascii.Error, ValueError):
        raise RequestError(field, "not valid base64 image data") from None
    return b"".join(parts)


def decode_image(data: bytes, config: ServerConfig, field: str, mode: str | None = "RGB") -> Image.Image:
    """Decode an uploaded image under the size limits: bytes first, then pixels from the header before the decode.
    `mode=None` keeps the image's own bands (a mask's alpha)."""
    if len(data) > config.max_upload_bytes:
        raise RequestError(
            field, f"image is over this server's upload limit of {config.max_upload_mb:g} MB", 413
        )
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as im:
            if im.width * im.height > config.max_upload_pixels:
                raise RequestError(
                    field,
                    f"image of {im.width}x{im.height} is over this server's limit of {config.max_upload_pixels} pixels",
                )
            im.load()
            return im.convert(mode) if mode else im.copy()
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(field, "not an image this server reads; send a PNG, JPEG or WebP") from None
    except Exception as e:  # anything PIL raises on untrusted bytes means the client sent a bad image
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RequestError(field, f"cannot decode the image ({reason}); send a PNG, JPEG or WebP") from None


def decode_mask(data: bytes, config: ServerConfig, field: str, transparent_edits: bool) -> Image.Image:
    """An uploaded inpainting mask as grayscale, white = repaint. A mask with an alpha channel that varies is
    read by its alpha: OpenAI's convention (`transparent_edits`) repaints the transparent pixels,
    AUTOMATIC1111's the opaque ones; a mask without one is read as it looks."""
    im = decode_image(data, config, field, mode=None)
    if "A" in im.getbands() and im.getchannel("A").getextrema()[0] < 255:
        alpha = im.getchannel("A")
        return ImageOps.invert(alpha) if transparent_edits else alpha
    return im.convert("L")


def fit_init_image(
    image: Image.Image, size: tuple[int, int] | None, config: ServerConfig, field: str
) -> Image.Image:
    """The init image at the output size: resized to `size` when given, else its own size rounded down to 8."""
    if size is None:
        width, height = image.width - image.width % 8, image.height - image.height % 8
        if width < 8 or height < 8:
            raise RequestError(
                field, f"image of {image.width}x{image.height} is too small; it needs at least 8x8 pixels"
            )
        if width > config.max_width or height > config.max_height:
            raise RequestError(
                field,
                f"image of {image.width}x{image.height} is over this server's limit of "
                f"{config.max_width}x{config.max_height}; give an output size to resize it",
            )
        size = (width, height)
    return image if image.size == size else image.resize(size, resample=Image.LANCZOS)


# ---------------------------------------------------------------------------------------------------- IP-Adapter

# sd-webui-controlnet's IP-Adapter preprocessors are "ip-adapter_clip_sd15", "ip-adapter_clip_sdxl", ...; its
# FaceID ones "ip-adapter_face_id" and "ip-adapter_face_id_plus", and "ip-adapter-auto" picks by the model's name
# ("ip-adapter-faceid-plusv2_sdxl", ...).
IP_ADAPTER_MODULE = "ip-adapter"
DEFAULT_IP_SCALE = 0.5
DEFAULT_FACE_SCALE = 0.8  # the official FaceID-Plus sample's


def _controlnet_units(scripts) -> list:
    entry = next(
        (v for k, v in (scripts or {}).items() if k.lower() == "controlnet"), None
    )  # as A1111 matches
    args = entry.get("args") if isinstance(entry, dict) else entry
    return list(args) if isinstance(args, list) else []


def is_ip_adapter_unit(unit) -> bool:
    """An IP-Adapter unit of either kind (a reference image or a face), not a ControlNet's."""
    return isinstance(unit, dict) and str(unit.get("module") or "").lower().startswith(IP_ADAPTER_MODULE)


def is_face_unit(unit) -> bool:
    """A FaceID unit: its module says face_id, or ip-adapter-auto with a FaceID model."""
    if not is_ip_adapter_unit(unit):
        return False
    module, model = str(unit.get("module")).lower(), str(unit.get("model") or "").lower()
    return "face_id" in module or "faceid" in module or ("auto" in module and "faceid" in model)


# What a server needs for each kind of image prompt, in the one-line error when it lacks it.
ADAPTER_NEEDED = {
    "ip": "an IP-Adapter loaded; start it with --ip-adapter PATH_OR_REPO",
    "face": "a FaceID adapter loaded; start it with --faceid PATH_OR_REPO",
}


def ip_adapter_unit(scripts: dict | None) -> tuple[str, str, float] | None:
    """(field, base64 image, weight) of the IP-Adapter unit of an A1111 request, as webuiapi's ControlNetUnit sends
    it (`module` "ip-adapter...", `image` base64 or {"image": base64}, `weight`); None without one."""
    return _image_prompt_unit(scripts, face=False)


def face_unit(scripts: dict | None) -> tuple[str, str, float] | None:
    """(field, base64 face photo, weight) of the FaceID unit of an A1111 request (`module`
    "ip-adapter_face_id_plus" or "ip-adapter_face_id", `image`, `weight`); None without one."""
    return _image_prompt_unit(scripts, face=True)


def _image_prompt_unit(scripts: dict | None, face: bool) -> tuple[str, str, float] | None:
    found = [
        (i, u)
        for i, u in enumerate(_controlnet_units(scripts))
        if is_ip_adapter_unit(u) and is_face_unit(u) == face and u.get("enabled") is not False
    ]
    kind, what = ("FaceID", "face photo") if face else ("IP-Adapter", "reference image")
    if not found:
        return None
    if len(found) > 1:
        raise RequestError("alwayson_scripts.ControlNet.args", f"one {kind} unit per request is supported")
    i, unit = found[0]
    field = f"alwayson_scripts.ControlNet.args[{i}]"
    image = unit.get("image") or unit.get("input_image")
    image = image.get("image") if isinstance(image, dict) else image
    if not isinstance(image, str) or not image:
        raise RequestError(f"{field}.image", f"the {kind} unit needs its {what} (base64) in image")
    weight = unit.get("weight", DEFAULT_FACE_SCALE if face else DEFAULT_IP_SCALE)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 10:
        raise RequestError(f"{field}.weight", f"weight must be a number from 0 to 10, not {weight!r}")
    return field, image, float(weight)


# ---------------------------------------------------------------------------------------------------- mapping


A1111_FIELDS = {
    "controlnets": "alwayson_scripts.ControlNet",
    "guidance": "cfg_scale",
    "num_images": "batch_size",
    "sampler": "sampler_name",
    "schedule": "scheduler",
    "ip_image": "alwayson_scripts",
    "ip_scale": "alwayson_scripts",
    "face_image": "alwayson_scripts",
    "face_scale": "alwayson_scripts",
}
A1111_INPAINT_FIELDS = {
    "masked_content": "inpainting_fill",
    "inpaint_padding": "inpaint_full_res_padding",
    "mask_invert": "inpainting_mask_invert",
}
OPENAI_FIELDS = {
    "controlnets": "controlnet",
    "guidance": "guidance_scale",
    "ip_image": "ip_adapter_image",
    "ip_scale": "ip_adapter_scale",
    "face_image": "face_image",
    "face_scale": "face_scale",
    "face_embeds": "face_embeds",
    "loras": "loras",
    "num_images": "n",
    "width": "size",
    "height": "size",
}


def a1111_calls(
    body: A1111Request,
    config: ServerConfig,
    native_size: int,
    image: Image.Image | None = None,
    strength: float = 0.3,
    loras: dict[str, Path] | None = None,
    mask: Image.Image | None = None,
    controlnets: tuple = (),
    ip_image: Image.Image | None = None,
    ip_scale: float = DEFAULT_IP_SCALE,
    face_image: Image.Image | None = None,
    face_scale: float = DEFAULT_FACE_SCALE,
) -> list[GenerationRequest]:
    """One GenerationRequest per `n_iter`, each of `batch_size` images; image i of the job gets seed + i."""
    inpaint = {}
    if mask is not None:  # an Img2ImgRequest's inpainting fields, with A1111's meanings
        inpaint = dict(
            mask=mask,
            mask_blur=body.mask_blur,
            mask_invert=bool(body.inpainting_mask_invert),
            masked_content=MASKED_CONTENT[body.inpainting_fill],
            inpaint_padding=body.inpaint_full_res_padding if body.inpaint_full_res else None,
        )
    width, height = (body.width or native_size, body.height or native_size) if image is None else image.size
    sampler, schedule = resolve_sampler(
        body.sampler_name or body.sampler_index, body.scheduler, "sampler_name"
    )
    prompt, prompt_loras = take_lora_tags(body.prompt or "", loras or {})
    job = GenerationRequest(  # the whole job, checked as one request: its image count and seed range
        prompt=prompt,
        negative_prompt=body.negative_prompt or "",
        steps=default_steps(body.steps, config),
        guidance=float(body.cfg_scale),
        sampler=sampler,
        schedule=schedule,
        seed=None if body.seed == -1 else body.seed,
        width=width,
        height=height,
        num_images=body.batch_size * body.n_iter,
        image=image,
        strength=strength,
        loras=prompt_loras,
        **inpaint,
        controlnets=controlnets,
        ip_image=ip_image,
        ip_scale=ip_scale,
        face_image=face_image,
        face_scale=face_scale,
    )
    job = checked(job, config, {**A1111_FIELDS, **A1111_INPAINT_FIELDS, "strength": "denoising_strength"})
    call = replace(job, num_images=body.batch_size)
    return [replace(call, seed=job.seed + i * body.batch_size) for i in range(body.n_iter)]


def a1111_info(
    body: A1111Request,
    results: list[tuple[Image.Image, int, GenerationRequest]],
    infotexts: list[str],
    model_name: str,
    version: str,
) -> dict[str, Any]:
    """The `info` object of an AUTOMATIC1111 response (sent as a JSON string), for the images made."""
    first, seeds, n = results[0][2], [seed for _, seed, _ in results], len(results)
    return {
        "prompt": first.prompt,
        "all_prompts": [first.prompt] * n,
        "negative_prompt": first.negative_prompt,
        "all_negative_prompts": [first.negative_prompt] * n,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": results[0][0].width,
        "height": results[0][0].height,
        "sampler_name": A1111_NAMES[first.sampler],
        "scheduler": A1111_SCHEDULES.get(first.schedule, "Automatic"),
        "cfg_scale": first.guidance,
        "steps": first.steps,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "denoising_strength": first.strength if first.image is not None else None,
        "sd_model_name": model_name,
        "sd_model_hash": None,
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "version": f"kolors {version}",
    }


def openai_call(
    config: ServerConfig,
    *,
    prompt: str,
    size: tuple[int, int],
    n: int | None = 1,
    negative_prompt: str | None = "",
    seed: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    schedule: str | None = None,
    image: Image.Image | None = None,
    strength: float = 0.3,
    lora_list: list | None = None,
    loras: dict[str, Path] | None = None,
    controlnets: tuple = (),
    ip_image: Image.Image | None = None,
    ip_scale: float | None = None,
    face_image: Image.Image | None = None,
    face_scale: float | None = None,
    face_embeds: list[float] | None = None,
    control_guess_mode: bool = False,
    **inpaint,
) -> GenerationRequest:
    """An OpenAI images request (and Kolors' extension fields) as one pipeline call of `n` images."""
    prompt, chosen = take_lora_tags(prompt, loras or {})
    sampler, schedule = resolve_sampler(sampler, schedule)
    for entry in lora_list or []:
        chosen += ((lora_file(entry.name, loras or {}, "loras"), entry.scale),)
    request = GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt or "",
        steps=default_steps(steps, config),
        guidance=5.0 if guidance_scale is None else float(guidance_scale),
        sampler=sampler,
        schedule=schedule,
        seed=None if seed == -1 else seed,
        width=size[0],
        height=size[1],
        num_images=n or 1,
        image=image,
        strength=strength,
        loras=chosen,
        **inpaint,  # mask, mask_blur, masked_content, inpaint_padding, paste_back (edits)
        controlnets=controlnets,
        ip_image=ip_image,
        ip_scale=DEFAULT_IP_SCALE if ip_scale is None else ip_scale,
        face_image=face_image,
        face_scale=DEFAULT_FACE_SCALE if face_scale is None else face_scale,
        face_embeds=None if face_embeds is None else tuple(face_embeds),
        control_guess_mode=control_guess_mode,
    )
    return checked(request, config, OPENAI_FIELDS)
