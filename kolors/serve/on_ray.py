"""`kolors serve --ray`: the same server with its model on Ray Serve replicas.

Two deployments. `Replica` loads the pipeline once (the options of `kolors serve`) and runs one pipeline call at a
time (max_ongoing_requests=1: a call holds its device). `Ingress` is the unchanged FastAPI app of
kolors.serve.app: create_app gets one `RemotePipe` per replica it may have, so its JobQueue keeps the limits,
the key, the 429s and the errors of a single-process server, and each of its workers hands a call to the
replicas through a DeploymentHandle instead of running it. Ray Serve spreads those calls over the replicas and,
with autoscaling, adds replicas while calls wait.

A call streams its steps back to the ingress (the latest at most every PROGRESS_S), so /sdapi/v1/progress and
/internal/progress move with previews as on one machine: the ingress's queue holds every job, so it knows which
replica runs which task.
A client gone cancels the stream, which stops the replica after its current step. An A1111 interrupt instead
sets the call's flag in Ray's key-value store (the GCS, which the ingress and every replica reach; a stream
carries nothing back to a replica), which the replica reads at most every STOP_POLL_S: it then stops and decodes the image
as far as it got, so the answer has the running call's partial image, as AUTOMATIC1111's does.

On a Ray it starts, `run` turns on Serve's direct ingress: the ingress answers HTTP on the server's port itself,
and requests skip the hop through Serve's proxy (15-21 ms of the 46-53 ms Ray added a request; BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlparse

from kolors.errors import KolorsError
from kolors.request import GenerationRequest
from kolors.serve.jobs import QueueFull, Unavailable
from kolors.serve.schemas import ServerConfig

log = logging.getLogger("kolors.server")

INSTALL = 'pip install "kolors[ray]"'
OLDEST_RAY = (2, 56)  # serve.ingress() with __serve_build_asgi_app__, which the ingress uses
STOP_POLL_S = 0.2  # how often a replica reads its running call's interrupt flag, at most
PROGRESS_S = 0.25  # how often a replica sends its call's progress, at most (A1111's pages poll every 0.5-1 s)
APP_NAME = "kolors"
REPLICA = "KolorsReplica"
INGRESS = "KolorsIngress"


def require_serve():
    """The ray and ray.serve modules, or a one-line error saying how to install them."""
    try:
        import ray
        import ray.serve as serve
    except ImportError as e:
        raise KolorsError(
            f"--ray needs Ray Serve, which is not installed ({e.name} is missing); install it with: {INSTALL}"
        ) from None
    version = getattr(ray, "__version__", "")
    try:
        too_old = tuple(int(p) for p in version.split(".")[:2]) < OLDEST_RAY
    except ValueError:  # a development build ("3.0.0.dev0" parses; anything else): let it try
        too_old = False
    if too_old:
        oldest = ".".join(map(str, OLDEST_RAY))
        raise KolorsError(f"--ray needs Ray {oldest} or newer, not {version}; upgrade with: {INSTALL} -U")
    return ray, serve


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """A cluster address that does not answer fails now, in one line, instead of after Ray's long retries.
    None and "auto" (the running local instance, or RAY_ADDRESS) are left to Ray."""
    if address in (None, "", "auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise KolorsError(
            f"--ray address {address!r} is not HOST:PORT; give e.g. head:6379 or ray://head:10001, or auto"
        )
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise KolorsError(
            f"no Ray cluster answers at {address} ({e.strerror or type(e).__name__}); start one with "
            "`ray start --head` there, or check the address and that its port is open"
        ) from None


@dataclass(frozen=True)
class Scaling:
    """How many replicas: a fixed number, or Ray Serve's autoscaler between min and max."""

    replicas: int | None = 1  # None: autoscale
    min_replicas: int = 1
    max_replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0

    def check(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise KolorsError(f"--replicas must be at least 1 or auto, not {self.replicas}")
        if self.replicas is None and not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise KolorsError(
                f"--min-replicas {self.min_replicas} and --max-replicas {self.max_replicas}: need "
                "0 <= min <= max and max >= 1"
            )
        if self.gpus_per_replica < 0 or self.cpus_per_replica <= 0:
            raise KolorsError("--gpus-per-replica must be >= 0 (a fraction shares a GPU) and CPUs positive")

    @property
    def most(self) -> int:
        """The most replicas there may be: the calls the ingress keeps in flight at once."""
        return self.replicas if self.replicas is not None else self.max_replicas

    def check_fits(self, resources: dict[str, float]) -> None:
        """Replicas that ask for more than the cluster has would wait for it forever (Serve keeps the application
        deploying, and `serve.run` with it): refused at start, in one line."""
        starting = self.replicas if self.replicas is not None else max(1, self.min_replicas)
        for kind, per in (("GPU", self.gpus_per_replica), ("CPU", self.cpus_per_replica)):
            have = float(resources.get(kind, 0.0))
            if per * starting > have:
                option = f"--{kind.lower()}s-per-replica"
                raise KolorsError(
                    f"{starting} replica(s) of {option} {per:g} need {per * starting:g} {kind}s and the Ray cluster "
                    f"has {have:g}; lower {option} or --replicas, or add nodes (ray start --address) first"
                )

    def options(self, queue_size: int) -> dict[str, Any]:
        """The Replica deployment's options."""
        actor: dict[str, Any] = {"num_cpus": self.cpus_per_replica}
        if self.gpus_per_replica:
            actor["num_gpus"] = self.gpus_per_replica
        scale: dict[str, Any] = (
            {"num_replicas": self.replicas}
            if self.replicas is not None
            else {
                "autoscaling_config": {
                    "min_replicas": self.min_replicas,
                    "max_replicas": self.max_replicas,
                    # one call per replica: another replica as soon as one call waits
                    "target_ongoing_requests": 1,
                }
            }
        )
        return dict(max_ongoing_requests=1, max_queued_requests=queue_size, ray_actor_options=actor, **scale)


class Stops:
    """A1111 interrupts for calls running on replicas, by call key, in Ray's GCS key-value store. The store is
    Ray's internal one (ray.experimental.internal_kv, which Ray Serve keeps its own state in): a key is set
    once per interrupt and read at most every STOP_POLL_S, a round trip to the GCS of about 0.4 ms
    (BENCHMARKS.md)."""

    NAMESPACE = "kolors-interrupts"

    def set(self, key: str) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(key, b"1", namespace=self.NAMESPACE)

    def is_set(self, key: str) -> bool:
        from ray.experimental.internal_kv import _internal_kv_exists

        return bool(_internal_kv_exists(key, namespace=self.NAMESPACE))

    def clear(self, key: str) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(key, namespace=self.NAMESPACE)


class Replica:
    """A Ray Serve replica: the pipeline, loaded once, and one pipeline call at a time."""

    def __init__(self, model_options: dict, controlnets: list[tuple[str, str]], threads: int | None = None):
        import torch

        from kolors.pipeline import KolorsPipeline

        if threads:
            torch.set_num_threads(threads)
        self.pipe = KolorsPipeline.from_pretrained(**model_options)
        for name, path in controlnets:
            self.pipe.load_controlnet(path, name=name)
        self.pipe.set_progress_bar_config(disable=True)
        self.stops = Stops()

    def info(self) -> dict[str, Any]:
        """What the ingress's app shows of the model."""
        pipe = self.pipe
        return dict(
            name=pipe.name,
            native_size=pipe.native_size,
            label=pipe.label,
            controlnets=list(getattr(pipe, "controlnets", {})),
            # which image prompts were loaded at start: the ingress's routes accept or refuse them by this
            ip_adapter=getattr(pipe, "ip_adapter", None) is not None,
            faceid=getattr(pipe, "faceid", None) is not None,
        )

    async def stream(self, request: GenerationRequest, preview_every: int = 1, key: str | None = None):
        """One pipeline call as events: ("step", step, steps, first image's denoised latents or None) for its
        latest step at most every PROGRESS_S, then ("done", generate's list) or ("error", is_kolors_error, one
        line). Ray Serve cancels this generator when the ingress cancels the call (a client gone): the call then
        stops after its current step. An interrupt of the call's `key` (Stops) stops it there too, with its images
        as far as they got."""
        from kolors.pipeline import StopSampling, generate, lora_hashes
        from kolors.serve.jobs import Interrupted

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        put = partial(loop.call_soon_threadsafe, events.put_nowait)

        checked = [time.monotonic()]

        def on_step(step: int, steps: int, latents, denoised) -> None:
            shown = preview_every and (step + 1) % preview_every == 0
            put(("step", step, steps, denoised[:1].cpu() if shown else None))
            if stop.is_set():
                raise Interrupted
            # The flag is a round trip to the GCS: read at most every STOP_POLL_S, not at every fast step
            if key is not None and time.monotonic() - checked[0] >= STOP_POLL_S:
                checked[0] = time.monotonic()
                if self.stops.is_set(key):
                    raise StopSampling

        def work() -> None:
            try:
                made = generate(self.pipe, request, callback=on_step)
                put(("done", [(image, seed, lora_hashes(self.pipe, request)) for image, seed in made]))
            except Interrupted:
                put(("error", False, "interrupted"))
            except Exception as e:  # as data: a raised one reaches the ingress wrapped in Ray's traceback
                text = str(e).strip().splitlines()
                kolors = isinstance(e, KolorsError)
                put(
                    (
                        "error",
                        kolors,
                        text[0] if kolors and text else f"{type(e).__name__}: {text[0] if text else ''}",
                    )
                )

        task = loop.run_in_executor(None, work)
        try:
            # Each event sent costs both ends a few milliseconds of CPU, taken from the steps on a busy machine:
            # a step waits until PROGRESS_S after the last event sent, and is dropped for a newer step or the
            # answer that comes first. A call faster than that sends only its answer; a slower one every step.
            sent, held = loop.time(), None  # held: the latest step not sent yet
            while True:
                wait = None if held is None else max(0.0, sent + PROGRESS_S - loop.time())
                try:
                    event = await asyncio.wait_for(events.get(), wait)
                except TimeoutError:
                    event, held = held, None
                else:
                    while event[0] == "step" and not events.empty():  # a slow reader gets the latest only
                        event = events.get_nowait()
                    if event[0] == "step" and loop.time() - sent < PROGRESS_S:
                        held = event
                        continue
                sent = loop.time()
                yield event
                if event[0] != "step":
                    return
        finally:
            stop.set()
            await task  # the replica takes its next call only once this one let go of the device

    def preview(self, latents) -> list:
        """The pipeline's cheap preview of latents a stream sent (for /sdapi/v1/progress)."""
        return self.pipe.preview(latents)


class RemotePipe:
    """What create_app and its JobQueue need of a pipeline, with the calls going to the replicas."""

    def __init__(self, handle, info: dict[str, Any], preview_every: int = 1, stops: Stops | None = None):
        self.handle, self.preview_every, self.stops = handle, preview_every, stops or Stops()
        self.name, self.native_size, self.label = info["name"], info["native_size"], info["label"]
        self.controlnets = dict.fromkeys(info["controlnets"])
        # create_app asks `pipe.ip_adapter is not None`: a marker stands for the replicas' loaded adapter
        self.ip_adapter = "on the replicas" if info.get("ip_adapter") else None
        self.faceid = "on the replicas" if info.get("faceid") else None

    def set_progress_bar_config(self, disable: bool = False) -> None:
        pass  # the replicas' bars are off

    def preview(self, latents) -> list:
        return self.handle.preview.remote(latents).result()  # called from a thread, never the event loop

    def serve_call(
        self, request: GenerationRequest, callback=None
    ) -> list[tuple[Any, int, GenerationRequest]]:
        """One pipeline call on a replica (kolors.serve.jobs calls this instead of running the pipeline):
        its steps reach `callback` as a local call's do, and what `callback` raises to stop it cancels it.
        A replica that dies during the call (killed, its node lost) costs one retry on another one, which Ray
        Serve starts in its place."""
        try:
            return self._call(request, callback)
        except Exception as e:
            if not _replica_died(e):
                raise
            log.warning("a replica stopped during a call (%s); running it again on another", type(e).__name__)
        try:
            return self._call(request, callback)
        except Exception as e:
            if not _replica_died(e):
                raise
            raise Unavailable(f"the replicas stopped during the call twice ({type(e).__name__})") from None

    def _call(self, request: GenerationRequest, callback) -> list[tuple[Any, int, GenerationRequest]]:
        from kolors.pipeline import StopSampling
        from kolors.serve.jobs import Interrupted

        key, events, stopping = uuid.uuid4().hex, None, False
        try:  # Ray Serve raises BackPressureError from remote() or from the first event
            events = self.handle.options(stream=True).stream.remote(request, self.preview_every, key)
            for event in events:
                if event[0] == "step":
                    if callback is not None and not stopping:
                        try:
                            callback(event[1], event[2], None, event[3])
                        except StopSampling:  # an A1111 interrupt: the replica answers what it has
                            stopping = True
                            self.stops.set(key)
                elif event[0] == "done":
                    return event[1]
                else:
                    _, kolors, text = event
                    raise KolorsError(text) if kolors else RemoteError(text)
        except Interrupted:
            events.cancel()  # set: only an event's callback raises it
            raise
        except Exception as e:
            # Ray Serve's max_queued_requests turned the call away: the client's 429, as a full JobQueue's.
            if type(e).__name__ == "BackPressureError":
                raise QueueFull(0, 1) from None
            raise
        finally:
            if stopping:
                self.stops.clear(key)
        raise RemoteError("the replica's call ended without an answer")


def _replica_died(e: Exception) -> bool:
    """Ray's errors for an actor gone (by name: the ingress imports no Ray module it need not)."""
    return any(c.__name__ in ("RayActorError", "ActorUnavailableError") for c in type(e).__mro__)


class RemoteError(Exception):
    """A replica's call failed for a reason that is not the request's (its log has the traceback)."""


class Ingress:
    """The FastAPI app of kolors.serve.app over the replicas (wrapped by serve.ingress in `build`)."""

    async def __init__(self, replica, config: ServerConfig, slots: int):
        self.replica, self.config, self.slots = replica, config, slots
        self.info = await replica.info.remote()

    def __serve_build_asgi_app__(self):
        from kolors.serve.app import create_app

        pipes = [RemotePipe(self.replica, self.info, self.config.preview_every) for _ in range(self.slots)]
        from ray import serve

        app = create_app(pipes, self.config)
        # the application's own name: a RayService or a benchmark may deploy it under another than "kolors"
        app.state.replicas = partial(replica_counts, serve.get_replica_context().app_name)
        return app


def replica_counts(app_name: str = APP_NAME) -> dict[str, int]:
    """Replicas of the model by state (RUNNING, STARTING, ...), from the Serve controller, for /ready."""
    from ray import serve

    try:
        deployment = serve.status().applications[app_name].deployments[REPLICA]
    except Exception:  # the controller unreachable or the app gone: not ready, which /ready answers 503
        return {}
    return {str(getattr(k, "value", k)): v for k, v in deployment.replica_states.items()}


def build(model_options: dict, controlnets: list[tuple[str, str]], config: ServerConfig, scaling: Scaling):
    """The Serve application: the ingress bound to the replica deployment."""
    _, serve = require_serve()
    threads = None if scaling.gpus_per_replica else max(1, int(scaling.cpus_per_replica))
    replica = serve.deployment(Replica, name=REPLICA, **scaling.options(config.queue_size))
    # The ingress is light (HTTP, PNG encoding): one, holding the job queue every request goes through. It
    # reserves no CPU (Serve's default is 1), which would be one a replica cannot have: 2 replicas of 1 CPU
    # would never start on a 2-CPU machine.
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name=INGRESS,
        num_replicas=1,
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replica.bind(model_options, controlnets, threads), config, scaling.most)


def app(args: dict[str, Any]):
    """The Serve application from plain options, for `serve run kolors.serve.on_ray:app model=DIR replicas=2`
    and KubeRay's RayService (serveConfigV2's import_path and args). Keys: model, dtype, device, variant,
    replicas (N or auto), min_replicas, max_replicas, gpus_per_replica, cpus_per_replica, and ServerConfig's
    fields (queue_size, api_key, lora_dir, max_width, ...); values may be strings, as `serve run` passes them."""
    import dataclasses

    args = dict(args)
    model_options = {k: str(args.pop(k)) for k in ("model", "dtype", "device", "variant") if k in args}
    if "model" not in model_options:
        raise KolorsError(
            "the Ray Serve app needs model: the Kolors-diffusers folder (on every node) or repo id"
        )
    replicas = str(args.pop("replicas", "1"))
    try:
        fixed = None if replicas == "auto" else int(replicas)
        scaling = Scaling(
            replicas=fixed,
            min_replicas=int(args.pop("min_replicas", 1)),
            max_replicas=int(args.pop("max_replicas", fixed or 4)),
            gpus_per_replica=float(args.pop("gpus_per_replica", 0.0)),
            cpus_per_replica=float(args.pop("cpus_per_replica", 1.0)),
        )
    except ValueError as e:
        raise KolorsError(f"the Ray Serve app's replica options: {e}") from None
    fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    values = {}
    for key, value in args.items():
        if key not in fields:
            raise KolorsError(
                f"the Ray Serve app has no option {key!r}; it takes {', '.join(sorted(fields))}"
            )
        default = fields[key].default
        if isinstance(value, str) and isinstance(default, tuple):
            value = tuple(v for v in value.split(",") if v)
        elif isinstance(value, str) and isinstance(default, (int, float)):
            try:
                value = type(default)(value)
            except ValueError:
                raise KolorsError(f"the Ray Serve app's {key} must be a number, not {value!r}") from None
        values[key] = value
    config = ServerConfig(**values)
    config.check()
    scaling.check()
    return build(model_options, [], config, scaling)


def deploy_failure(message: str) -> str:
    """The one line that says why, from Serve's DEPLOY_FAILED message (which carries the replica's traceback):
    our own error's text when the replica raised one, else the traceback's last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        if "KolorsError: " in line:
            return line.split("KolorsError: ", 1)[1]
    return lines[-1] if lines else "no reason given"


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve's settings for a Ray that `kolors serve --ray` starts itself: the ingress replica serves HTTP on
    `port` itself (Serve's direct ingress, Ray 2.56+) instead of behind Serve's proxy, which costs every request
    a hop through one more process (about 10 ms on a 2-core machine, and a second round trip for its body; see
    BENCHMARKS.md). Serve reads them from the environment of its processes when they start; a local Ray's
    processes inherit this one's."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        # the range the ingress replica's port is taken from: exactly --port (the end is exclusive)
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
        # how long a stopping ingress keeps answering for a load balancer to notice (30 s): none in front here
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        # how long a released port stays out of the range (150 s, for HAProxy's workers to forget it): a
        # restarted ingress needs its one port back at once
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


@contextmanager
def environ(settings: dict[str, str]):
    """`settings` in os.environ while the block runs, then as before."""
    before = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run(
    model_options: dict,
    controlnets: list[tuple[str, str]],
    config: ServerConfig,
    scaling: Scaling,
    *,
    address: str | None,
    host: str = "127.0.0.1",
    port: int = 7860,
) -> None:
    """Deploy on the cluster at `address` (None: a new local one) and serve until Ctrl-C. On a new local Ray the
    ingress answers on `port` itself (direct_ingress_env) unless RAY_SERVE_ENABLE_DIRECT_INGRESS=0 is set; on a
    cluster, Serve's proxy does, as its nodes' `ray start` environment decides."""
    config.check()
    scaling.check()
    ray, serve = require_serve()
    check_address(address)
    settings, proxy_port = {}, port
    if address is None and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1") != "0":
        settings = direct_ingress_env(port)
        proxy_port = free_port(host)  # Serve still starts its proxy on the head: out of the ingress's way
    with environ(settings):  # the local Ray's processes start here, with them; this process keeps its own
        ray.init(address=address)
    try:
        scaling.check_fits(ray.cluster_resources())
        serve.start(http_options={"host": host, "port": proxy_port})
        serve.run(
            build(model_options, controlnets, config, scaling),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
        )
    except (
        RuntimeError
    ) as e:  # Serve gave up on the replicas: each failed to start (e.g. a bad path on its node)
        serve.shutdown()
        ray.shutdown()
        raise KolorsError(f"the replicas could not start: {deploy_failure(str(e))}") from None
    except KolorsError:
        ray.shutdown()
        raise
    shown = f"[{host}]" if ":" in host else host
    print(f"kolors: serving on Ray at http://{shown}:{port}  (web page /, API docs /docs)", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()
