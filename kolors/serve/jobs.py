"""The server's job queue: one bounded queue, one worker thread per device, jobs run in the order they came.

A job is one or more pipeline calls (AUTOMATIC1111's `n_iter` batches of `batch_size` images). The pipeline is
synchronous and holds the device for the whole call, so requests never call it themselves: they submit a job
and wait for it. The worker reports progress from the pipeline's step callback and stops a job between steps
when asked to (an interrupt, or a client that went away), which is the callback raising `Interrupted`.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from kolors.errors import KolorsError
from kolors.pipeline import StopSampling, generate, lora_hashes
from kolors.request import GenerationRequest

log = logging.getLogger("kolors.server")


class QueueFull(Exception):
    """No room for another job; `retry_after` is an estimate in whole seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the queue is full ({waiting} jobs waiting)")
        self.waiting, self.retry_after = waiting, retry_after


class Unavailable(Exception):
    """What runs the job went away during it (a Ray Serve replica died twice): worth retrying in
    `retry_after` seconds, once a replacement is up."""

    def __init__(self, message: str, retry_after: int = 10):
        super().__init__(message)
        self.retry_after = retry_after


class Interrupted(Exception):
    """Raised from the step callback to stop a running job."""


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = (
        "cancelled"  # cancelled while queued, or interrupted while running (results holds what finished)
    )


@dataclass(eq=False)
class Job:
    calls: list[GenerationRequest]  # one pipeline call each
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    state: JobState = JobState.QUEUED
    results: list[tuple[Image.Image, int, GenerationRequest]] = field(default_factory=list)
    error: Exception | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None  # time.monotonic() when the worker took it
    finished: float | None = None
    call: int = 0  # which of `calls` is running
    step: int = 0  # steps done in that call
    steps: int = 0  # steps that call runs
    interrupted: bool = False  # stopped by /interrupt or cancelled while running
    keep_partial: bool = False  # /interrupt: the running call decodes what it has, as AUTOMATIC1111 answers
    preview: Any = (
        None  # the latest denoised latents of the call's first image (a device tensor), for /progress
    )
    preview_id: int = 0  # how many previews the job has had: /internal/progress's id_live_preview
    task: str = ""  # A1111's force_task_id: the id its client polls /internal/progress with; empty: task(id)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _callbacks: list[Callable[[Job], None]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def progress(self) -> float:
        """0..1 over all of the job's calls."""
        if self.state is JobState.DONE:
            return 1.0
        if not self.calls or self.steps == 0:
            return self.call / max(1, len(self.calls))
        return min(1.0, (self.call + self.step / self.steps) / len(self.calls))

    @property
    def task_id(self) -> str:
        """The id A1111 clients know the job by (its id_task)."""
        return self.task or f"task({self.id})"

    @property
    def eta(self) -> float:
        """Seconds left, extrapolated from the time spent so far (0 until the first step is done)."""
        if self.started is None or self.finished is not None or self.progress <= 0:
            return 0.0
        elapsed = time.monotonic() - self.started
        return elapsed / self.progress - elapsed

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def add_done_callback(self, fn: Callable[[Job], None]) -> None:
        """Call fn(job) once the job is finished (at once if it already is), from the thread that finished it."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        _call(fn, self)

    def describe_error(self) -> str:
        if self.error is None:
            return ""
        text = str(self.error).strip().splitlines()
        return f"{type(self.error).__name__}: {text[0]}" if text else type(self.error).__name__

    def _finish(self, state: JobState) -> None:
        with self._lock:
            self.state, self.finished = state, time.monotonic()
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            _call(fn, self)


def log_end(job: Job, seconds: float | None = None) -> None:
    """One line per finished job on the server's logger: done, failed with its reason, or cancelled."""
    took = f" after {seconds:.1f} s" if seconds is not None else " while queued"
    images = f"{len(job.results)} image(s)"
    if job.state is JobState.DONE:
        log.info("job %s done: %s%s", job.id, images, took)
    elif job.state is JobState.FAILED:
        log.warning("job %s failed%s: %s", job.id, took, job.describe_error())
    else:
        why = "interrupted" if job.interrupted else "cancelled"
        log.info("job %s %s%s (%s kept)", job.id, why, took, images)


def _call(fn: Callable[[Job], None], job: Job) -> None:
    try:
        fn(job)
    except Exception:  # a waiter that went away (its event loop closed) must not kill the worker
        log.exception("job %s: a done callback failed", job.id)


class JobQueue:
    """Jobs waiting in order (at most `maxsize`), taken by one worker thread per pipeline."""

    def __init__(self, pipes: Sequence, maxsize: int = 64, preview_every: int = 1):
        if maxsize < 1:
            raise KolorsError(f"queue size must be at least 1, not {maxsize}")
        self.pipes, self.maxsize, self.preview_every = list(pipes), maxsize, preview_every
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []  # in the order they started
        self._finished_tasks: deque[str] = deque(maxlen=16)  # as A1111 remembers them, for /internal/progress
        self._cond = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._generation = 0
        self._seconds_per_job = 10.0  # running mean, for Retry-After
        self.submitted = self.rejected = self.finished = 0

    def start(self) -> None:
        """Start one worker per pipeline; again after close() (an app's lifespan may run more than once)."""
        with self._cond:
            if self._threads and not self._closed:
                return
            self._closed = False
            self._generation += 1  # a worker of an earlier start still finishing its job then ends
            self._threads = [
                threading.Thread(
                    target=self._work, args=(pipe, self._generation), name=f"kolors-worker-{i}", daemon=True
                )
                for i, pipe in enumerate(self.pipes)
            ]
        for thread in self._threads:
            thread.start()

    @property
    def alive(self) -> bool:
        return not self._closed and bool(self._threads) and all(t.is_alive() for t in self._threads)

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closed:
                raise KolorsError("the server is shutting down; retry on another instance")
            if len(self._waiting) >= self.maxsize:
                self.rejected += 1
                # Each worker clears a job in about _seconds_per_job: the time until one place frees up.
                wait = self._seconds_per_job / len(self.pipes)
                raise QueueFull(len(self._waiting), max(1, math.ceil(wait)))
            self._waiting.append(job)
            self.submitted += 1
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """A queued job leaves the queue now; a running one stops after its current step."""
        with self._cond:
            if job.state is JobState.QUEUED and job in self._waiting:
                self._waiting.remove(job)
                self._finished_tasks.append(job.task_id)
            elif job.state is JobState.RUNNING:
                job.interrupted = True
                job._stop.set()
                return
            else:
                return
        job._finish(JobState.CANCELLED)
        log_end(job)

    def interrupt(self, task_id: str | None = None) -> int:
        """Stop a running job after its current step, keeping its images as far as they got: the one with
        A1111's `task_id`, or without one the most recently started (the waiting ones go on). A queued job
        named by its task_id leaves the queue. How many jobs this stopped."""
        with self._cond:
            running = [j for j in self._running if task_id is None or j.task_id == task_id][-1:]
            queued = [] if task_id is None or running else [j for j in self._waiting if j.task_id == task_id]
            for job in running:
                job.interrupted = job.keep_partial = True
                job._stop.set()
        for job in queued:
            self.cancel(job)
        return len(running) + len(queued)

    def task(self, task_id: str) -> tuple[Job | None, int | None, bool]:
        """A1111's view of a task: (the job, running or queued, or None; its place in the queue from 0 while
        queued; whether it finished among the last 16)."""
        with self._cond:
            for job in reversed(self._running):
                if job.task_id == task_id:
                    return job, None, False
            for place, job in enumerate(self._waiting):
                if job.task_id == task_id:
                    return job, place, False
            return None, None, task_id in self._finished_tasks

    def running(self) -> list[Job]:
        with self._cond:
            return list(self._running)

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel the waiting jobs, stop the running ones between steps and end the workers."""
        with self._cond:
            self._closed = True
            cancelled = list(self._waiting)
            self._waiting.clear()
            for job in self._running:
                job._stop.set()
            self._cond.notify_all()
        for job in cancelled:
            job._finish(JobState.CANCELLED)
            log_end(job)
        for thread in self._threads:
            thread.join(timeout)

    # ------------------------------------------------------------------------------------------------ worker

    def _work(self, pipe, generation: int) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed or generation != self._generation:
                    return
                job = self._waiting.popleft()
                job.state, job.started = JobState.RUNNING, time.monotonic()
                self._running.append(job)
            try:
                state = self._run(pipe, job)
            finally:
                with self._cond:
                    self._running.remove(job)
                    self._finished_tasks.append(job.task_id)
                    self.finished += 1
                    elapsed = time.monotonic() - job.started
                    self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed
            job._finish(state)
            log_end(job, elapsed)

    def _run(self, pipe, job: Job) -> JobState:
        def on_step(step: int, num_steps: int, latents, denoised) -> None:
            job.step, job.steps = step + 1, num_steps
            if self.preview_every and (step + 1) % self.preview_every == 0:
                job.preview = denoised[:1]  # kept on the device: read back only when a client asks
                job.preview_id += 1
            if job._stop.is_set():
                # An interrupt keeps the images as far as they got (A1111's answer); a client gone needs none.
                raise StopSampling if job.keep_partial else Interrupted

        try:
            for i, request in enumerate(job.calls):
                if job._stop.is_set():
                    raise Interrupted
                job.call, job.step, job.steps, job.preview = i, 0, request.steps, None
                job.results.extend(_make(pipe, request, on_step))
            return JobState.CANCELLED if job._stop.is_set() else JobState.DONE
        except Interrupted:
            return JobState.CANCELLED
        except (KolorsError, QueueFull, Unavailable) as e:  # Ray Serve's replicas turned it away or died
            job.error = e
            return JobState.FAILED
        except Exception as e:  # the worker must outlive any job; the server answers it as a logged 5xx
            log.exception("job %s failed", job.id)
            job.error = e
            _free_device_memory()
            return JobState.FAILED


def _make(pipe, request: GenerationRequest, on_step) -> list[tuple[Image.Image, int, GenerationRequest]]:
    """One pipeline call's (image, seed, request with its LoRAs' hashes). A pipe with `serve_call` runs it
    elsewhere (kolors.serve.on_ray's replicas)."""
    remote = getattr(pipe, "serve_call", None)
    if remote is not None:
        return remote(request, on_step)
    return [
        (image, seed, lora_hashes(pipe, request)) for image, seed in generate(pipe, request, callback=on_step)
    ]


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
