"""The AUTOMATIC1111 API (/sdapi/v1): txt2img, img2img, progress, interrupt, and the listings its clients read."""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from kolors.request import A1111_NAMES, SAMPLERS
from kolors.serve.control import a1111_control_units
from kolors.serve.http import A1111_ERRORS, error_docs, require_key
from kolors.serve.schemas import (
    A1111_SCHEDULES,
    ADAPTER_NEEDED,
    A1111Response,
    Detail,
    Img2ImgRequest,
    RequestError,
    Txt2ImgRequest,
    a1111_aliases,
    a1111_calls,
    a1111_info,
    checked_size,
    decode_base64,
    decode_image,
    decode_mask,
    face_unit,
    fit_init_image,
    ip_adapter_unit,
    lora_files,
)
from kolors.serve.state import config, encode, infotext, model, run_job

router = APIRouter(
    prefix="/sdapi/v1",
    tags=["AUTOMATIC1111"],
    dependencies=[Depends(require_key)],
    responses=error_docs(Detail, 401),
)
# A1111 1.6+'s per-task progress, which its own page and clients that set force_task_id poll
internal = APIRouter(
    tags=["AUTOMATIC1111"], dependencies=[Depends(require_key)], responses=error_docs(Detail, 401)
)


async def respond(request: Request, body, calls, parameters: dict) -> A1111Response:
    results = await run_job(request, calls, task=body.force_task_id)
    info = model(request)
    pngs = await encode(results, info.label)
    infotexts = [infotext(r, info.label) for r in results]
    return A1111Response(
        images=[base64.b64encode(png).decode() for png, _ in pngs],
        parameters=parameters,
        info=json.dumps(
            a1111_info(body, results, infotexts, info.name, request.app.version), ensure_ascii=False
        ),
    )


async def reference_image(body, request: Request) -> dict:
    """The IP-Adapter unit's reference image and weight and the FaceID unit's face photo and weight
    (sd-webui-controlnet's shape), as a1111_calls keywords."""
    found = {}
    for kind, unit_of in (("ip", ip_adapter_unit), ("face", face_unit)):
        unit = unit_of(body.alwayson_scripts)
        if unit is None:
            continue
        if not request.app.state.image_prompts.get(kind):
            raise RequestError(unit[0], f"this server has no {ADAPTER_NEEDED[kind]}")
        found[kind] = unit
    cfg = config(request)

    def work():
        out = {}
        for kind, (field, data, weight) in found.items():
            with request.app.state.decodes:
                image = decode_image(decode_base64(data, cfg, f"{field}.image"), cfg, f"{field}.image")
            out |= {f"{kind}_image": image, f"{kind}_scale": weight}
        return out

    return await run_in_threadpool(work) if found else {}


@router.post("/txt2img", response_model=A1111Response, responses=A1111_ERRORS)
async def txt2img(body: Txt2ImgRequest, request: Request) -> A1111Response:
    """Text to image: `images` are base64 PNGs carrying their `parameters` text; `info` a JSON string. An
    sd-webui-controlnet unit with an IP-Adapter module in `alwayson_scripts` is the reference image, one with a
    FaceID module (ip-adapter_face_id_plus) the face to keep."""
    body.refuse_unsupported(model(request).answers_to)
    cfg, native = config(request), model(request).native_size
    size = (body.width or native, body.height or native)
    units = await run_in_threadpool(
        a1111_control_units, body.alwayson_scripts, size, cfg, request.app.state.controlnets
    )
    reference = await reference_image(body, request)
    calls = a1111_calls(body, cfg, native, loras=request.app.state.loras, controlnets=units, **reference)
    return await respond(request, body, calls, body.model_dump())


@router.post("/img2img", response_model=A1111Response, responses=A1111_ERRORS)
async def img2img(body: Img2ImgRequest, request: Request) -> A1111Response:
    """Image to image from init_images[0], resized to width x height when given, else at its own size; with
    `mask`, inpainting (the mask resized to the image), A1111's inpaint fields and defaults."""
    cfg = config(request)
    body.refuse_unsupported(model(request).answers_to)

    def work():
        # Off the event loop, a bounded number at a time; the base64 is decoded in pieces that let go of the
        # GIL, so the loop keeps answering (/health, /progress) while large uploads decode.
        with request.app.state.decodes:
            data = decode_base64(body.init_images[0], cfg, "init_images")
            image = decode_image(data, cfg, "init_images")
            del data
            size = None
            if body.width is not None or body.height is not None:
                w, h = image.size
                size = (body.width or w - w % 8, body.height or h - h % 8)
                checked_size(*size, cfg)
            image = fit_init_image(image, size, cfg, "init_images")
            mask = None
            if body.mask:
                mask = decode_mask(
                    decode_base64(body.mask, cfg, "mask"), cfg, "mask", transparent_edits=False
                )
            names = request.app.state.controlnets
            return image, mask, a1111_control_units(body.alwayson_scripts, image.size, cfg, names)

    image, mask, units = await run_in_threadpool(work)
    reference = await reference_image(body, request)
    calls = a1111_calls(
        body,
        cfg,
        model(request).native_size,
        image,
        body.denoising_strength,
        loras=request.app.state.loras,
        mask=mask,
        controlnets=units,
        **reference,
    )
    parameters = body.model_dump()
    if not body.include_init_images:
        parameters["init_images"] = None
    return await respond(request, body, calls, parameters)


@router.get("/progress")
async def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    """The most recently started job: `progress` 0..1, `eta_relative` seconds, its steps, and `current_image`,
    a base64 PNG of the image forming (a cheap linear preview of the latents; null before the first step, with
    skip_current_image, or when the server runs with --preview-every 0). /internal/progress follows one job."""
    queue = request.app.state.queue
    running, waiting = queue.running(), queue.waiting()
    job = running[-1] if running else None
    state = {
        "skipped": False,
        "interrupted": bool(job and job.interrupted),
        "stopping_generation": False,
        "job": job.task_id if job else "",
        "job_count": len(running) + waiting,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)) if job else "0",
        "job_no": job.call if job else 0,
        "sampling_step": job.step if job else 0,
        "sampling_steps": job.steps if job else 0,
    }
    return {
        "progress": round(job.progress, 4) if job else 0.0,
        "eta_relative": round(job.eta, 2) if job else 0.0,
        "state": state,
        "current_image": None
        if skip_current_image or job is None
        else await preview_png(request, job.preview),
        "textinfo": None,
    }


class ProgressRequest(BaseModel):
    """A1111's /internal/progress body."""

    id_task: str | None = Field(None, max_length=200, description="the job's force_task_id (or task(ID))")
    id_live_preview: int = Field(-1, description="the id_live_preview of the last answer: no image again")
    live_preview: bool = Field(True, description="include the live preview image")


class ProgressResponse(BaseModel):
    active: bool = Field(description="the job is running now")
    queued: bool = Field(description="the job waits in the queue")
    completed: bool = Field(description="the job finished (one of the last 16)")
    progress: float | None = Field(None, description="0..1 over the job's steps")
    eta: float | None = Field(None, description="seconds left")
    live_preview: str | None = Field(None, description="a data: URI of the image forming, when new")
    id_live_preview: int | None = Field(None, description="send it back to skip an image already shown")
    textinfo: str | None = None


@internal.post("/internal/progress", response_model=ProgressResponse)
async def task_progress(body: ProgressRequest, request: Request) -> ProgressResponse:
    """One job's progress, as AUTOMATIC1111 1.6+ answers it: the job named by id_task (a txt2img or img2img
    request's force_task_id), running or queued; the preview only when it changed since id_live_preview."""
    queue = request.app.state.queue
    job, place, completed = queue.task(body.id_task) if body.id_task else (None, None, False)
    if job is None or place is not None:
        text = f"In queue: {place + 1}/{queue.waiting()}" if place is not None else "Waiting..."
        return ProgressResponse(
            active=False, queued=place is not None, completed=completed, id_live_preview=-1, textinfo=text
        )
    image, shown = None, body.id_live_preview
    preview, preview_id = job.preview, job.preview_id
    if body.live_preview and preview is not None and preview_id != body.id_live_preview:
        image, shown = f"data:image/png;base64,{await preview_png(request, preview)}", preview_id
    done = job.progress
    batch = f", batch {job.call + 1} of {len(job.calls)}" if len(job.calls) > 1 else ""
    return ProgressResponse(
        active=True,
        queued=False,
        completed=False,
        progress=round(done, 4),
        eta=round(job.eta, 2) if done > 0 else None,
        live_preview=image,
        id_live_preview=shown,
        textinfo=f"Step {job.step} of {job.steps}{batch}",
    )


async def preview_png(request: Request, latents) -> str | None:
    if latents is None:
        return None

    def work() -> str:
        buf = io.BytesIO()
        request.app.state.preview(latents)[0].save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    return await run_in_threadpool(work)


@router.post("/interrupt")
async def interrupt(request: Request, id_task: str | None = None) -> dict[str, Any]:
    """Stop the most recently started job after its current step, or with `id_task` (a request's
    force_task_id) that job, wherever it runs (a queued one leaves the queue); the images it finished, and
    the running call's as far as it got, are still answered, as AUTOMATIC1111 does."""
    request.app.state.queue.interrupt(id_task)
    return {}


@router.get("/samplers")
async def list_samplers() -> list[dict[str, Any]]:
    return [{"name": A1111_NAMES[key], "aliases": a1111_aliases(key), "options": {}} for key in SAMPLERS]


@router.get("/schedulers")
async def list_schedulers() -> list[dict[str, Any]]:
    """A1111 1.9's schedule types: Automatic is each sampler's own; the others apply where diffusers has them."""
    names = [("automatic", "Automatic"), *A1111_SCHEDULES.items()]
    return [
        {"name": key, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for key, label in names
    ]


@router.get("/loras")
async def list_loras(request: Request) -> list[dict[str, Any]]:
    """The LoRAs of the server's --lora-dir, by the name a prompt's <lora:NAME:SCALE> tag uses."""
    loras = request.app.state.loras
    return [{"name": n, "alias": n, "path": str(f), "metadata": {}} for n, f in sorted(loras.items())]


@router.post("/refresh-loras")
async def refresh_loras(request: Request) -> None:
    """Read the --lora-dir folder again (files added or removed since the server started)."""
    request.app.state.loras = await run_in_threadpool(lora_files, config(request).lora_dir)


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    name = model(request).name
    entry = {"title": name, "model_name": name, "filename": name}
    return [{**entry, "hash": None, "sha256": None, "config": None}]


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    return {
        "sd_model_checkpoint": model(request).name,
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
    }


@router.post("/options", responses=error_docs(Detail, 422))
async def set_options(options: dict[str, Any], request: Request) -> None:
    """Accepted and ignored, except a request for another checkpoint, which this server cannot load."""
    wanted, info = options.get("sd_model_checkpoint"), model(request)
    if wanted is not None and not info.answers_to(str(wanted)):
        raise RequestError("sd_model_checkpoint", f"this server serves only {info.name!r}")
