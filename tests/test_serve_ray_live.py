"""`kolors serve --ray` on a real local Ray (num_cpus=2): the tiny model on two CPU replicas behind the ingress,
deployed once for the module as `serve run kolors.serve.on_ray:app` deploys it, on a Ray started with Serve's
direct ingress as `kolors serve --ray` starts one, beside the single-process server over the same weights. Skipped where Ray Serve is not installed (the test extra has it: ray[serve]).

The default run (CI's) starts Ray and checks the images and the 429s: about 80 s here, most of it Ray and the
replicas starting. `-m slow` adds per-task progress and interrupt across replicas, a client hanging up and a
replica killed mid-run (about 75 s more); `pytest -m "slow or not slow" tests/test_serve_ray_live.py` runs all four in one Ray."""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
ray = pytest.importorskip("ray")
try:
    from ray import serve
except ImportError as e:  # ray without its serve extra's packages (grpcio, aiohttp, ...)
    pytest.skip(
        f"Ray Serve is not installed ({e.name} is missing): pip install 'ray[serve]'", allow_module_level=True
    )
import httpx  # noqa: E402

from kolors import KolorsPipeline  # noqa: E402
from kolors.serve import ServerConfig, create_app, on_ray  # noqa: E402
from tests.server_helpers import WAIT_S, decode_png, live_server, wait_until  # noqa: E402

LIMITS = dict(max_steps=4000, max_width=128, max_height=128, max_n=4, queue_size=4)
BODY = {"prompt": "一只瓢虫, macro photo", "steps": 2, "width": 48, "height": 32, "seed": 5}
LONG = {**BODY, "steps": 100, "width": 128, "height": 128}  # seconds on a replica: time to follow it
ENDLESS = {**LONG, "steps": 4000}  # minutes on a replica: it runs until interrupted


@pytest.fixture(scope="module")
def ray_bases(tiny_model_dir):
    """The base URLs of the app on Ray Serve, 2 replicas of half a CPU each (one torch thread, as here): the
    ingress's own port, as `kolors serve --ray` sets up a local Ray (Serve's direct ingress), and Serve's proxy,
    the way on a cluster."""
    root = str(Path(__file__).resolve().parents[1])  # the replicas import this checkout's kolors
    direct, port = on_ray.free_port("127.0.0.1"), on_ray.free_port("127.0.0.1")
    with on_ray.environ(on_ray.direct_ingress_env(direct)):
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=80 * 2**20,
            runtime_env={
                "env_vars": {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
            },
        )
    try:
        # as `serve run kolors.serve.on_ray:app key=value ...` and a RayService pass them: strings
        options = dict(model=str(tiny_model_dir), dtype="float32", device="cpu", replicas="2")
        limits = {k: str(v) for k, v in LIMITS.items()}
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(on_ray.app({**options, "cpus_per_replica": "0.5", **limits}), name=on_ray.APP_NAME)
        yield f"http://127.0.0.1:{direct}", f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local_base(tiny_model_dir):
    """The single-process server over the same weights, at one torch thread as the replicas (conftest's 2 would
    round float32 sums in another order: a few pixels a level apart)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
        with live_server(create_app(pipe, ServerConfig(**LIMITS))) as base:
            yield base
    finally:
        torch.set_num_threads(threads)


def post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=WAIT_S)


def task(base: str, id_task: str) -> dict:
    return post(base, "/internal/progress", {"id_task": id_task, "live_preview": False}).json()


def same_pngs(a: list[str], b: list[str]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        x, y = decode_png(x), decode_png(y)
        assert (np.asarray(x) == np.asarray(y)).all()
        assert x.info["parameters"] == y.info["parameters"]


def a1111_info(answer: dict) -> dict:
    return {k: v for k, v in json.loads(answer["info"]).items() if k != "job_timestamp"}


@pytest.fixture(scope="module")
def on_ray_base(ray_bases):
    return ray_bases[0]


def test_the_openai_client_and_a1111_json_get_the_single_process_images(ray_bases, local_base):
    openai = pytest.importorskip("openai")
    on_ray_base, through_proxy = ray_bases
    ready = httpx.get(f"{on_ray_base}/ready", timeout=WAIT_S)
    assert ready.status_code == 200 and ready.json()["replicas"] == {"RUNNING": 2}, ready.text
    for path in ("/", "/docs", "/health"):
        assert httpx.get(f"{on_ray_base}{path}", timeout=WAIT_S).status_code == 200
    # the way on a cluster, Serve's proxy, answers the same
    via_proxy, direct = (
        post(base, "/sdapi/v1/txt2img", BODY).json() for base in (through_proxy, on_ray_base)
    )
    assert via_proxy["images"] == direct["images"] and a1111_info(via_proxy) == a1111_info(direct)

    def openai_images(base):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        made = client.images.generate(
            model="kolors", prompt="一只小狗", n=2, size="48x32", extra_body={"seed": 21, "steps": 2}
        )
        return [d.b64_json for d in made.data]

    same_pngs(openai_images(on_ray_base), openai_images(local_base))
    for body in ({**BODY, "batch_size": 2}, {**BODY, "seed": 6, "n_iter": 2, "sampler_name": "DPM++ 2M"}):
        got, expected = (
            post(on_ray_base, "/sdapi/v1/txt2img", body),
            post(local_base, "/sdapi/v1/txt2img", body),
        )
        assert got.status_code == expected.status_code == 200, got.text
        same_pngs(got.json()["images"], expected.json()["images"])
        assert a1111_info(got.json()) == a1111_info(expected.json())


def test_twenty_concurrent_requests_are_all_served_or_told_to_retry(on_ray_base):
    """The ingress holds 2 running and 4 waiting (queue_size) jobs: the others answer 429 with Retry-After,
    none is lost or fails."""
    with ThreadPoolExecutor(20) as pool:
        answers = list(
            pool.map(lambda s: post(on_ray_base, "/sdapi/v1/txt2img", {**BODY, "seed": s}), range(20))
        )
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429} and codes.count(200) >= 2, [
        r.text for r in answers if r.status_code != 200
    ]
    assert all(int(r.headers["retry-after"]) >= 1 for r in answers if r.status_code == 429)
    for seed, r in enumerate(answers):
        if r.status_code == 200:
            assert json.loads(r.json()["info"])["all_seeds"] == [seed]


@pytest.mark.slow  # 30 s here: two long jobs, and the newer one again on the single-process server
def test_progress_and_interrupt_reach_the_right_job(on_ray_base, local_base):
    """Two long jobs, one per replica: each task's progress is its own; plain /progress shows the newer one;
    an interrupt naming the older one stops it on its replica with its partial image, and the newer one runs
    to the end and makes the single-process server's image."""
    older, newer = (
        {**ENDLESS, "seed": 1, "force_task_id": "older"},
        {**LONG, "seed": 2, "force_task_id": "newer"},
    )
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, on_ray_base, "/sdapi/v1/txt2img", older)
        wait_until(lambda: (task(on_ray_base, "older")["progress"] or 0) > 0, "the older job's first step")
        second = pool.submit(post, on_ray_base, "/sdapi/v1/txt2img", newer)
        wait_until(lambda: (task(on_ray_base, "newer")["progress"] or 0) > 0, "the newer job's first step")
        state = httpx.get(f"{on_ray_base}/sdapi/v1/progress", timeout=WAIT_S).json()["state"]
        assert state["job"] == "newer" and state["job_count"] == 2
        shown = task(on_ray_base, "older")
        assert shown["active"] and shown["textinfo"].startswith("Step "), shown
        stopped_at = int(shown["textinfo"].split()[1])
        r = httpx.post(f"{on_ray_base}/sdapi/v1/interrupt", params={"id_task": "older"}, timeout=WAIT_S)
        assert r.status_code == 200
        interrupted, finished = first.result(), second.result()
    assert interrupted.status_code == 200, interrupted.text
    images = interrupted.json()["images"]  # the partial image, decoded on its replica
    assert len(images) == 1 and "Seed: 1," in decode_png(images[0]).info["parameters"]
    assert task(on_ray_base, "older")["completed"] and stopped_at < ENDLESS["steps"]
    assert finished.status_code == 200, finished.text
    same_pngs(finished.json()["images"], post(local_base, "/sdapi/v1/txt2img", newer).json()["images"])


def replica_cpu_seconds() -> float:
    """CPU seconds used so far by the replicas' processes (Ray titles them after their deployment)."""
    total = 0.0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if on_ray.REPLICA.encode() in cmdline.read_bytes():
                fields = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except OSError:  # a process gone meanwhile
            continue
    return total


@pytest.mark.slow  # 10 s here
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the replicas' CPU time from /proc")
def test_a_client_that_hangs_up_stops_its_job_on_the_replica(on_ray_base):
    """A client gone mid-run: the ingress cancels the call's stream and the replica stops after its current step:
    its process goes idle (the endless job left running would keep a core busy for minutes)."""
    host, port = on_ray_base.removeprefix("http://").split(":")
    body = json.dumps({**ENDLESS, "seed": 3, "force_task_id": "gone"}).encode()
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as raw:
        raw.sendall(
            b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: (task(on_ray_base, "gone")["progress"] or 0) > 0, "the job's first step")
        busy = replica_cpu_seconds()
        time.sleep(1.0)
        assert replica_cpu_seconds() - busy > 0.5  # the signal: a running job keeps a replica's core busy
    wait_until(lambda: task(on_ray_base, "gone")["completed"], "the ingress to notice the client left")
    time.sleep(1.0)  # the step it was in ends
    idle = replica_cpu_seconds()
    time.sleep(2.0)
    assert replica_cpu_seconds() - idle < 0.5, "a replica kept running the job of a client that left"
    assert post(on_ray_base, "/sdapi/v1/txt2img", BODY).status_code == 200


def replica_actors() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if on_ray.REPLICA in a["name"]]


@pytest.mark.slow  # 25 s here: Serve notices the death and starts a replacement replica
def test_a_replica_killed_mid_run_is_replaced_and_no_request_is_lost(on_ray_base):
    """Both replicas busy, one killed: its job runs again on the other (or answers 503 with Retry-After);
    /health answers while it is replaced, and /ready shows 2 running again."""
    bodies = [{**LONG, "steps": 60, "seed": s, "force_task_id": f"kill-{s}"} for s in (1, 2)]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(post, on_ray_base, "/sdapi/v1/txt2img", b) for b in bodies]
        wait_until(lambda: all(task(on_ray_base, b["force_task_id"])["active"] for b in bodies), "both jobs")
        victim = replica_actors()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        assert httpx.get(f"{on_ray_base}/health", timeout=WAIT_S).status_code == 200
        answers = [f.result() for f in futures]
    for r in answers:
        assert r.status_code == 200 or (r.status_code == 503 and int(r.headers["retry-after"]) >= 1), r.text
    assert any(r.status_code == 200 for r in answers)

    def replicas():
        return httpx.get(f"{on_ray_base}/ready", timeout=WAIT_S).json()["replicas"]

    wait_until(lambda: replicas() == {"RUNNING": 2} and victim not in replica_actors(), "Serve to replace it")
    assert post(on_ray_base, "/sdapi/v1/txt2img", BODY).status_code == 200
