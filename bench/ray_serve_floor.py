"""The floor of Ray Serve's per-request cost on a machine, with no model at all: an HTTP request through Serve's
proxy to a FastAPI ingress (`/none`), which calls a second deployment through a handle (`/call`), streams three
events from it (`/stream`, what `kolors serve --ray` does per call: a step event per step, then the answer), and
does that from a worker thread (`/thread`, as kolors' job queue does), against the same route on a plain uvicorn
server in-process. Medians of 60 requests one at a time, two rounds. It tells how much of what bench_serve.py
reports as "Ray adds" is Ray Serve's own two hops.

    python bench/ray_serve_floor.py
    python bench/ray_serve_floor.py --no-access-log
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 python bench/ray_serve_floor.py

Ray Serve reads its RAY_SERVE_* settings from the environment of each of its processes: set here, they reach the
local Ray this script starts (its processes inherit this one's environment). With direct ingress on
(RAY_SERVE_ENABLE_DIRECT_INGRESS=1, or RAY_SERVE_THROUGHPUT_OPTIMIZED=1) the ingress replica serves HTTP on a
port of its own (from 30000), without the proxy: both ways are timed then.
"""

import argparse
import os
import socket
import statistics
import threading
import time

import httpx
import ray
import uvicorn
from fastapi import FastAPI
from ray import serve

from kolors.serve.on_ray import free_port


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Worker:
    async def stream(self, n: int):
        for i in range(n):
            yield ("step", i)
        yield ("done", [1, 2, 3])

    def call(self, n: int):
        return ("done", [1, 2, 3])


api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, worker):
        self.worker = worker

    @api.post("/stream")
    async def s(self):
        out = []
        async for e in self.worker.options(stream=True).stream.remote(2):
            out.append(e)
        return {"n": len(out)}

    @api.post("/call")
    async def c(self):
        return {"r": await self.worker.call.remote(2)}

    @api.post("/thread")
    async def t(self):
        from starlette.concurrency import run_in_threadpool

        def work():
            return [e for e in self.worker.options(stream=True).stream.remote(2)]

        return {"n": len(await run_in_threadpool(work))}

    @api.post("/none")
    async def none(self):
        return {"r": 1}


local = FastAPI()


@local.post("/stream")
async def ls():
    return {"n": 3}


def timeit(url, n=60):
    with httpx.Client() as c:
        for _ in range(5):
            c.post(url)
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            r = c.post(url)
            ts.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
    return statistics.median(ts)


def direct_port() -> int | None:
    """The port a direct-ingress replica listens on (Serve allocates it from 30000), or None."""
    for port in range(30000, 30100):
        with socket.socket() as s:
            s.settimeout(0.05)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return port
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-access-log", action="store_true", help="Serve's per-request access log off")
    args = parser.parse_args()
    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")}
    print("settings:", settings or "Ray Serve's defaults", "(access log off)" if args.no_access_log else "")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    logging = {"enable_access_log": False} if args.no_access_log else None
    worker = Worker.options(logging_config=logging) if logging else Worker
    ingress = Ingress.options(logging_config=logging) if logging else Ingress
    serve.run(ingress.bind(worker.bind()), route_prefix="/")
    lport = free_port("127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(local, port=lport, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    time.sleep(2)
    bases = {"proxy": f"http://127.0.0.1:{port}"}
    direct = direct_port()
    if direct is not None:
        bases["direct"] = f"http://127.0.0.1:{direct}"
    for _ in range(2):
        print(f"local uvicorn /stream      {timeit(f'http://127.0.0.1:{lport}/stream'):.1f} ms")
        for way, base in bases.items():
            print(f"{way:>6}: serve ingress only /none   {timeit(f'{base}/none'):.1f} ms")
            print(f"{way:>6}: serve + handle call /call  {timeit(f'{base}/call'):.1f} ms")
            print(f"{way:>6}: serve + stream 3 /stream   {timeit(f'{base}/stream'):.1f} ms")
            print(f"{way:>6}: serve + stream from thread {timeit(f'{base}/thread'):.1f} ms")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
