"""`kolors serve`: the OpenAI Images API and the AUTOMATIC1111 API over one job queue, and the web page.

Requests become GenerationRequests (kolors.schemas) inside a Job on the bounded queue of kolors.jobs, run by one
worker per device; a handler awaits its job and cancels it when its client goes away. Anything a request can get
wrong answers 4xx naming the field. OpenAI routes (/v1/...) answer errors in OpenAI's shape
({"error": {"message", "type", "param"}}, 400); the others in FastAPI's ({"detail": "..."}, 422).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from kolors import samplers
from kolors.errors import KolorsError
from kolors.jobs import Job, JobQueue, JobState, QueueFull
from kolors.pipeline import MAX_SEED
from kolors.request import GenerationRequest
from kolors.schemas import (
    A1111_SAMPLERS,
    MAX_PROMPT_CHARS,
    A1111Response,
    Detail,
    Img2ImgRequest,
    OpenAIError,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    RequestError,
    ServerConfig,
    Txt2ImgRequest,
    a1111_calls,
    a1111_info,
    check_size,
    decode_base64,
    decode_image,
    fit_init_image,
    openai_call,
    parse_size,
    png_bytes,
)

__all__ = ["ServerConfig", "check_bind", "create_app", "run"]

log = logging.getLogger("kolors.server")

WEB_DIR = Path(__file__).parent / "web"
PLACEHOLDER = """<!doctype html><meta charset="utf-8"><title>kolors</title>
<h1>kolors</h1><p>The web page is not installed. The API is described at <a href="/docs">/docs</a>.</p>"""
WAIT_POLL_S = 0.5  # how often a waiting handler looks whether its client is still there


def check_bind(host: str, api_key: str | None) -> None:
    """Listening beyond this machine hands the device to anyone who can reach it: only with a key."""
    if api_key or host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise KolorsError(
        f"refusing to listen on {host} without an API key: anyone who can reach it could use this machine; "
        "pass --api-key KEY (or set KOLORS_API_KEY), or listen on --host 127.0.0.1"
    )


# ---------------------------------------------------------------------------------------------------- errors


def error_response(
    request: Request, status: int, message: str, field: str | None = None, headers: dict | None = None
) -> JSONResponse:
    if not request.url.path.startswith("/v1/"):
        return JSONResponse({"detail": message}, status, headers=headers)
    status = 400 if status == 422 else status  # OpenAI answers every malformed request 400
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
    kind = "server_error" if status >= 500 else kind
    body = {"error": {"message": message, "type": kind, "param": field, "code": None}}
    return JSONResponse(body, status, headers=headers)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors as one line, each naming its field: "steps: Input should be a valid integer"."""
    parts, fields = [], []
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header")]
        name, msg = (".".join(loc) or "body"), e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            name, msg = "body", f"not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})"
        elif e.get("type") == "missing" and name == "body":
            msg = "a request body is required"
        parts.append(f"{name}: {msg}")
        fields.append(name)
    return "; ".join(parts), (fields[0] if fields else None)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        message, field = _validation_message(list(exc.errors()))
        return error_response(request, 422, message, field)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError):
        return error_response(request, exc.status, str(exc), exc.field)

    @app.exception_handler(KolorsError)
    async def on_kolors_error(request: Request, exc: KolorsError):
        return error_response(request, 422, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return error_response(request, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):  # a last resort: the tests find none
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request, 500, "internal server error; the server log has the details")


def _errors(model: type[BaseModel], *codes: int) -> dict:
    """The error answers of a route, for the OpenAPI schema."""
    text = {
        400: "a malformed request (the message names the field)",
        401: "missing or wrong API key",
        404: "no such image, or it expired",
        409: "interrupted before any image was finished",
        413: "the request body or image is over the upload limit",
        422: "a malformed request (the message names the field)",
        429: "the queue is full: retry after Retry-After seconds",
        500: "a bug: the server log has the details",
        503: "the device ran out of memory, or the server is shutting down",
    }
    return {code: {"model": model, "description": text[code]} for code in codes}


A1111_ERRORS = _errors(Detail, 409, 413, 422, 429, 503)
OPENAI_ERRORS = _errors(OpenAIError, 400, 409, 413, 429, 503)


class BodyTooLarge(HTTPException):
    """Raised while a body is read: FastAPI passes HTTPExceptions from reading the body on as they are."""


class BodyLimit:
    """ASGI middleware: a request body over the limit is refused (413) as it arrives, before it is parsed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        too_large = BodyTooLarge(413, f"request body over this server's limit of {self.max_bytes >> 20} MB")
        received = 0

        async def limited_receive():
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------------------------------------------- auth, files

bearer = HTTPBearer(auto_error=False, description="the server's --api-key")


def require_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """With an API key configured, every API call carries it as a Bearer token."""
    key = request.app.state.config.api_key
    if key is None:
        return
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), key.encode()):
        raise HTTPException(
            401,
            "missing or wrong API key; send the header Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )


class FileStore:
    """The images behind response_format=url: in memory for `ttl` seconds each, the oldest dropped past
    `max_bytes`. Their names are unguessable, so a URL is the only key to its image."""

    def __init__(self, ttl: float, max_bytes: int):
        self.ttl, self.max_bytes = ttl, max_bytes
        self._files: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # name -> (png, expiry), by age
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        name = secrets.token_urlsafe(18)
        with self._lock:
            now = time.monotonic()
            self._files[name] = (data, now + self.ttl)
            self._bytes += len(data)
            while self._bytes > self.max_bytes or next(iter(self._files.values()))[1] < now:
                _, (old, _) = self._files.popitem(last=False)
                self._bytes -= len(old)
                if not self._files:
                    break
        return name

    def get(self, name: str) -> bytes | None:
        with self._lock:
            data, expiry = self._files.get(name, (None, 0.0))
        return data if expiry >= time.monotonic() else None


# ---------------------------------------------------------------------------------------------------- the app


@dataclass(frozen=True)
class ModelInfo:
    name: str
    native_size: int  # the side the model was trained at: the default width and height
    label: str  # as images' parameters name it (KolorsPipeline.label)


def create_app(pipes, config: ServerConfig | None = None) -> FastAPI:
    """The app serving `pipes` (a KolorsPipeline, or a list of them, one per device, each with its worker).
    The workers start now; the app's shutdown (or app.state.queue.close()) stops them."""
    config = config or ServerConfig()
    config.check()
    pipes = list(pipes) if isinstance(pipes, (list, tuple)) else [pipes]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    native = pipes[0].unet.config.sample_size * pipes[0].vae_scale_factor
    model = ModelInfo(pipes[0].name, native, pipes[0].label)
    queue = JobQueue(pipes, maxsize=config.queue_size)
    files = FileStore(config.url_ttl, int(config.url_store_mb * 2**20))
    version = _version()
    # Started here and again at each startup: a client that skips the lifespan still gets working workers, and
    # one that runs it twice (a test harness) gets them back after the first shutdown.
    queue.start()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        yield
        await run_in_threadpool(queue.close)

    app = FastAPI(
        title="kolors",
        summary="Kolors text-to-image: the OpenAI Images API and the AUTOMATIC1111 API over one job queue",
        version=version,
        lifespan=lifespan,
    )
    app.state.config, app.state.queue, app.state.files, app.state.model = config, queue, files, model
    add_error_handlers(app)
    # base64 makes an upload 4/3 larger; the rest of a request is small.
    app.add_middleware(BodyLimit, max_bytes=math.ceil(config.max_upload_bytes * 4 / 3) + 2**20)

    needs_key = {"dependencies": [Depends(require_key)], "responses": _errors(Detail, 401)}
    sdapi = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"], **needs_key)
    openai = APIRouter(prefix="/v1", tags=["OpenAI"], **needs_key)

    async def run_job(request: Request, calls: list[GenerationRequest]):
        """Queue the calls as one job and await it: [(image, seed, request), ...] or an HTTP error."""
        job = Job(calls)
        try:
            queue.submit(job)
        except QueueFull as e:
            raise HTTPException(
                429, f"{e}; retry later", headers={"Retry-After": str(e.retry_after)}
            ) from None
        except KolorsError as e:  # the queue is closed: the server is stopping
            raise HTTPException(503, str(e)) from None
        await wait_for(job, request)
        if job.state is JobState.DONE or (job.state is JobState.CANCELLED and job.results):
            return job.results
        if job.state is JobState.CANCELLED:
            raise HTTPException(409, "the job was interrupted or cancelled before any image was finished")
        if isinstance(job.error, KolorsError):
            raise RequestError(None, str(job.error))
        if "out of memory" in str(job.error).lower():
            raise HTTPException(503, "the device ran out of memory; ask for fewer or smaller images")
        raise HTTPException(
            500, f"generation failed ({type(job.error).__name__}); the server log has the details"
        )

    async def wait_for(job: Job, request: Request) -> None:
        """Await the job; a client that goes away cancels it (queued) or stops it after the current step."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def resolve(_: Job) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        job.add_done_callback(resolve)
        try:
            while not done.done():
                await asyncio.wait([done], timeout=WAIT_POLL_S)
                if not done.done() and await request.is_disconnected():
                    log.info("job %s: the client went away; cancelling it", job.id)
                    queue.cancel(job)
                    await done
        except asyncio.CancelledError:  # the server is stopping this handler
            queue.cancel(job)
            raise

    async def encode(results) -> list[tuple[bytes, int]]:
        """PNGs carrying their A1111 `parameters` text, encoded off the event loop."""

        def work():
            return [
                (png_bytes(img, req.infotext(seed, model.label, size=img.size)), seed)
                for img, seed, req in results
            ]

        return await run_in_threadpool(work)

    # ------------------------------------------------------------------------------------------------ AUTOMATIC1111

    async def a1111_response(request: Request, body, calls, parameters: dict) -> A1111Response:
        results = await run_job(request, calls)
        pngs = await encode(results)
        infotexts = [req.infotext(seed, model.label, size=img.size) for img, seed, req in results]
        info = a1111_info(body, results, infotexts, model.name, version)
        return A1111Response(
            images=[base64.b64encode(png).decode() for png, _ in pngs],
            parameters=parameters,
            info=json.dumps(info, ensure_ascii=False),
        )

    @sdapi.post("/txt2img", response_model=A1111Response, responses=A1111_ERRORS)
    async def txt2img(body: Txt2ImgRequest, request: Request) -> A1111Response:
        """Text to image: `images` are base64 PNGs carrying their `parameters` text; `info` a JSON string."""
        calls = a1111_calls(body, config, model.native_size)
        return await a1111_response(request, body, calls, body.model_dump())

    @sdapi.post("/img2img", response_model=A1111Response, responses=A1111_ERRORS)
    async def img2img(body: Img2ImgRequest, request: Request) -> A1111Response:
        """Image to image from init_images[0], resized to width x height when given, else at its own size."""
        if body.mask:
            raise RequestError("mask", "inpainting is not supported; send init_images without a mask")
        data = decode_base64(body.init_images[0], config, "init_images")
        image = await run_in_threadpool(decode_image, data, config, "init_images")
        size = None
        if body.width is not None or body.height is not None:
            size = (
                body.width or image.width - image.width % 8,
                body.height or image.height - image.height % 8,
            )
            check_size(*size, config)
        image = await run_in_threadpool(fit_init_image, image, size, config, "init_images")
        calls = a1111_calls(body, config, model.native_size, image, body.denoising_strength)
        parameters = body.model_dump()
        if not body.include_init_images:
            parameters["init_images"] = None
        return await a1111_response(request, body, calls, parameters)

    @sdapi.get("/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        """The running job: `progress` 0..1, `eta_relative` seconds, its steps; `current_image` is always null."""
        running, waiting = queue.running(), queue.waiting()
        job = running[0] if running else None
        state = {
            "skipped": False,
            "interrupted": bool(job and job.interrupted),
            "stopping_generation": False,
            "job": f"task({job.id})" if job else "",
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
            "current_image": None,
            "textinfo": None,
        }

    @sdapi.post("/interrupt")
    async def interrupt() -> dict[str, Any]:
        """Stop the running job after its current step; the images it finished are still answered."""
        queue.interrupt()
        return {}

    @sdapi.get("/samplers")
    async def list_samplers() -> list[dict[str, Any]]:
        names = [A1111_SAMPLERS.get(key, (key, [])) for key in samplers.SAMPLERS]
        return [{"name": title, "aliases": aliases, "options": {}} for title, aliases in names]

    @sdapi.get("/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        entry = {"title": model.name, "model_name": model.name, "filename": model.name}
        return [{**entry, "hash": None, "sha256": None, "config": None}]

    @sdapi.get("/options")
    async def get_options() -> dict[str, Any]:
        return {"sd_model_checkpoint": model.name, "samples_format": "png", "CLIP_stop_at_last_layers": 1}

    @sdapi.post("/options", responses=_errors(Detail, 422))
    async def set_options(options: dict[str, Any]) -> None:
        """Accepted and ignored, except a request for another checkpoint, which this server cannot load."""
        wanted = options.get("sd_model_checkpoint")
        if wanted is not None and not _names_model(str(wanted), model):
            raise RequestError("sd_model_checkpoint", f"this server serves only {model.name!r}")

    # ------------------------------------------------------------------------------------------------ OpenAI

    def check_model(name: str | None) -> None:
        if name is not None and not _names_model(name, model):
            raise RequestError("model", f"model {name!r} is not served here; use 'kolors' or {model.name!r}")

    async def openai_response(
        request: Request, call: GenerationRequest, response_format
    ) -> OpenAIImagesResponse:
        results = await run_job(request, [call])
        data = []
        for png, seed in await encode(results):
            if response_format == "url":
                data.append(OpenAIImage(url=f"{request.base_url}v1/files/{files.put(png)}.png", seed=seed))
            else:
                data.append(OpenAIImage(b64_json=base64.b64encode(png).decode(), seed=seed))
        width, height = results[0][0].size
        return OpenAIImagesResponse(created=int(time.time()), data=data, size=f"{width}x{height}")

    @openai.post(
        "/images/generations",
        response_model=OpenAIImagesResponse,
        response_model_exclude_none=True,
        responses=OPENAI_ERRORS,
    )
    async def generations(body: OpenAIImageRequest, request: Request) -> OpenAIImagesResponse:
        """OpenAI's image generation, plus Kolors' fields; `url` images are served here for a limited time."""
        check_model(body.model)
        if body.stream:
            raise RequestError("stream", "streaming is not supported; leave stream unset")
        size = parse_size(body.size, (model.native_size, model.native_size), config)
        fields = {"prompt", "n", "negative_prompt", "seed", "steps", "guidance_scale", "sampler"}
        call = openai_call(config, size=size, **body.model_dump(include=fields))
        return await openai_response(request, call, body.response_format)

    @openai.post(
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
        mask: Annotated[UploadFile | None, File(description="not supported: leave it out")] = None,
        model_name: Annotated[str | None, Form(alias="model")] = None,
        n: Annotated[int, Form(ge=1)] = 1,
        size: Annotated[
            str | None, Form(description="WxH to resize to; default the image's own size")
        ] = None,
        response_format: Annotated[Literal["b64_json", "url"] | None, Form()] = None,
        negative_prompt: Annotated[str, Form(max_length=MAX_PROMPT_CHARS)] = "",
        seed: Annotated[int | None, Form(ge=-1, le=MAX_SEED, description="-1 or absent: random")] = None,
        steps: Annotated[int | None, Form(ge=1)] = None,
        guidance_scale: Annotated[float | None, Form(ge=0, le=100, allow_inf_nan=False)] = None,
        sampler: Annotated[str | None, Form()] = None,
        strength: Annotated[
            float, Form(ge=0, le=1, allow_inf_nan=False, description="how much to change")
        ] = 0.75,
    ) -> OpenAIImagesResponse:
        """Image to image in OpenAI's multipart form: `image` and `prompt`, plus Kolors' fields and `strength`."""
        check_model(model_name)
        uploads = (image or []) + (image_list or [])
        if not uploads:
            raise RequestError("image", "an image file is required")
        if mask is not None:
            raise RequestError("mask", "masks (inpainting) are not supported; send only image")
        if uploads[0].size is not None and uploads[0].size > config.max_upload_bytes:
            raise RequestError(
                "image", f"over this server's upload limit of {config.max_upload_mb:g} MB", 413
            )
        data = await uploads[0].read(config.max_upload_bytes + 1)
        init = await run_in_threadpool(decode_image, data, config, "image")
        init = await run_in_threadpool(fit_init_image, init, parse_size(size, None, config), config, "image")
        call = openai_call(
            config,
            prompt=prompt,
            size=init.size,
            n=n,
            negative_prompt=negative_prompt,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            image=init,
            strength=strength,
        )
        return await openai_response(request, call, response_format)

    @openai.get("/models")
    async def models() -> dict[str, Any]:
        """The served model, in OpenAI's list shape."""
        return {
            "object": "list",
            "data": [{"id": model.name, "object": "model", "created": 0, "owned_by": "kolors"}],
        }

    app.include_router(sdapi)
    app.include_router(openai)

    # ------------------------------------------------------------------------------------------------ open routes

    @app.get(
        "/v1/files/{name}", tags=["OpenAI"], response_class=Response, responses=_errors(OpenAIError, 404)
    )
    async def download(name: str) -> Response:
        """An image answered as a response_format=url: no key needed, the URL is the secret; it expires."""
        data = files.get(name.removesuffix(".png")) if name.endswith(".png") else None
        if data is None:
            raise HTTPException(404, "no such image, or it expired; ask for b64_json to keep images")
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/health", tags=["server"])
    async def health() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["server"], responses={503: {"description": "the workers are not running"}})
    async def ready() -> JSONResponse:
        """The model is loaded and its workers take jobs."""
        body = {
            "ready": queue.alive,
            "model": model.name,
            "queued": queue.waiting(),
            "running": len(queue.running()),
        }
        return JSONResponse(body, 200 if queue.alive else 503)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = WEB_DIR / "index.html"  # read per request: the page can change without a restart
        return HTMLResponse(page.read_text(encoding="utf-8") if page.is_file() else PLACEHOLDER)

    @app.get("/web/{path:path}", include_in_schema=False)
    async def web(path: str) -> Response:
        root = WEB_DIR.resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise HTTPException(404, "not found")
        return FileResponse(target)

    return app


def _names_model(name: str, model: ModelInfo) -> bool:
    return name.strip().lower() in {"kolors", model.name.lower()}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kolors")
    except PackageNotFoundError:
        return "0"


def run(
    pipes, config: ServerConfig, host: str = "127.0.0.1", port: int = 7860, log_level: str = "info"
) -> None:
    """Serve until stopped (Ctrl-C stops the running job between steps and cancels the waiting ones)."""
    import uvicorn

    check_bind(host, config.api_key)
    app = create_app(pipes, config)
    shown = f"[{host}]" if ":" in host else host
    print(f"kolors: serving on http://{shown}:{port}  (web page /, API docs /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
