"""The routes that need no key: the web page and its files, health and readiness, and the images answered as
URLs (the URL is the secret)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from kolors.serve.http import error_docs
from kolors.serve.schemas import OpenAIError

WEB_DIR = Path(__file__).parent / "web"
PLACEHOLDER = """<!doctype html><meta charset="utf-8"><title>kolors</title>
<h1>kolors</h1><p>The web page is not installed. The API is described at <a href="/docs">/docs</a>.</p>"""

router = APIRouter()


@router.get(
    "/v1/files/{name}", tags=["OpenAI"], response_class=Response, responses=error_docs(OpenAIError, 404)
)
async def download(name: str, request: Request) -> Response:
    """An image answered as a response_format=url: no key needed, the URL is the secret; it expires."""
    data = request.app.state.files.get(name.removesuffix(".png")) if name.endswith(".png") else None
    if data is None:
        raise HTTPException(404, "no such image, or it expired; ask for b64_json to keep images")
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/health", tags=["server"])
async def health() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/ready", tags=["server"], responses={503: {"description": "the workers are not running"}})
async def ready(request: Request) -> JSONResponse:
    """The model is loaded and its workers take jobs."""
    queue = request.app.state.queue
    ready = queue.alive
    body = {
        "ready": ready,
        "model": request.app.state.model.name,
        "queued": queue.waiting(),
        "running": len(queue.running()),
    }
    replicas = getattr(request.app.state, "replicas", None)  # on Ray Serve: the model's replicas by state
    if replicas is not None:
        body["replicas"] = counts = await run_in_threadpool(replicas)
        body["ready"] = ready = ready and counts.get("RUNNING", 0) > 0
    return JSONResponse(body, 200 if ready else 503)


@router.get("/", include_in_schema=False)
async def index() -> Response:
    page = WEB_DIR / "index.html"  # read per request: the page can change without a restart
    return HTMLResponse(page.read_text(encoding="utf-8") if page.is_file() else PLACEHOLDER)


@router.get("/web/{path:path}", include_in_schema=False)
async def web(path: str) -> Response:
    root = WEB_DIR.resolve()
    try:
        target = (root / path).resolve()
        found = target.is_relative_to(root) and target.is_file()
    except (ValueError, OSError):  # a NUL byte, a name too long: no such file
        found = False
    if not found:
        raise HTTPException(404, "not found")
    return FileResponse(target)
