"""What the routes share: the served model, the queue and the images behind URLs (on `app.state`), and running a
job for a request: queue it, await it, cancel it when the client goes away, encode its PNGs off the event loop.

Requests become GenerationRequests (kolors.serve.schemas) inside a Job on the bounded queue of kolors.serve.jobs,
run by one worker per device; a handler awaits its job and cancels it when its client goes away.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from kolors.errors import KolorsError
from kolors.request import GenerationRequest, png_bytes
from kolors.serve.jobs import Job, JobQueue, JobState, QueueFull, Unavailable
from kolors.serve.schemas import RequestError, ServerConfig

log = logging.getLogger("kolors.server")

WAIT_POLL_S = 0.5  # how often a waiting handler looks whether its client is still there


# OpenAI's image models: clients that hard-code one (the openai SDK's examples do) are served this model.
OPENAI_MODEL_NAMES = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    native_size: int  # the side the model was trained at: the default width and height
    label: str  # as images' parameters name it (KolorsPipeline.label)
    served_names: tuple[str, ...] = ()  # --served-model-name; empty: `name`

    @property
    def served_name(self) -> str:
        """The name answers carry and /v1/models lists first."""
        return self.served_names[0] if self.served_names else self.name

    def answers_to(self, name: str) -> bool:
        """Whether a client asking for model `name` means this one: a served name, the model's, 'kolors', or
        one of OpenAI's (as vLLM serves a model under --served-model-name aliases)."""
        names = {"kolors", self.name, *self.served_names, *OPENAI_MODEL_NAMES}
        return name.strip().lower() in {n.lower() for n in names}


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


def config(request: Request) -> ServerConfig:
    return request.app.state.config


def model(request: Request) -> ModelInfo:
    return request.app.state.model


async def run_job(request: Request, calls: list[GenerationRequest], task: str | None = None):
    """Queue the calls as one job and await it: [(image, seed, request), ...] or an HTTP error. `task`: the id
    A1111 clients follow it by (force_task_id)."""
    queue: JobQueue = request.app.state.queue
    job = Job(calls, task=task or "")
    try:
        queue.submit(job)
    except QueueFull as e:
        raise HTTPException(429, f"{e}; retry later", headers={"Retry-After": str(e.retry_after)}) from None
    except KolorsError as e:  # the queue is closed: the server is stopping
        raise HTTPException(503, str(e)) from None
    await wait_for(job, request, queue)
    if job.state is JobState.DONE or (job.state is JobState.CANCELLED and job.results):
        return job.results
    if job.state is JobState.CANCELLED:
        raise HTTPException(409, "the job was interrupted or cancelled before any image was finished")
    if isinstance(job.error, QueueFull):
        e = job.error
        raise HTTPException(429, f"{e}; retry later", headers={"Retry-After": str(e.retry_after)})
    if isinstance(job.error, Unavailable):
        e = job.error
        raise HTTPException(503, f"{e}; retry later", headers={"Retry-After": str(e.retry_after)})
    if isinstance(job.error, KolorsError):
        raise RequestError(None, str(job.error))
    if "out of memory" in str(job.error).lower():
        raise HTTPException(503, "the device ran out of memory; ask for fewer or smaller images")
    raise HTTPException(
        500, f"generation failed ({type(job.error).__name__}); the server log has the details"
    )


async def wait_for(job: Job, request: Request, queue: JobQueue) -> None:
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


def infotext(result, label: str) -> str:
    image, seed, req = result
    return req.infotext(seed, label, size=image.size)


async def encode(results, label: str) -> list[tuple[bytes, int]]:
    """PNGs carrying their A1111 `parameters` text, encoded off the event loop."""

    def work():
        return [(png_bytes(r[0], infotext(r, label)), r[1]) for r in results]

    return await run_in_threadpool(work)
