"""`kolors serve`: the app that puts the OpenAI routes, the AUTOMATIC1111 routes and the web page over one job
queue, and the command that runs it.

Anything a request can get wrong answers 4xx naming the field (kolors.serve.http). The routes live in
kolors.serve.openai, kolors.serve.a1111 and kolors.serve.web; what they share (the model, the queue, running a
job) in kolors.serve.state.
"""

from __future__ import annotations

import ipaddress
import math
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from kolors.errors import KolorsError
from kolors.serve import a1111, openai, web
from kolors.serve.http import BodyLimit, add_error_handlers
from kolors.serve.jobs import JobQueue
from kolors.serve.schemas import ServerConfig
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
    )
    app.state.config, app.state.queue = config, queue
    app.state.files = FileStore(config.url_ttl, int(config.url_store_mb * 2**20))
    app.state.model = ModelInfo(pipes[0].name, pipes[0].native_size, pipes[0].label)
    app.state.preview = pipes[0].preview
    add_error_handlers(app)
    # base64 makes an upload 4/3 larger; the rest of a request is small.
    app.add_middleware(BodyLimit, max_bytes=math.ceil(config.max_upload_bytes * 4 / 3) + 2**20)
    for routes in (a1111.router, openai.router, web.router):
        app.include_router(routes)
    return app


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
