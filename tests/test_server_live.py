"""The server over real HTTP (uvicorn on a free port of 127.0.0.1): the official openai client, 50 concurrent
requests against a small queue, interrupting a running job, and a client that hangs up cancelling its queued
job. The pipeline is held at a chosen step (GatedPipe) wherever a test needs a job to be running."""

from __future__ import annotations

import io
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402

from kolors import KolorsPipeline  # noqa: E402
from kolors.serve import ServerConfig, create_app  # noqa: E402
from tests.server_helpers import WAIT_S, GatedPipe, decode_png, live_server, wait_until  # noqa: E402

LIMITS = dict(max_steps=4, max_width=128, max_height=128, max_n=4)
SMALL = {"prompt": "a lighthouse at dusk", "steps": 1, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")


def post(base: str, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=WAIT_S, **kwargs)


def progress(base: str) -> dict:
    return httpx.get(f"{base}/sdapi/v1/progress", timeout=WAIT_S).json()


# ------------------------------------------------------------------------------------------------ openai client


def test_the_openai_client_gets_images(pipe):
    openai = pytest.importorskip("openai")
    with live_server(create_app(pipe, ServerConfig(api_key="sk-local", **LIMITS))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-local", max_retries=0)
        assert [m.id for m in client.models.list()] == [pipe.name]

        result = client.images.generate(
            model="kolors", prompt="一只小狗", n=2, size="48x32", extra_body={"seed": 21, "steps": 2}
        )
        images = [decode_png(d.b64_json) for d in result.data]
        assert [im.size for im in images] == [(48, 32), (48, 32)]
        assert ["Seed: 21," in images[0].text["parameters"], "Seed: 22," in images[1].text["parameters"]] == [
            True,
            True,
        ]

        result = client.images.generate(
            model=pipe.name, prompt="a cat", size="32x32", response_format="url", extra_body={"steps": 1}
        )
        fetched = httpx.get(result.data[0].url, timeout=WAIT_S)  # no key needed: the URL is the secret
        assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size == (32, 32)

        init = io.BytesIO()
        Image.new("RGB", (40, 24), (200, 30, 30)).save(init, format="PNG")
        init.seek(0)
        edited = client.images.edit(
            image=("red.png", init, "image/png"),
            prompt="a red barn",
            extra_body={"steps": 2, "strength": 0.5, "seed": 3},
        )
        assert decode_png(edited.data[0].b64_json).size == (40, 24)

        mask = io.BytesIO()
        alpha = Image.new("RGBA", (40, 24), (0, 0, 0, 255))
        alpha.paste((0, 0, 0, 0), (8, 0, 24, 16))  # OpenAI's convention: transparent = edit here
        alpha.save(mask, format="PNG")
        init.seek(0)
        mask.seek(0)
        inpainted = client.images.edit(
            image=("red.png", init, "image/png"),
            mask=("mask.png", mask, "image/png"),
            prompt="a window",
            extra_body={"steps": 2, "seed": 3, "mask_blur": 0},
        )
        pixels = np.asarray(decode_png(inpainted.data[0].b64_json))
        assert (pixels[20:, 30:] == (200, 30, 30)).all()  # outside the mask: the original, pasted back

        with pytest.raises(openai.BadRequestError, match="size"):
            client.images.generate(prompt="x", size="33x33", extra_body={"steps": 1})
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()


# ------------------------------------------------------------------------------------------------ load


def test_50_concurrent_requests_each_get_images_or_429(pipe):
    """A flood against a queue of 8: every request is answered, with its images or a 429 and Retry-After."""
    app = create_app(pipe, ServerConfig(queue_size=8, **LIMITS))
    with live_server(app) as base:

        def one(i: int) -> tuple[int, httpx.Response]:
            if i % 2:
                return i, post(base, "/sdapi/v1/txt2img", {**SMALL, "seed": i, "batch_size": 1 + i % 3})
            body = {"prompt": "a lighthouse", "size": "32x32", "steps": 1, "seed": i, "n": 1 + i % 2}
            return i, post(base, "/v1/images/generations", body)

        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(one, range(50)))
        assert len(answers) == 50
        assert {r.status_code for _, r in answers} <= {200, 429}, [r.text for _, r in answers]
        for i, r in answers:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
            elif i % 2:
                assert json.loads(r.json()["info"])["all_seeds"] == [i + k for k in range(1 + i % 3)]
            else:
                assert [d["seed"] for d in r.json()["data"]] == [i + k for k in range(1 + i % 2)]
        served = sum(r.status_code == 200 for _, r in answers)
        assert served >= 1 and served == app.state.queue.submitted
        assert 50 - served == app.state.queue.rejected
        assert httpx.get(f"{base}/health", timeout=WAIT_S).json() == {"status": "ok"}
        assert post(base, "/sdapi/v1/txt2img", SMALL).status_code == 200  # and still serves


def test_a_full_queue_answers_429_and_loses_nothing(pipe):
    """The first job is held running while 50 requests arrive: the queue's 4 places fill, the rest get 429;
    released, every accepted job finishes."""
    gated = GatedPipe(pipe, hold_at=0)
    app = create_app(gated, ServerConfig(queue_size=4, **LIMITS))
    queue = app.state.queue
    with live_server(app) as base:
        with ThreadPoolExecutor(50) as pool:
            futures = [pool.submit(post, base, "/sdapi/v1/txt2img", {**SMALL, "seed": i}) for i in range(50)]
            try:
                wait_until(lambda: queue.submitted + queue.rejected == 50, "all 50 requests to arrive")
                wait_until(
                    lambda: sum(f.done() for f in futures) == queue.rejected, "the 429s to be answered"
                )
                assert progress(base)["state"]["job_count"] == queue.submitted
            finally:
                gated.release.set()
            answers = [f.result() for f in futures]
        codes = [r.status_code for r in answers]
        assert codes.count(200) == queue.submitted and codes.count(429) == queue.rejected
        assert 4 <= queue.submitted <= 5  # 4 waiting, and 1 running if the worker took it before the flood
        assert all(len(r.json()["images"]) == 1 for r in answers if r.status_code == 200)
        assert "queue is full" in next(r for r in answers if r.status_code == 429).json()["detail"]
        assert gated.calls == queue.submitted == queue.finished
        assert httpx.get(f"{base}/ready", timeout=WAIT_S).json()["ready"] is True


# ------------------------------------------------------------------------------------------------ interrupt


def test_progress_shows_the_image_forming(pipe):
    """Held after the first step: /progress answers the linear preview of that step's denoised latents as a
    PNG at latent size; skip_current_image and --preview-every 0 leave it out."""
    for every, expected in ((1, True), (0, False)):
        gated = GatedPipe(pipe, hold_at=1)
        app = create_app(gated, ServerConfig(**LIMITS, preview_every=every))
        with live_server(app) as base, ThreadPoolExecutor(1) as pool:
            answer = pool.submit(post, base, "/sdapi/v1/txt2img", {**SMALL, "steps": 2, "seed": 4})
            try:
                assert gated.holding.wait(WAIT_S)
                current = progress(base)["current_image"]
                skipped = httpx.get(
                    f"{base}/sdapi/v1/progress?skip_current_image=true", timeout=WAIT_S
                ).json()
            finally:
                gated.release.set()
            assert answer.result().status_code == 200
        assert skipped["current_image"] is None
        assert (current is not None) == expected
        if expected:
            preview = decode_png(current)
            f = pipe.vae_scale_factor  # the preview is at latent size
            assert preview.size == (SMALL["width"] // f, SMALL["height"] // f)


def test_interrupt_stops_the_running_job_and_keeps_finished_images(pipe):
    """Two iterations of two steps, held at the second iteration's second step: progress says so; the interrupt
    stops it there and the first iteration's image is answered."""
    gated = GatedPipe(pipe, hold_at=3)
    with live_server(create_app(gated, ServerConfig(**LIMITS))) as base:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(
                post, base, "/sdapi/v1/txt2img", {**SMALL, "steps": 2, "n_iter": 2, "seed": 8}
            )
            try:
                assert gated.holding.wait(WAIT_S)
                state = progress(base)
                assert state["progress"] == 0.75  # (1 call + 1 of 2 steps) / 2 calls
                assert (state["state"]["sampling_step"], state["state"]["sampling_steps"]) == (1, 2)
                assert state["state"]["job_count"] == 1 and state["state"]["job_no"] == 1
                assert httpx.post(f"{base}/sdapi/v1/interrupt", timeout=WAIT_S).status_code == 200
                assert progress(base)["state"]["interrupted"] is True
            finally:
                gated.release.set()
            r = answer.result()
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        # As AUTOMATIC1111: the running call's images as far as they got (here its last step), no more calls
        assert len(r.json()["images"]) == 2 and info["all_seeds"] == [8, 9]
        assert gated.steps_seen == 4  # stopped: the held step was the last one the pipeline began
        assert progress(base)["state"]["job_count"] == 0
        assert post(base, "/sdapi/v1/txt2img", SMALL).status_code == 200  # the next job runs normally


def test_interrupt_answers_the_images_made_so_far(pipe):
    """AUTOMATIC1111 answers an interrupted request with its images as far as they got, not an error."""
    gated = GatedPipe(pipe, hold_at=1)
    with live_server(create_app(gated, ServerConfig(**LIMITS))) as base:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(
                post,
                base,
                "/sdapi/v1/txt2img",
                {**SMALL, "steps": 3, "seed": 4, "batch_size": 2, "n_iter": 2},
            )
            try:
                assert gated.holding.wait(WAIT_S)
                assert httpx.post(f"{base}/sdapi/v1/interrupt", timeout=WAIT_S).status_code == 200
            finally:
                gated.release.set()
            r = answer.result()
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert len(r.json()["images"]) == 2 and info["all_seeds"] == [
            4,
            5,
        ]  # the first call, after 2 of 3 steps
        assert gated.steps_seen == 2 and gated.calls == 1


def task_progress(base: str, task: str, **body) -> dict:
    return post(base, "/internal/progress", {"id_task": task, **body}).json()


def test_a_task_is_followed_and_interrupted_by_its_force_task_id(pipe):
    """A1111 1.6+'s /internal/progress: the running task with its preview once per new image, the queued one
    with its place; an interrupt naming the queued task takes it out of the queue, the running one goes on."""
    gated = GatedPipe(pipe, hold_at=1)
    app = create_app(gated, ServerConfig(**LIMITS))
    with live_server(app) as base, ThreadPoolExecutor(2) as pool:
        a = pool.submit(post, base, "/sdapi/v1/txt2img", {**SMALL, "steps": 2, "force_task_id": "task(a)"})
        try:
            assert gated.holding.wait(WAIT_S)
            b = pool.submit(post, base, "/sdapi/v1/txt2img", {**SMALL, "force_task_id": "b"})
            wait_until(lambda: app.state.queue.waiting() == 1, "the second task to be queued")
            shown = task_progress(base, "task(a)")
            assert (shown["active"], shown["queued"], shown["completed"]) == (True, False, False)
            assert shown["progress"] == 0.5 and shown["textinfo"] == "Step 1 of 2" and shown["eta"] >= 0
            assert (
                shown["live_preview"].startswith("data:image/png;base64,") and shown["id_live_preview"] == 1
            )
            again = task_progress(base, "task(a)", id_live_preview=1)  # the same preview: not sent again
            assert again["live_preview"] is None and again["id_live_preview"] == 1
            assert task_progress(base, "task(a)", live_preview=False)["live_preview"] is None
            queued = task_progress(base, "b")
            assert (queued["active"], queued["queued"], queued["textinfo"]) == (False, True, "In queue: 1/1")
            assert queued["progress"] is None and queued["id_live_preview"] == -1
            assert task_progress(base, "nobody")["textinfo"] == "Waiting..."
            assert progress(base)["state"]["job"] == "task(a)"
            assert httpx.post(f"{base}/sdapi/v1/interrupt", params={"id_task": "nobody"}).status_code == 200
            assert httpx.post(f"{base}/sdapi/v1/interrupt", params={"id_task": "b"}).status_code == 200
            assert b.result().status_code == 409  # left the queue before any image
            assert not app.state.queue.running()[0].interrupted
        finally:
            gated.release.set()
        r = a.result()
        assert r.status_code == 200 and gated.steps_seen == 2  # ran to its end
        done = task_progress(base, "task(a)")
        assert (done["active"], done["queued"], done["completed"]) == (False, False, True)
        assert task_progress(base, "b")["completed"] is True


def test_a_plain_interrupt_stops_the_most_recently_started_job(pipe, tiny_model_dir):
    """Two devices, a job held on each: /sdapi/v1/interrupt and /progress mean the newer one, as A1111 (one job
    at a time) means the running one; the older job runs to its end."""
    other = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    first, second = GatedPipe(pipe, hold_at=1), GatedPipe(other, hold_at=1)
    app = create_app([first, second], ServerConfig(**LIMITS))
    queue = app.state.queue
    with live_server(app) as base, ThreadPoolExecutor(2) as pool:
        body = {**SMALL, "steps": 2}
        older = pool.submit(post, base, "/sdapi/v1/txt2img", {**body, "seed": 1, "force_task_id": "older"})
        try:
            wait_until(lambda: len(queue.running()) == 1 and queue.running()[0].step == 1, "the first job")
            newer = pool.submit(
                post, base, "/sdapi/v1/txt2img", {**body, "seed": 2, "force_task_id": "newer"}
            )
            wait_until(lambda: len(queue.running()) == 2 and queue.running()[1].step == 1, "the second job")
            assert progress(base)["state"]["job"] == "newer"
            assert httpx.post(f"{base}/sdapi/v1/interrupt", timeout=WAIT_S).status_code == 200
            assert [job.interrupted for job in queue.running()] == [False, True]
        finally:
            first.release.set()
            second.release.set()
        answers = older.result(), newer.result()
    assert [r.status_code for r in answers] == [200, 200]
    # both answer their image: the interrupted one's as its first step left it
    seeds = [json.loads(r.json()["info"])["all_seeds"] for r in answers]
    assert seeds == [[1], [2]]


# ------------------------------------------------------------------------------------------------ cancel


def test_a_client_that_hangs_up_cancels_its_queued_job(pipe):
    gated = GatedPipe(pipe, hold_at=0)
    app = create_app(gated, ServerConfig(**LIMITS))
    with live_server(app) as base:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(post, base, "/sdapi/v1/txt2img", {**SMALL, "seed": 1})
            try:
                assert gated.holding.wait(WAIT_S)
                host, port = base.removeprefix("http://").split(":")
                body = json.dumps({**SMALL, "seed": 2}).encode()
                with socket.create_connection((host, int(port)), timeout=WAIT_S) as raw:
                    raw.sendall(
                        b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    wait_until(lambda: app.state.queue.waiting() == 1, "the second job to be queued")
                # The connection is closed: the server notices and takes the job out of the queue.
                wait_until(lambda: app.state.queue.waiting() == 0, "the hung-up client's job to be cancelled")
                assert progress(base)["state"]["job_count"] == 1
            finally:
                gated.release.set()
            assert running.result().status_code == 200
        assert gated.calls == 1  # the cancelled job never ran
        assert app.state.queue.finished == 1


def test_a_client_that_hangs_up_stops_its_running_job(pipe):
    gated = GatedPipe(pipe, hold_at=1)
    app = create_app(gated, ServerConfig(**LIMITS))
    with live_server(app) as base:
        host, port = base.removeprefix("http://").split(":")
        body = json.dumps({**SMALL, "steps": 4}).encode()
        try:
            with socket.create_connection((host, int(port)), timeout=WAIT_S) as raw:
                raw.sendall(
                    b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                assert gated.holding.wait(WAIT_S)
            job = app.state.queue.running()[0]
            wait_until(lambda: job.interrupted, "the server to notice the client left")
        finally:
            gated.release.set()
        assert job.wait(WAIT_S) and job.state.value == "cancelled" and not job.results
        assert gated.steps_seen == 2  # it stopped at the next step instead of running all 4


def test_closing_the_queue_cancels_waiting_jobs_and_stops_the_running_one(pipe):
    from kolors.request import GenerationRequest
    from kolors.serve.jobs import Job, JobQueue, JobState

    gated = GatedPipe(pipe, hold_at=0)
    queue = JobQueue([gated], maxsize=2)
    queue.start()
    request = GenerationRequest("x", steps=2, width=32, height=32, seed=0)
    first, second = queue.submit(Job([request])), queue.submit(Job([request]))
    assert gated.holding.wait(WAIT_S)
    threading.Timer(0.2, gated.release.set).start()
    queue.close()
    assert first.state is JobState.CANCELLED and second.state is JobState.CANCELLED
    assert gated.calls == 1 and not queue.alive


def test_a_failing_job_does_not_stop_the_worker(pipe):
    from kolors.request import GenerationRequest
    from kolors.serve.jobs import Job, JobQueue, JobState

    class Flaky(GatedPipe):
        def __call__(self, *args, **kwargs):
            if self.calls == 0:
                self.calls += 1
                raise RuntimeError("device lost")
            return super().__call__(*args, **kwargs)

    queue = JobQueue([Flaky(pipe, hold_at=None)], maxsize=2)
    queue.start()
    request = GenerationRequest("x", steps=1, width=32, height=32, seed=0)
    failed, ok = queue.submit(Job([request])), queue.submit(Job([request]))
    assert failed.wait(WAIT_S) and ok.wait(WAIT_S)
    assert failed.state is JobState.FAILED and "device lost" in str(failed.error)
    assert ok.state is JobState.DONE and len(ok.results) == 1 and queue.alive
    queue.close()
