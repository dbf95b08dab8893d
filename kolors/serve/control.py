"""ControlNet over HTTP: the sd-webui-controlnet extension's API (its `alwayson_scripts` units in txt2img and img2img,
/controlnet/model_list, /controlnet/module_list, /controlnet/detect) and the OpenAI routes' `controlnet` field.

The server runs the ControlNets it loaded at start (`kolors serve --controlnet NAME=PATH`), by name; A1111 clients
may send "name [hash]". Each unit's control image is decoded under the upload limits and fitted to the output size
by its resize mode here, so the pipeline gets it at the size it will use.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from fastapi import APIRouter, Depends, Request
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from kolors.errors import KolorsError
from kolors.pipeline import preprocess
from kolors.request import CONTROL_MODES as REQUEST_CONTROL_MODES
from kolors.request import PREPROCESSORS, ControlUnit
from kolors.serve.http import require_key
from kolors.serve.schemas import (
    OpenAIControlNet,
    RequestError,
    ServerConfig,
    decode_base64,
    decode_image,
    is_ip_adapter_unit,
)

# sd-webui-controlnet's names for the preprocessors kolors has.
A1111_MODULES = {
    "none": "none",
    "canny": "canny",
    "depth": "depth",
    "depth_midas": "depth",
    "openpose": "openpose",
    "openpose_full": "openpose",
    "dwpose": "dwpose",
    "dw_openpose_full": "dwpose",
}
RESIZE_MODES = {0: "Just Resize", 1: "Crop and Resize", 2: "Resize and Fill"}
# sd-webui-controlnet's control modes by number and name (its ControlMode enum's order) -> kolors' keys
CONTROL_MODES = {0: "Balanced", 1: "My prompt is more important", 2: "ControlNet is more important"}
A1111_CONTROL_MODES = {name: key for key, name in REQUEST_CONTROL_MODES.items()}


class A1111ControlUnit(BaseModel):
    """One unit of `alwayson_scripts.ControlNet.args`, as webuiapi's ControlNetUnit.to_dict() sends it."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    enabled: bool = True
    module: str = "none"
    model: str = "None"
    weight: float = Field(1.0, ge=0, le=10)
    image: str | dict | None = None
    input_image: str | None = None  # the older name of image
    resize_mode: str | int = "Crop and Resize"
    processor_res: int = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = Field(0.0, ge=0, le=1)
    guidance_end: float = Field(1.0, ge=0, le=1)
    control_mode: str | int = 0


def control_names(request: Request) -> list[str]:
    return request.app.state.controlnets


def _model(name: str, known: list[str], field: str) -> str:
    base = name.split(" [")[0].strip()
    if base not in known:
        listed = ", ".join(known) or "none: start the server with --controlnet NAME=PATH"
        raise RequestError(field, f"unknown ControlNet {name!r}; this server has: {listed}")
    return base


def _module(name: str, field: str) -> str:
    if name.lower() not in A1111_MODULES:
        raise RequestError(field, f"unknown preprocessor {name!r}; choose one of: {', '.join(A1111_MODULES)}")
    return A1111_MODULES[name.lower()]


def _named(value: str | int, names: dict[int, str], field: str, what: str) -> str:
    if isinstance(value, int) and value in names:
        return names[value]
    for name in names.values():
        if isinstance(value, str) and value.strip().lower() == name.lower():
            return name
    choices = ", ".join(f"{k} ({v})" for k, v in names.items())
    raise RequestError(field, f"unknown {what} {value!r}; choose one of: {choices}")


def fit_control_image(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """The control image at the output size: stretched (Just Resize), cropped to its aspect (Crop and Resize)
    or fitted inside with black borders (Resize and Fill), as sd-webui-controlnet's resize modes."""
    image = image.convert("RGB")
    if mode == "Crop and Resize":
        return ImageOps.fit(image, size, Image.LANCZOS)
    if mode == "Resize and Fill":
        return ImageOps.pad(image, size, Image.LANCZOS, color=(0, 0, 0))
    return image if image.size == size else image.resize(size, Image.LANCZOS)


def _image(data, cfg: ServerConfig, field: str) -> Image.Image:
    return decode_image(decode_base64(data, cfg, field), cfg, field)


def a1111_control_units(
    scripts: dict[str, Any] | None, size: tuple[int, int], cfg: ServerConfig, known: list[str]
) -> tuple[ControlUnit, ...]:
    """The enabled units of an A1111 body's ControlNet script (its key matched case-insensitively), decoded
    and fitted to `size`; a bad unit is a RequestError naming its field."""
    entry = next((v for k, v in (scripts or {}).items() if k.lower() == "controlnet"), None)
    if entry is None:
        return ()
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list):
        raise RequestError("alwayson_scripts.ControlNet", 'must be {"args": [unit, ...]}')
    units = []
    for i, raw in enumerate(args):
        if is_ip_adapter_unit(raw):  # a reference image for the IP-Adapter, not a ControlNet: ip_adapter_unit
            continue
        field = f"alwayson_scripts.ControlNet.args[{i}]"
        try:
            unit = A1111ControlUnit.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise RequestError(f"{field}.{where}" if where else field, err["msg"]) from None
        if not unit.enabled:
            continue
        if unit.model in ("", "None"):
            raise RequestError(f"{field}.model", "names no ControlNet; see GET /controlnet/model_list")
        model = _model(unit.model, known, f"{field}.model")
        module = _module(unit.module, f"{field}.module")
        mode = _named(unit.resize_mode, RESIZE_MODES, f"{field}.resize_mode", "resize mode")
        control_mode = _named(unit.control_mode, CONTROL_MODES, f"{field}.control_mode", "control mode")
        data = unit.image.get("image") if isinstance(unit.image, dict) else unit.image or unit.input_image
        if not data or not isinstance(data, str):
            raise RequestError(f"{field}.image", "a unit needs a control image (base64 text)")
        image = fit_control_image(_image(data, cfg, f"{field}.image"), size, mode)
        units.append(
            ControlUnit(
                model=model,
                image=image,
                scale=unit.weight,
                preprocess=module,
                start=unit.guidance_start,
                end=unit.guidance_end,
                options=_options(module, unit.processor_res, unit.threshold_a, unit.threshold_b),
                control_mode=A1111_CONTROL_MODES[control_mode],
            )
        )
    return tuple(units)


def _options(module: str, resolution: int, a: float, b: float) -> tuple[tuple[str, float], ...]:
    """A preprocessor's options from A1111's sliders; -1 (or, for canny, anything below 1: webuiapi's 0.1
    default) leaves the preprocessor's own."""
    if module == "canny":
        return (("low_threshold", int(a)), ("high_threshold", int(b))) if a >= 1 and b >= 1 else ()
    if module in ("depth", "openpose", "dwpose") and resolution >= 64:
        return (("resolution", resolution),)
    return ()


def openai_control_units(
    entries: list[OpenAIControlNet] | None, size: tuple[int, int], cfg: ServerConfig, known: list[str]
) -> tuple[ControlUnit, ...]:
    units = []
    for i, e in enumerate(entries or []):
        field = f"controlnet[{i}]"
        if e.preprocess not in PREPROCESSORS:
            raise RequestError(
                f"{field}.preprocess",
                f"unknown preprocessor {e.preprocess!r}; choose one of: {', '.join(PREPROCESSORS)}",
            )
        image = fit_control_image(_image(e.image, cfg, f"{field}.image"), size, "Just Resize")
        model = _model(e.model, known, f"{field}.model")
        if e.control_mode not in REQUEST_CONTROL_MODES:
            raise RequestError(
                f"{field}.control_mode",
                f"unknown control mode {e.control_mode!r}; choose one of: {', '.join(REQUEST_CONTROL_MODES)}",
            )
        units.append(
            ControlUnit(model, image, e.scale, e.preprocess, e.start, e.end, control_mode=e.control_mode)
        )
    return tuple(units)


# ---------------------------------------------------------------------------------------------------- routes

router = APIRouter(
    prefix="/controlnet", tags=["AUTOMATIC1111 ControlNet"], dependencies=[Depends(require_key)]
)


@router.get("/version")
async def version() -> dict[str, int]:
    return {"version": 2}


@router.get("/model_list")
async def model_list(request: Request) -> dict[str, list[str]]:
    """The ControlNets this server loaded (kolors serve --controlnet NAME=PATH), by name."""
    return {"model_list": list(control_names(request))}


@router.get("/module_list")
async def module_list() -> dict[str, Any]:
    """The preprocessors, by kolors' names (the A1111 names depth_midas, openpose_full, dw_openpose_full work too)."""
    return {"module_list": list(PREPROCESSORS)}


@router.get("/image_prompts")
async def image_prompts(request: Request) -> dict[str, bool]:
    """Which image-prompt units this server takes: an IP-Adapter's reference image (module "ip-adapter...",
    kolors serve --ip-adapter) and a FaceID face (module "ip-adapter_face_id_plus", kolors serve --faceid)."""
    loaded = request.app.state.image_prompts
    return {"ip_adapter": bool(loaded.get("ip")), "faceid": bool(loaded.get("face"))}


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(min_length=1)
    controlnet_processor_res: int = 512
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1


@router.post("/detect")
async def detect(body: DetectRequest, request: Request) -> dict[str, Any]:
    """Run a preprocessor on each image: the control images a unit with that module would use (base64 PNGs)."""
    cfg: ServerConfig = request.app.state.config
    module = _module(body.controlnet_module, "controlnet_module")
    options = dict(
        _options(
            module, body.controlnet_processor_res, body.controlnet_threshold_a, body.controlnet_threshold_b
        )
    )

    def work() -> list[str]:
        out = []
        for i, data in enumerate(body.controlnet_input_images):
            with request.app.state.decodes:
                image = _image(data, cfg, f"controlnet_input_images[{i}]")
            try:
                result = preprocess(module, image, **options)
            except KolorsError as e:
                raise RequestError("controlnet_module", str(e)) from None
            buf = io.BytesIO()
            result.save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode())
        return out

    return {"images": await run_in_threadpool(work), "info": "Success"}
