"""The OpenAI Images API (/v1): generations, edits (image to image in OpenAI's multipart form), variations (image
to image with an empty prompt), models. A client may name any served name, 'kolors' or one of OpenAI's models
(dall-e-2, dall-e-3, gpt-image-1, ...): this model answers, and says its served name in `model`."""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool

from kolors.request import MASKED_CONTENT, MAX_SEED, GenerationRequest
from kolors.serve.control import openai_control_units
from kolors.serve.http import OPENAI_ERRORS, error_docs, require_key
from kolors.serve.schemas import (
    ADAPTER_NEEDED,
    MAX_PROMPT_CHARS,
    Detail,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    RequestError,
    decode_base64,
    decode_image,
    decode_mask,
    fit_init_image,
    openai_call,
    parse_size,
)
from kolors.serve.state import config, encode, model, run_job

router = APIRouter(
    prefix="/v1", tags=["OpenAI"], dependencies=[Depends(require_key)], responses=error_docs(Detail, 401)
)


def check_model(name: str | None, request: Request) -> None:
    info = model(request)
    if name is not None and not info.answers_to(name):
        raise RequestError(
            "model", f"model {name!r} is not served here; use {info.served_name!r} or 'kolors'"
        )


async def respond(request: Request, call: GenerationRequest, response_format) -> OpenAIImagesResponse:
    results = await run_job(request, [call])
    data = []
    for png, seed in await encode(results, model(request).label):
        if response_format == "url":
            name = request.app.state.files.put(png)
            data.append(OpenAIImage(url=f"{request.base_url}v1/files/{name}.png", seed=seed))
        else:
            data.append(OpenAIImage(b64_json=base64.b64encode(png).decode(), seed=seed))
    width, height = results[0][0].size
    return OpenAIImagesResponse(
        created=int(time.time()), model=model(request).served_name, data=data, size=f"{width}x{height}"
    )


@router.post(
    "/images/generations",
    response_model=OpenAIImagesResponse,
    response_model_exclude_none=True,
    responses=OPENAI_ERRORS,
)
async def generations(body: OpenAIImageRequest, request: Request) -> OpenAIImagesResponse:
    """OpenAI's image generation, plus Kolors' fields; `url` images are served here for a limited time."""
    check_model(body.model, request)
    if body.stream:
        raise RequestError("stream", "streaming is not supported; leave stream unset")
    native = model(request).native_size
    size = parse_size(body.size, (native, native), config(request))
    fields = {"prompt", "n", "negative_prompt", "seed", "steps", "guidance_scale", "sampler", "schedule"}
    fields |= {"control_guess_mode"}  # Kolors' extension beside OpenAI's
    units = await run_in_threadpool(
        openai_control_units, body.controlnet, size, config(request), request.app.state.controlnets
    )
    call = openai_call(
        config(request),
        size=size,
        lora_list=body.loras,
        loras=request.app.state.loras,
        controlnets=units,
        ip_image=await reference_image(body.ip_adapter_image, request),
        ip_scale=body.ip_adapter_scale,
        face_image=await reference_image(body.face_image, request, "face_image"),
        face_scale=body.face_scale,
        face_embeds=body.face_embeds,
        **body.model_dump(include=fields),
    )
    return await respond(request, call, body.response_format)


# An image prompt's field -> the kind of adapter it needs
IMAGE_PROMPTS = {"ip_adapter_image": "ip", "face_image": "face"}


def form_numbers(text: str | None, field: str) -> list[float] | None:
    """A list of numbers sent as JSON in a multipart form field (a form has no arrays of its own)."""
    if text is None or not text.strip():
        return None
    try:
        values = json.loads(text)
    except ValueError:
        values = None
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise RequestError(field, f"{field} must be a JSON list of numbers, e.g. [0.1, -0.2, ...]", 400)
    return [float(v) for v in values]


async def reference_image(data: str | UploadFile | None, request: Request, field: str = "ip_adapter_image"):
    """The decoded image of an image-prompt field (Kolors' extension fields ip_adapter_image and face_image:
    base64 in JSON, a file in the multipart edits route), or None."""
    if data is None:
        return None
    kind = IMAGE_PROMPTS[field]
    if not request.app.state.image_prompts.get(kind):
        raise RequestError(field, f"this server has no {ADAPTER_NEEDED[kind]}")
    cfg = config(request)
    raw = None
    if not isinstance(data, str):
        raw = await data.read(cfg.max_upload_bytes + 1)
        if len(raw) > cfg.max_upload_bytes:
            raise RequestError(field, f"over this server's upload limit of {cfg.max_upload_mb:g} MB", 413)

    def work():
        with request.app.state.decodes:
            return decode_image(decode_base64(data, cfg, field) if raw is None else raw, cfg, field)

    return await run_in_threadpool(work)


@router.post(
    "/images/edits",
    response_model=OpenAIImagesResponse,
    response_model_exclude_none=True,
    responses=OPENAI_ERRORS,
)
async def edits(
    request: Request,
    prompt: Annotated[str, Form(min_length=1, max_length=MAX_PROMPT_CHARS)],
    image: Annotated[
        list[UploadFile] | None, File(description="the image to change: PNG, JPEG or WebP")
    ] = None,
    image_list: Annotated[list[UploadFile] | None, File(alias="image[]", description="as image")] = None,
    mask: Annotated[
        UploadFile | None,
        File(
            description="inpaint: a PNG whose fully transparent pixels mark where to edit, the image's size "
            "(OpenAI's convention); without transparency, white marks it"
        ),
    ] = None,
    model_name: Annotated[str | None, Form(alias="model")] = None,
    n: Annotated[int, Form(ge=1)] = 1,
    size: Annotated[str | None, Form(description="WxH to resize to; default the image's own size")] = None,
    response_format: Annotated[Literal["b64_json", "url"] | None, Form()] = None,
    negative_prompt: Annotated[str, Form(max_length=MAX_PROMPT_CHARS)] = "",
    seed: Annotated[int | None, Form(ge=-1, le=MAX_SEED, description="-1 or absent: random")] = None,
    steps: Annotated[int | None, Form(ge=1)] = None,
    guidance_scale: Annotated[float | None, Form(ge=0, le=100, allow_inf_nan=False)] = None,
    sampler: Annotated[str | None, Form()] = None,
    schedule: Annotated[str | None, Form(description="karras or exponential")] = None,
    strength: Annotated[
        float | None,
        Form(
            ge=0,
            le=1,
            allow_inf_nan=False,
            description="how much to change (default 0.75; 0.9999 with a mask)",
        ),
    ] = None,
    mask_blur: Annotated[float, Form(ge=0, le=256, description="pixels")] = 4.0,
    masked_content: Annotated[Literal[MASKED_CONTENT], Form()] = "original",
    inpaint_padding: Annotated[
        int | None, Form(ge=0, description="inpaint only the box around the mask, padded so, at full size")
    ] = None,
    paste_back: Annotated[bool, Form(description="the original outside the mask, exactly")] = True,
    ip_adapter_image: Annotated[
        UploadFile | None, File(description="a reference image, for a server started with --ip-adapter")
    ] = None,
    ip_adapter_scale: Annotated[
        float | None, Form(ge=0, le=10, allow_inf_nan=False, description="its weight (default 0.5)")
    ] = None,
    face_image: Annotated[
        UploadFile | None, File(description="a photo of the face to keep, for a server started with --faceid")
    ] = None,
    face_scale: Annotated[
        float | None, Form(ge=0, le=10, allow_inf_nan=False, description="its weight (default 0.8)")
    ] = None,
    face_embeds: Annotated[
        str | None,
        Form(
            description="insightface's 512-d embedding of the face as a JSON list, with face_image the face "
            "crop: no face detection"
        ),
    ] = None,
) -> OpenAIImagesResponse:
    """Image to image in OpenAI's multipart form: `image` and `prompt`, plus Kolors' fields and `strength`;
    with `mask`, inpainting; with `ip_adapter_image` or `face_image`, image prompts as in generations."""
    check_model(model_name, request)
    uploads = (image or []) + (image_list or [])
    init = await read_one_image(request, uploads, size)
    inpaint = {}
    if mask is not None:
        inpaint = dict(
            mask=await read_mask(request, mask, uploads[0], init.size),
            mask_blur=mask_blur,
            masked_content=masked_content,
            inpaint_padding=inpaint_padding,
            paste_back=paste_back,
        )
    strength = strength if strength is not None else 0.9999 if mask is not None else 0.75
    call = openai_call(
        config(request),
        prompt=prompt,
        size=init.size,
        n=n,
        negative_prompt=negative_prompt,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        sampler=sampler,
        schedule=schedule,
        image=init,
        strength=strength,
        loras=request.app.state.loras,
        ip_image=await reference_image(ip_adapter_image, request),
        ip_scale=ip_adapter_scale,
        face_image=await reference_image(face_image, request, "face_image"),
        face_scale=face_scale,
        face_embeds=form_numbers(face_embeds, "face_embeds"),
        **inpaint,
    )
    return await respond(request, call, response_format)


@router.post(
    "/images/variations",
    response_model=OpenAIImagesResponse,
    response_model_exclude_none=True,
    responses=OPENAI_ERRORS,
)
async def variations(
    request: Request,
    image: Annotated[
        list[UploadFile] | None, File(description="the image to vary: PNG, JPEG or WebP")
    ] = None,
    model_name: Annotated[str | None, Form(alias="model")] = None,
    n: Annotated[int, Form(ge=1)] = 1,
    size: Annotated[str | None, Form(description="WxH to resize to; default the image's own size")] = None,
    response_format: Annotated[Literal["b64_json", "url"] | None, Form()] = None,
    seed: Annotated[int | None, Form(ge=-1, le=MAX_SEED, description="-1 or absent: random")] = None,
    steps: Annotated[int | None, Form(ge=1)] = None,
    strength: Annotated[
        float, Form(ge=0, le=1, allow_inf_nan=False, description="how much to change")
    ] = 0.75,
) -> OpenAIImagesResponse:
    """Variations of an image: image to image with an empty prompt (send a prompt to /v1/images/edits to say
    what the variation should be)."""
    check_model(model_name, request)
    init = await read_one_image(request, image or [], size)
    call = openai_call(
        config(request), prompt="", size=init.size, n=n, seed=seed, steps=steps, image=init, strength=strength
    )
    return await respond(request, call, response_format)


async def read_one_image(request: Request, uploads: list[UploadFile], size: str | None):
    """The one uploaded image, decoded under the limits (a bounded number at a time) and fit to `size`."""
    cfg = config(request)
    if not uploads:
        raise RequestError("image", "an image file is required")
    if len(uploads) > 1:
        raise RequestError(
            "image", f"{len(uploads)} images were sent; kolors changes one image per request: send one"
        )
    if uploads[0].size is not None and uploads[0].size > cfg.max_upload_bytes:
        raise RequestError("image", f"over this server's upload limit of {cfg.max_upload_mb:g} MB", 413)
    target = parse_size(size, None, cfg)
    data = await uploads[0].read(cfg.max_upload_bytes + 1)

    def work():
        with request.app.state.decodes:  # a bounded number of uploads decoded at once (memory)
            return fit_init_image(decode_image(data, cfg, "image"), target, cfg, "image")

    return await run_in_threadpool(work)


async def read_mask(request: Request, upload: UploadFile, image: UploadFile, size: tuple[int, int]):
    """The uploaded mask (OpenAI's: transparent = edit) as grayscale at the fitted image's `size`; it must have
    the uploaded image's dimensions, as OpenAI requires."""
    cfg = config(request)
    if upload.size is not None and upload.size > cfg.max_upload_bytes:
        raise RequestError("mask", f"over this server's upload limit of {cfg.max_upload_mb:g} MB", 413)
    data = await upload.read(cfg.max_upload_bytes + 1)
    await image.seek(0)
    image_data = await image.read(cfg.max_upload_bytes + 1)

    def work():
        with request.app.state.decodes:
            mask = decode_mask(data, cfg, "mask", transparent_edits=True)
            with Image.open(io.BytesIO(image_data)) as im:  # the header only: the size as uploaded
                uploaded = im.size
        if mask.size != uploaded:
            raise RequestError(
                "mask",
                f"mask is {mask.width}x{mask.height} but the image is {uploaded[0]}x{uploaded[1]}; "
                "send a mask of the image's size",
            )
        return mask if mask.size == size else mask.resize(size, resample=Image.LANCZOS)

    return await run_in_threadpool(work)


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    """The served model under each of its served names, in OpenAI's list shape."""
    info = model(request)
    names = info.served_names or (info.name,)
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": 0, "owned_by": "kolors"} for name in names],
    }
