"""`kolors serve --ray`: the same server with its model on Ray Serve replicas.

Two deployments. `Replica` loads the pipeline once (the options of `kolors serve`) and runs one pipeline call at a
time (max_ongoing_requests=1: a call holds its device). `Ingress` is the unchanged FastAPI app of
kolors.serve.app: create_app gets one `RemotePipe` per replica it may have, so its JobQueue keeps the limits,
the key, the 429s and the errors of a single-process server, and each of its workers hands a call to the
replicas through a DeploymentHandle instead of running it. Ray Serve spreads those calls over the replicas and,
with autoscaling, adds replicas while calls wait.

What this does not (yet) carry across the process boundary: per-step progress and previews (a job's progress
moves per call), and stopping a running call between steps (an interrupt or a client gone cancels the handle's
call; the replica finishes its current call).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from kolors.errors import KolorsError
from kolors.request import GenerationRequest
from kolors.serve.jobs import QueueFull
from kolors.serve.schemas import ServerConfig

INSTALL = 'pip install "kolors[ray]"'
APP_NAME = "kolors"
REPLICA = "KolorsReplica"
INGRESS = "KolorsIngress"


def require_serve():
    """The ray and ray.serve modules, or a one-line error saying how to install them."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise KolorsError(
            f"--ray needs Ray Serve, which is not installed ({e.name} is missing); install it with: {INSTALL}"
        ) from None
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

    def info(self) -> dict[str, Any]:
        """What the ingress's app shows of the model."""
        pipe = self.pipe
        return dict(
            name=pipe.name, native_size=pipe.native_size, label=pipe.label, controlnets=list(pipe.controlnets)
        )

    def generate(self, request: GenerationRequest) -> list[tuple[Any, int, GenerationRequest]]:
        """(image, seed, request with its LoRAs' hashes) for each image of one pipeline call, as a local
        worker of kolors.serve.jobs makes them."""
        from kolors.pipeline import generate, lora_hashes

        return [
            (image, seed, lora_hashes(self.pipe, request)) for image, seed in generate(self.pipe, request)
        ]


class RemotePipe:
    """What create_app and its JobQueue need of a pipeline, with the calls going to the replicas."""

    def __init__(self, handle, info: dict[str, Any]):
        self.handle = handle
        self.name, self.native_size, self.label = info["name"], info["native_size"], info["label"]
        self.controlnets = dict.fromkeys(info["controlnets"])

    def set_progress_bar_config(self, disable: bool = False) -> None:
        pass  # the replicas' bars are off

    def preview(self, latents) -> list:
        return []  # no latents cross the process boundary, so /progress never asks for one

    def serve_call(
        self, request: GenerationRequest, callback=None
    ) -> list[tuple[Any, int, GenerationRequest]]:
        """One pipeline call on a replica (kolors.serve.jobs calls this instead of running the pipeline)."""
        try:
            return self.handle.generate.remote(request).result()
        except Exception as e:
            # Ray Serve's max_queued_requests turned the call away: the client's 429, as a full JobQueue's.
            if type(e).__name__ == "BackPressureError":
                raise QueueFull(0, 1) from None
            raise


class Ingress:
    """The FastAPI app of kolors.serve.app over the replicas (wrapped by serve.ingress in `build`)."""

    async def __init__(self, replica, config: ServerConfig, slots: int):
        self.replica, self.config, self.slots = replica, config, slots
        self.info = await replica.info.remote()

    def __serve_build_asgi_app__(self):
        from kolors.serve.app import create_app

        app = create_app([RemotePipe(self.replica, self.info) for _ in range(self.slots)], self.config)
        app.state.replicas = replica_counts
        return app


def replica_counts() -> dict[str, int]:
    """Replicas of the model by state (RUNNING, STARTING, ...), from the Serve controller, for /ready."""
    from ray import serve

    deployment = serve.status().applications[APP_NAME].deployments[REPLICA]
    return {str(getattr(k, "value", k)): v for k, v in deployment.replica_states.items()}


def build(model_options: dict, controlnets: list[tuple[str, str]], config: ServerConfig, scaling: Scaling):
    """The Serve application: the ingress bound to the replica deployment."""
    _, serve = require_serve()
    threads = None if scaling.gpus_per_replica else max(1, int(scaling.cpus_per_replica))
    replica = serve.deployment(Replica, name=REPLICA, **scaling.options(config.queue_size))
    # The ingress is light (HTTP, PNG encoding): one, holding the job queue every request goes through.
    ingress = serve.deployment(
        serve.ingress()(Ingress), name=INGRESS, num_replicas=1, max_ongoing_requests=1000
    )
    return ingress.bind(replica.bind(model_options, controlnets, threads), config, scaling.most)


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
    """Deploy on the cluster at `address` (None: a new local one) and serve until Ctrl-C."""
    config.check()
    scaling.check()
    ray, serve = require_serve()
    check_address(address)
    ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(
        build(model_options, controlnets, config, scaling), name=APP_NAME, route_prefix="/", blocking=False
    )
    shown = f"[{host}]" if ":" in host else host
    print(f"kolors: serving on Ray at http://{shown}:{port}  (web page /, API docs /docs)", flush=True)
    try:
        import time

        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()
