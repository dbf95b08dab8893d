"""What the server tests share: the tiny pipeline held at a chosen step, a real uvicorn server on a free port, and
PNG decoding. Holding the pipeline turns "a job is running" and "jobs are queued" into states a test waits for,
so no test depends on how fast this machine is."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager

from PIL import Image

WAIT_S = 120.0  # generous: a shared, loaded CI machine is slow; a hang fails instead of blocking forever


class GatedPipe:
    """A pipeline that stops before its step number `hold_at` (counted over all its calls) until `release` is set.
    `hold_at=None` never holds. Everything else is the wrapped pipeline's."""

    def __init__(self, pipe, hold_at: int | None = 0):
        self._pipe, self.hold_at = pipe, hold_at
        self.steps_seen = self.calls = 0
        self.holding, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, callback=None, **kwargs):
        self.calls += 1

        def gated(step, num_steps, latents, denoised):
            if self.steps_seen == self.hold_at:
                self.holding.set()
                if not self.release.wait(WAIT_S):
                    raise RuntimeError("the test never released the pipeline")
            self.steps_seen += 1
            if callback is not None:
                callback(step, num_steps, latents, denoised)

        return self._pipe(*args, callback=gated, **kwargs)


@contextmanager
def live_server(app):
    """Serve `app` with uvicorn on 127.0.0.1 and a free port in a background thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "the server to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()


def wait_until(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.02)


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    image.load()
    return image


def png_b64(image: Image.Image, prefix: bool = False) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    return f"data:image/png;base64,{data}" if prefix else data
