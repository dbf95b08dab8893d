"""`kolors serve --ray`: the ingress's app over replicas, with the Replica class running in this process behind a
stand-in DeploymentHandle (no Ray needed), and the CLI's checks. tests/test_serve_ray_live.py deploys on a
real local Ray Serve."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from kolors import KolorsPipeline  # noqa: E402
from kolors.cli import main  # noqa: E402
from kolors.errors import KolorsError  # noqa: E402
from kolors.serve import ServerConfig, create_app  # noqa: E402
from kolors.serve.on_ray import RemotePipe, Replica, Scaling, check_address  # noqa: E402
from tests.server_helpers import GatedPipe, decode_png, live_server, wait_until  # noqa: E402

BASE = "http://127.0.0.1:7860"
LIMITS = dict(max_steps=4, max_width=128, max_height=128, max_n=4)
BODY = {"prompt": "一只瓢虫, macro photo", "steps": 2, "width": 48, "height": 32, "seed": 5}


class Response:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class Stream:
    """A DeploymentResponseGenerator stand-in: drives the replica's async generator on a loop of its own,
    and cancel() injects CancelledError into it as Ray Serve does."""

    def __init__(self, agen):
        self.agen, self.loop, self.cancelled = agen, asyncio.new_event_loop(), False

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return self.loop.run_until_complete(self.agen.__anext__())
        except StopAsyncIteration:
            self.loop.close()
            raise StopIteration from None

    def cancel(self):
        self.cancelled = True
        try:
            self.loop.run_until_complete(self.agen.athrow(asyncio.CancelledError()))
        except (StopAsyncIteration, asyncio.CancelledError):
            pass
        self.loop.close()


class LocalHandle:
    """A DeploymentHandle stand-in: handle.options(stream=...).METHOD.remote(...) calls the Replica here."""

    def __init__(self, replica):
        self.replica, self.streams = replica, []

    def options(self, stream: bool = False):
        return self

    def __getattr__(self, name):
        method = getattr(self.replica, name)
        return types.SimpleNamespace(remote=lambda *args: self._call(method, *args))

    def _call(self, method, *args):
        value = method(*args)
        if inspect.isasyncgen(value):
            self.streams.append(Stream(value))
            return self.streams[-1]
        return Response(value)


class LocalStops:
    """kolors.serve.on_ray.Stops without Ray: the flags in a set this process shares."""

    def __init__(self):
        self.keys: set[str] = set()

    def set(self, key):
        self.keys.add(key)

    def is_set(self, key):
        return key in self.keys

    def clear(self, key):
        self.keys.discard(key)


STOPS = LocalStops()


def remote_pipe(handle, info):
    return RemotePipe(handle, info, stops=STOPS)


def held_replica(pipe):
    """A Replica over `pipe` (a GatedPipe, a Failing one) without loading one."""
    held = Replica.__new__(Replica)
    held.pipe, held.stops = pipe, STOPS
    return held


class BackPressureError(Exception):
    """Named as Ray Serve's, which is all RemotePipe looks at."""


@pytest.fixture(scope="module")
def replica(tiny_model_dir):
    replica = Replica(dict(model=str(tiny_model_dir), dtype=torch.float32, device="cpu"), [], threads=None)
    replica.stops = STOPS
    return replica


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")


def remote_app(replica, slots=2, **config):
    info = replica.info()
    return create_app([remote_pipe(LocalHandle(replica), info) for _ in range(slots)], ServerConfig(**config))


def info(answer: dict) -> dict:
    """An A1111 answer's info without its clock time."""
    return {k: v for k, v in json.loads(answer["info"]).items() if k != "job_timestamp"}


def txt2img(client, **body):
    r = client.post("/sdapi/v1/txt2img", json={**BODY, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_replicas_answer_as_the_single_process_server(replica, pipe):
    with TestClient(create_app(pipe, ServerConfig(**LIMITS)), base_url=BASE) as local:
        expected = txt2img(local, batch_size=2)
    with TestClient(remote_app(replica, **LIMITS), base_url=BASE) as remote:
        got = txt2img(remote, batch_size=2)
        r = remote.post("/v1/images/generations", json={"prompt": "a cat", "size": "48x32", "steps": 2})
        assert r.status_code == 200, r.text
        assert remote.get("/sdapi/v1/sd-models").json()[0]["model_name"] == pipe.name
    assert info(got) == info(expected)
    for a, b in zip(got["images"], expected["images"], strict=True):
        assert (np.asarray(decode_png(a)) == np.asarray(decode_png(b))).all()
        assert decode_png(a).info["parameters"] == decode_png(b).info["parameters"]


def test_a_full_queue_answers_429_with_retry_after(replica):
    held = held_replica(gated := GatedPipe(replica.pipe, hold_at=0))
    app = remote_app(held, slots=1, queue_size=1, **LIMITS)
    with live_server(app) as base:
        with ThreadPoolExecutor(6) as pool:
            post = lambda i: httpx.post(f"{base}/sdapi/v1/txt2img", json={**BODY, "seed": i}, timeout=120)  # noqa: E731
            futures = [pool.submit(post, i) for i in range(6)]
            try:
                queue = app.state.queue
                wait_until(lambda: queue.submitted + queue.rejected == 6, "all 6 requests to arrive")
            finally:
                gated.release.set()
            answers = [f.result() for f in futures]
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) == queue.submitted and 1 <= codes.count(200) <= 2
    assert codes.count(429) == 6 - codes.count(200)
    assert all(int(r.headers["retry-after"]) >= 1 for r in answers if r.status_code == 429)


def test_ray_serve_back_pressure_is_a_429(replica):
    remote = remote_pipe(LocalHandle(replica), replica.info())

    def refuse(request, preview_every, key):
        raise BackPressureError("max_queued_requests reached")

    remote.handle = LocalHandle(types.SimpleNamespace(stream=refuse))
    app = create_app([remote], ServerConfig(**LIMITS))
    with TestClient(app, base_url=BASE) as client:
        r = client.post("/sdapi/v1/txt2img", json=BODY)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text


def test_progress_moves_per_step_and_an_interrupt_stops_the_replica(replica):
    """Held at the second call's second step: /progress and /internal/progress show it with a preview; an
    interrupt naming its task sets its flag, the replica stops at its next step and answers the image as far
    as it got, so the answer has the first call's image and the second's partial one, as A1111's has."""
    held = held_replica(gated := GatedPipe(replica.pipe, hold_at=4))  # 3 steps a call
    handle = LocalHandle(held)
    app = create_app([remote_pipe(handle, replica.info())], ServerConfig(**LIMITS))
    with live_server(app) as base:
        with ThreadPoolExecutor(1) as pool:
            body = {**BODY, "n_iter": 2, "steps": 3, "force_task_id": "task(x)"}
            answer = pool.submit(httpx.post, f"{base}/sdapi/v1/txt2img", json=body, timeout=120)
            try:
                wait_until(gated.holding.is_set, "the second call's second step")
                running = app.state.queue.running
                wait_until(
                    lambda: running() and (running()[0].call, running()[0].step) == (1, 1), "its event"
                )
                shown = httpx.get(f"{base}/sdapi/v1/progress", timeout=60).json()
                assert (shown["state"]["job_no"], shown["state"]["sampling_step"]) == (1, 1)
                assert shown["progress"] == pytest.approx((1 + 1 / 3) / 2, abs=1e-4)
                w, h = decode_png(shown["current_image"]).size  # the latents' preview, from the replica
                assert w * 32 == h * 48
                task = httpx.post(f"{base}/internal/progress", json={"id_task": "task(x)"}, timeout=60).json()
                assert task["active"] and task["progress"] == shown["progress"] and task["live_preview"]
                interrupt = httpx.post(
                    f"{base}/sdapi/v1/interrupt", params={"id_task": "task(x)"}, timeout=60
                )
                assert interrupt.status_code == 200
            finally:
                gated.release.set()
            r = answer.result()
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2 and json.loads(r.json()["info"])["all_seeds"] == [5, 6]
    assert not handle.streams[-1].cancelled and not STOPS.keys  # the replica answered; the flag is gone


class Failing:
    """The pipeline, except that a call raises `error`."""

    def __init__(self, pipe, error):
        self._pipe, self.error = pipe, error

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize(
    "error, status, text",
    [
        (
            KolorsError("the mask is empty; paint the area to change"),
            422,
            "the mask is empty; paint the area",
        ),
        (RuntimeError("boom\nsecond line"), 500, "generation failed (RemoteError)"),
    ],
)
def test_a_replica_error_answers_one_line(replica, error, status, text):
    held = held_replica(Failing(replica.pipe, error))
    app = create_app([remote_pipe(LocalHandle(held), replica.info())], ServerConfig(**LIMITS))
    with TestClient(app, base_url=BASE) as client:
        r = client.post("/sdapi/v1/txt2img", json=BODY)
    assert r.status_code == status and text in r.text and "Traceback" not in r.text, r.text


class RayActorError(Exception):
    """Named as Ray's, which is all RemotePipe looks at."""


class ActorDiedError(RayActorError):
    pass


@pytest.mark.parametrize("deaths, status", [(1, 200), (2, 503)])
def test_a_replica_that_dies_during_a_call_costs_one_retry(replica, deaths, status):
    calls = []

    def dying(request, preview_every, key):
        calls.append(request)
        if len(calls) <= deaths:
            raise ActorDiedError("The actor died unexpectedly before finishing this task.")
        return replica.stream(request, preview_every, key)

    handle = LocalHandle(types.SimpleNamespace(stream=dying))
    app = create_app([remote_pipe(handle, replica.info())], ServerConfig(**LIMITS))
    with TestClient(app, base_url=BASE) as client:
        r = client.post("/sdapi/v1/txt2img", json=BODY)
    assert r.status_code == status and len(calls) == 2, r.text
    if status == 200:
        assert json.loads(r.json()["info"])["all_seeds"] == [5]
    else:
        assert "the replicas stopped during the call twice" in r.text and int(r.headers["retry-after"]) >= 1


def test_ready_shows_the_replicas(replica):
    app = remote_app(replica, **LIMITS)
    with TestClient(app, base_url=BASE) as client:
        app.state.replicas = lambda: {"RUNNING": 2}
        r = client.get("/ready")
        assert r.status_code == 200 and r.json()["replicas"] == {"RUNNING": 2} and r.json()["ready"]
        app.state.replicas = lambda: {"STARTING": 2}
        r = client.get("/ready")
        assert r.status_code == 503 and not r.json()["ready"]


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture
def fake_serve(monkeypatch):
    """ray.serve importable, so the CLI gets past require_serve without Ray Serve installed."""
    ray = types.ModuleType("ray")
    ray.__version__ = "2.60.0"
    ray.serve = types.ModuleType("ray.serve")
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.serve", ray.serve)


def test_missing_ray_serve_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray.serve", None)  # import ray.serve now raises ImportError
    assert main(["serve", "--model", str(tmp_path), "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kolors: error: --ray needs Ray Serve, which is not installed")
    assert err.endswith('install it with: pip install "kolors[ray]"')


def test_a_ray_too_old_for_the_ingress_says_how_to_upgrade(tmp_path, fake_serve, monkeypatch, capsys):
    monkeypatch.setattr(sys.modules["ray"], "__version__", "2.55.1")
    assert main(["serve", "--model", str(tmp_path), "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == 'kolors: error: --ray needs Ray 2.56 or newer, not 2.55.1; upgrade with: pip install "kolors[ray]" -U'
    )


def test_an_address_nobody_answers_exits_2_quickly(tmp_path, fake_serve, capsys):
    start = time.monotonic()
    assert main(["serve", "--model", str(tmp_path), "--ray", "127.0.0.1:1"]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert err.startswith("kolors: error: no Ray cluster answers at 127.0.0.1:1") and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ray", "head"], "--ray address 'head' is not HOST:PORT"),
        (["--ray", "--replicas", "two"], "--replicas must be a whole number or auto, not 'two'"),
        (["--ray", "--replicas", "0"], "--replicas must be at least 1 or auto"),
        (
            ["--ray", "--replicas", "auto", "--min-replicas", "3", "--max-replicas", "2"],
            "need 0 <= min <= max",
        ),
        (["--ray", "--gpus-per-replica", "-1"], "--gpus-per-replica must be >= 0"),
    ],
)
def test_bad_ray_options_exit_2_naming_them(tmp_path, fake_serve, capsys, args, message):
    assert main(["serve", "--model", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        ({}, "needs model"),
        ({"model": "m", "queue": "3"}, "has no option 'queue'; it takes allowed_hosts, api_key"),
        ({"model": "m", "queue_size": "many"}, "queue_size must be a number, not 'many'"),
        ({"model": "m", "replicas": "two"}, "replica options"),
        ({"model": "m", "queue_size": "0"}, "queue-size must be at least 1"),
    ],
)
def test_the_serve_app_builder_names_a_bad_option(args, message):
    from kolors.serve.on_ray import app

    with pytest.raises(KolorsError, match=message):
        app(args)


def test_the_readme_rayservice_manifest_builds_the_app(tiny_model_dir):
    """README's KubeRay RayService example (not run here: no Kubernetes) names the app this module exports and
    passes it options it takes, as YAML types: its serveConfigV2 builds the application, with the model folder
    swapped for the tiny one and the GPU replicas' options kept."""
    yaml = pytest.importorskip("yaml")
    from kolors.serve import on_ray

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "kind: RayService" in b)
    manifest = yaml.safe_load(block)
    (application,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    module, _, name = application["import_path"].partition(":")
    assert (module, name) == ("kolors.serve.on_ray", "app")
    built = on_ray.app({**application["args"], "model": str(tiny_model_dir)})
    assert built is not None


def test_the_cli_hands_ray_absolute_paths_and_its_options(tiny_model_dir, fake_serve, monkeypatch, tmp_path):
    from kolors.serve import on_ray

    seen = {}
    monkeypatch.setattr(on_ray, "run", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    monkeypatch.chdir(tiny_model_dir.parent)
    (tmp_path / "loras").mkdir()
    argv = ["serve", "--model", tiny_model_dir.name, "--ray", "--replicas", "auto", "--max-replicas", "3"]
    argv += [
        "--gpus-per-replica",
        "0.5",
        "--queue-size",
        "5",
        "--lora-dir",
        os.path.relpath(tmp_path / "loras"),
    ]
    assert main(argv) == 0
    model_options, controlnets, config, scaling = seen["args"]
    assert model_options["model"] == str(Path(tiny_model_dir).resolve())
    assert config.lora_dir == str((tmp_path / "loras").resolve()) and config.queue_size == 5
    assert scaling == Scaling(replicas=None, min_replicas=1, max_replicas=3, gpus_per_replica=0.5)
    assert seen["kwargs"]["address"] is None and controlnets == []


def test_scaling_becomes_deployment_options():
    assert Scaling(replicas=None, min_replicas=1, max_replicas=3, gpus_per_replica=0.5).options(8) == dict(
        max_ongoing_requests=1,
        max_queued_requests=8,
        ray_actor_options={"num_cpus": 1.0, "num_gpus": 0.5},
        autoscaling_config={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1},
    )
    fixed = Scaling(replicas=2, max_replicas=2)
    assert fixed.options(4)["num_replicas"] == 2 and fixed.most == 2
    check_address("auto")  # left to Ray


def test_the_ingress_knows_which_image_prompts_the_replicas_loaded(replica):
    """Image prompts are loaded on the replicas, and the ingress's routes accept or refuse them by what those
    loaded: it learns it from their info."""
    loaded = types.SimpleNamespace(
        name=replica.pipe.name,
        native_size=replica.pipe.native_size,
        label=replica.pipe.label,
        controlnets={},
        ip_adapter=object(),
        faceid=None,
    )
    with TestClient(remote_app(held_replica(loaded), **LIMITS), base_url=BASE) as client:
        assert client.get("/controlnet/image_prompts").json() == {"ip_adapter": True, "faceid": False}
    with TestClient(remote_app(replica, **LIMITS), base_url=BASE) as client:
        assert client.get("/controlnet/image_prompts").json() == {"ip_adapter": False, "faceid": False}
        r = client.post("/v1/images/generations", json={"prompt": "a cat", "ip_adapter_image": "AAAA"})
        assert r.status_code == 400 and "ip_adapter_image" in r.text


class FakeCluster:
    """Just enough of ray and ray.serve for on_ray.run: a cluster of `resources`, and a serve.run that fails
    as Serve's does when every replica failed to start (`failure`), or succeeds."""

    def __init__(self, resources, failure=None):
        self.resources, self.failure, self.calls = resources, failure, []
        self.ray = types.SimpleNamespace(
            init=lambda address=None: self.calls.append("init"),
            cluster_resources=lambda: self.resources,
            shutdown=lambda: self.calls.append("ray.shutdown"),
        )
        self.serve = types.SimpleNamespace(
            start=lambda **kwargs: self.calls.append("start"),
            run=self.run,
            shutdown=lambda: self.calls.append("serve.shutdown"),
        )

    def run(self, *args, **kwargs):
        self.calls.append("run")
        if self.failure:
            raise RuntimeError(self.failure)
        raise KeyboardInterrupt  # deployed: stop before serving forever


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--gpus-per-replica", "1"],
            "1 replica(s) of --gpus-per-replica 1 need 1 GPUs and the Ray cluster has 0; lower --gpus-per-replica"
            " or --replicas, or add nodes (ray start --address) first",
        ),
        (["--replicas", "3"], "3 replica(s) of --cpus-per-replica 1 need 3 CPUs and the Ray cluster has 2"),
    ],
)
def test_replicas_the_cluster_cannot_hold_are_refused_at_start(
    tiny_model_dir, monkeypatch, capsys, argv, message
):
    from kolors.serve import on_ray

    cluster = FakeCluster({"CPU": 2.0})
    monkeypatch.setattr(on_ray, "require_serve", lambda: (cluster.ray, cluster.serve))
    monkeypatch.setattr(on_ray, "build", lambda *args: "app")
    assert main(["serve", "--model", str(tiny_model_dir), "--ray", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kolors: error: {message}") and err.count("\n") == 1, err
    assert cluster.calls == ["init", "ray.shutdown"]  # nothing deployed, the local Ray stopped again


def test_replicas_that_fail_to_load_are_one_line_at_start(tiny_model_dir, monkeypatch, capsys):
    """Serve's DEPLOY_FAILED message carries each replica's traceback; the user gets our error's text."""
    from kolors.serve import on_ray

    failure = (
        "Deploying application kolors failed: Failed to update the deployments ['KolorsReplica'].\n"
        "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor.\n"
        "Traceback (most recent call last):\n"
        '  File "/x/kolors/pipeline.py", line 260, in from_pretrained\n'
        "kolors.errors.KolorsError: model folder /data/kolors not found: /data/kolors; pass a Kolors-diffusers "
        "folder or a hub repo id\n"
    )
    cluster = FakeCluster({"CPU": 2.0}, failure=failure)
    monkeypatch.setattr(on_ray, "require_serve", lambda: (cluster.ray, cluster.serve))
    monkeypatch.setattr(on_ray, "build", lambda *args: "app")
    assert main(["serve", "--model", str(tiny_model_dir), "--ray"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "kolors: error: the replicas could not start: model folder /data/kolors not found: /data/kolors; pass a "
        "Kolors-diffusers folder or a hub repo id\n"
    )
    assert cluster.calls == ["init", "start", "run", "serve.shutdown", "ray.shutdown"]
    assert on_ray.deploy_failure("Deploying application kolors failed: out of memory") == (
        "Deploying application kolors failed: out of memory"
    )


@pytest.mark.parametrize("address", [None, "auto"])
def test_a_local_ray_serves_on_the_ingress_port_without_the_proxy_hop(tiny_model_dir, monkeypatch, address):
    """A Ray that `kolors serve --ray` starts gets Serve's direct ingress on --port (its processes inherit the
    settings from ray.init's environment; this process keeps its own), Serve's proxy a port out of its way; a
    cluster's own settings are left to its nodes."""
    from kolors.serve import on_ray

    cluster, seen = FakeCluster({"CPU": 2.0}), {}
    cluster.ray.init = lambda address=None: seen.update(
        {k: v for k, v in os.environ.items() if k in on_ray.direct_ingress_env(7861)}
    )
    cluster.serve.start = lambda http_options: seen.update(proxy=http_options["port"])
    monkeypatch.setattr(on_ray, "require_serve", lambda: (cluster.ray, cluster.serve))
    monkeypatch.setattr(on_ray, "check_address", lambda address: None)
    monkeypatch.setattr(on_ray, "build", lambda *args: "app")
    monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
    config, scaling, before = ServerConfig(**LIMITS), Scaling(), dict(os.environ)
    with pytest.raises(KeyboardInterrupt):  # FakeCluster's serve.run: deployed
        on_ray.run({"model": str(tiny_model_dir)}, [], config, scaling, address=address, port=7861)
    assert dict(os.environ) == before
    if address is None:
        assert seen.pop("proxy") != 7861
        assert seen == {
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "7861",
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "7862",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
        }
    else:
        assert seen == {"proxy": 7861}
