"""`kolors serve --ray` against the single-process server: images per minute with 1 and 2 Ray Serve replicas,
and the time Ray adds to one request.

    python bench/bench_serve.py --model /tmp/kolors-tiny --steps 2 --size 64 --requests 16 --repeats 3
    python bench/bench_serve.py --model /tmp/kolors-mid --steps 4 --size 256 --requests 8 --repeats 2

Every server runs its pipeline at one torch thread (a Ray replica of one CPU gets one), in float32 on the CPU.
The single-process server runs in this process beside the Ray application on a local Ray instance, deployed
with 1 replica, then redeployed with 2; in each phase the rounds alternate between the single-process server
and the Ray app (then the other way round) so that a noisy machine slows both alike. A round sends
`--requests` A1111 txt2img requests, `--concurrency` at a time, and times them to the last answer: images per
minute, the median and spread (min-max) over the rounds. The overhead is the median latency of one request at
a time on 1 replica minus the single-process server's, over `--overhead-requests` requests alternating between
the two (the image work is the same: same model, size, steps and thread count). The Ray app is reached on the
ingress's own port (Serve's direct ingress, as `kolors serve --ray` sets up the local Ray it starts), or with
`--via-proxy` through Serve's proxy, the way on a cluster. Needs ray[serve]; this
process and the replicas hold the model up to three times: run a mid-size model under the machine's heavy-run
lock.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as `python bench/bench_serve.py`: the repo root, for kolors and tests
    sys.path.insert(0, str(ROOT))

TIMEOUT = 1800.0


def body(args, seed: int) -> dict:
    return {
        "prompt": "一只瓢虫, macro photo",
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
        "seed": seed,
    }


def one(base: str, args, seed: int) -> float:
    """Seconds from sending one txt2img request to its answer."""
    start = time.perf_counter()
    r = httpx.post(f"{base}/sdapi/v1/txt2img", json=body(args, seed), timeout=TIMEOUT)
    took = time.perf_counter() - start
    if r.status_code != 200:
        raise SystemExit(f"error: {base} answered {r.status_code}: {r.text[:300]}")
    return took


def images_per_minute(base: str, args) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(lambda s: one(base, args, s), range(args.requests)))
    return args.requests * 60 / (time.perf_counter() - start)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f}  ({min(values):.1f}-{max(values):.1f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Kolors-diffusers folder (bench/fake_weights.py)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--requests", type=int, default=16, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per server")
    parser.add_argument("--replicas", default="1,2", help="the replica counts to deploy")
    parser.add_argument("--overhead-requests", type=int, default=20)
    parser.add_argument(
        "--via-proxy",
        action="store_true",
        help="through Serve's proxy (as on a cluster) instead of the ingress's own port (a local `kolors serve "
        "--ray`)",
    )
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from kolors import KolorsPipeline
    from kolors.serve import ServerConfig, create_app, on_ray
    from tests.server_helpers import live_server

    torch.set_num_threads(1)
    limits = dict(max_steps=max(50, args.steps), max_width=args.size, max_height=args.size, queue_size=256)
    counts = [int(n) for n in args.replicas.split(",")]
    print(
        f"model {args.model}: {args.steps} steps at {args.size}x{args.size}, float32, 1 torch thread per server"
    )
    print(
        f"{os.cpu_count()} CPUs; {args.requests} requests a round, {args.concurrency} at a time, {args.repeats} rounds"
    )
    print("ray: through Serve's proxy" if args.via_proxy else "ray: the ingress's own port (direct ingress)")
    port = on_ray.free_port("127.0.0.1")
    if not args.via_proxy:  # as `kolors serve --ray` sets up the local Ray it starts
        direct_port = port
        os.environ.update(on_ray.direct_ingress_env(direct_port))
        port = on_ray.free_port("127.0.0.1")
    ray.init(
        num_cpus=max(counts),  # logical: one per replica (the ingress reserves none); the machine has 2
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        },
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        ray_base = f"http://127.0.0.1:{port if args.via_proxy else direct_port}"
        pipe = KolorsPipeline.from_pretrained(args.model, dtype=torch.float32, device="cpu")
        rates: dict[str, list[float]] = {"single process": []}
        latency: dict[str, list[float]] = {"local": [], "ray": []}
        with live_server(create_app(pipe, ServerConfig(**limits))) as local:
            for n in counts:  # one app at a time, redeployed with n replicas
                options = dict(
                    model=args.model, dtype="float32", device="cpu", replicas=str(n), cpus_per_replica="1"
                )
                serve.run(
                    on_ray.app({**options, **{k: str(v) for k, v in limits.items()}}), name=on_ray.APP_NAME
                )
                name = f"ray, {n} replica{'s' if n > 1 else ''}"
                sides = {"single process": local, name: ray_base}
                rates[name] = []
                for base in sides.values():  # warm-up: every replica loaded, first-call costs paid
                    with ThreadPoolExecutor(n) as pool:
                        list(pool.map(lambda s, b=base: one(b, args, s), range(n)))
                for r in range(args.repeats):
                    for side in list(sides) if r % 2 == 0 else list(reversed(sides)):
                        rates[side].append(images_per_minute(sides[side], args))
                        print(
                            f"  {name} phase, round {r + 1}: {side}: {rates[side][-1]:.1f} images/min",
                            flush=True,
                        )
                if n == 1:  # the overhead: one request at a time, alternating local and the one replica
                    for i in range(args.overhead_requests):
                        pair = [("local", local), ("ray", ray_base)]
                        for side, base in pair if i % 2 == 0 else reversed(pair):
                            latency[side].append(one(base, args, 1000 + i))
        print(f"\n{'server':<20} images/min: median (min-max) over its rounds")
        for name, values in rates.items():
            print(f"{name:<20} {spread(values)}  ({len(values)} rounds)")
        if latency["ray"]:
            local_ms = statistics.median(latency["local"]) * 1000
            ray_ms = statistics.median(latency["ray"]) * 1000
            print(
                f"\none request at a time, {args.overhead_requests} each, alternating: median {local_ms:.1f} ms "
                f"single process, {ray_ms:.1f} ms on 1 replica: Ray adds {ray_ms - local_ms:.1f} ms (goal <= 20 ms)"
            )
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
