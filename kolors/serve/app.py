"""`kolors serve`: the app that puts the OpenAI routes, the AUTOMATIC1111 routes and the web page over one job
queue, and the command that runs it.

Anything a request can get wrong answers 4xx naming the field (kolors.serve.http). The routes live in
kolors.serve.openai, kolors.serve.a1111 and kolors.serve.web; what they share (the model, the queue, running a
job) in kolors.serve.state.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import math
import sys
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from starlette.concurrency import run_in_threadpool

from kolors.errors import KolorsError
from kolors.serve import a1111, control, openai, web
from kolors.serve.http import BodyLimit, Guard, add_error_handlers
from kolors.serve.jobs import JobQueue
from kolors.serve.schemas import ServerConfig, lora_files
from kolors.serve.state import FileStore, ModelInfo

__all__ = ["ServerConfig", "check_bind", "create_app", "run"]


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


def create_app(pipes, config: ServerConfig | None = None) -> FastAPI:
    """The app serving `pipes` (a KolorsPipeline, or a list of them, one per device, each with its worker).
    The workers start now; the app's shutdown (or app.state.queue.close()) stops them."""
    config = config or ServerConfig()
    config.check()
    pipes = list(pipes) if isinstance(pipes, (list, tuple)) else [pipes]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    queue = JobQueue(pipes, maxsize=config.queue_size, preview_every=config.preview_every)
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
        version=_version(),
        lifespan=lifespan,
        **({"docs_url": None, "redoc_url": None} if DOCS_ASSETS else {}),
    )
    app.state.config, app.state.queue = config, queue
    app.state.decodes = threading.BoundedSemaphore(config.max_decodes)  # held by threads, not the loop
    app.state.files = FileStore(config.url_ttl, int(config.url_store_mb * 2**20))
    app.state.model = ModelInfo(
        pipes[0].name, pipes[0].native_size, pipes[0].label, tuple(config.served_model_names)
    )
    app.state.preview = pipes[0].preview
    app.state.loras = lora_files(config.lora_dir)
    app.state.controlnets = list(getattr(pipes[0], "controlnets", {}))  # loaded before the server started
    # The image-prompt adapters loaded at start (--ip-adapter, --faceid): requests may carry their images
    app.state.image_prompts = {
        "ip": getattr(pipes[0], "ip_adapter", None) is not None,
        "face": getattr(pipes[0], "faceid", None) is not None,
    }
    add_error_handlers(app)
    # base64 makes an upload 4/3 larger; the rest of a request is small.
    app.add_middleware(BodyLimit, max_bytes=math.ceil(config.max_upload_bytes * 4 / 3) + 2**20)
    app.add_middleware(Guard, api_key=config.api_key, allowed_hosts=config.allowed_hosts)  # outermost
    for routes in (a1111.router, a1111.internal, control.router, openai.router, web.router):
        app.include_router(routes)
    if DOCS_ASSETS:
        add_offline_docs(app)
    return app


def _docs_assets() -> Path | None:
    """Swagger UI's and ReDoc's files from the fastapi-offline wheel (the server extra), when installed."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


DOCS_ASSETS = _docs_assets()  # None: FastAPI's own /docs and /redoc, which load their scripts from a CDN
DOCS_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def add_offline_docs(app: FastAPI) -> None:
    """/docs and /redoc with their scripts served from here, so they work offline."""

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - API docs",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url="/docs-assets/redoc.standalone.js",
            redoc_favicon_url="/docs-assets/favicon.png",
            with_google_fonts=False,
        )

    @app.get("/docs-assets/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in DOCS_FILES:
            raise HTTPException(404, "not found")
        return FileResponse(DOCS_ASSETS / name, headers={"Cache-Control": "public, max-age=86400"})


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
    log_to_stderr(log_level)
    app = create_app(pipes, config)
    shown = f"[{host}]" if ":" in host else host
    print(f"kolors: serving on http://{shown}:{port}  (web page /, API docs /docs)", flush=True)
    # kolors.server's access log replaces uvicorn's, so one logger has requests and jobs alike
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10, access_log=False
    )


def log_to_stderr(level: str = "info") -> None:
    """The server's logger ("kolors.server": requests, jobs' ends) to stderr, unless the caller set it up."""
    logger = logging.getLogger("kolors.server")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s kolors: %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(level.upper())
        logger.propagate = False
