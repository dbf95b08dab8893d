"""A bounded soak of `kolors serve` on loopback: N image-to-image requests with large PNG uploads, C at a time,
against the tiny random model; prints the server process's RSS (MiB) before, every 50 requests and at the end.

    python bench/soak_server.py --model /tmp/kolors-tiny --requests 300 --concurrency 8 --upload 2048

No weights needed beyond a tiny model folder (tests/reference.py's save_reference_pipeline, or
bench/fake_weights.py). The image is resized to 64x64 before generating, so the upload decode dominates.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):  # run as `python bench/soak_server.py`: the repo root, for tests.server_helpers
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--upload", type=int, default=2048, help="side of the uploaded PNG")
    args = parser.parse_args()

    from kolors import KolorsPipeline
    from kolors.serve import ServerConfig, create_app

    torch.set_num_threads(1)
    pipe = KolorsPipeline.from_pretrained(args.model, dtype=torch.float32, device="cpu")
    config = ServerConfig(max_upload_mb=64, max_width=4096, max_height=4096, queue_size=256)
    app = create_app(pipe, config)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (args.upload, args.upload, 3), dtype=np.uint8)).save(buf, "PNG")
    body = {
        "prompt": "x",
        "steps": 1,
        "width": 64,
        "height": 64,
        "init_images": [base64.b64encode(buf.getvalue()).decode()],
    }
    print(f"upload: {len(buf.getvalue()) / 2**20:.1f} MiB PNG of {args.upload}x{args.upload}")
    from tests.server_helpers import live_server

    with live_server(app) as base:
        print(f"rss before: {rss_mib():.0f} MiB")
        done, lock, peak = [0], threading.Lock(), [0.0]

        def one(_):
            r = httpx.post(f"{base}/sdapi/v1/img2img", json=body, timeout=600)
            assert r.status_code == 200, r.text[:200]
            with lock:
                done[0] += 1
                peak[0] = max(peak[0], rss_mib())
                if done[0] % 50 == 0:
                    print(
                        f"after {done[0]:4d} requests: rss {rss_mib():.0f} MiB (peak so far {peak[0]:.0f})",
                        flush=True,
                    )

        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(args.requests)))
        print(f"rss after: {rss_mib():.0f} MiB, peak {peak[0]:.0f} MiB")


if __name__ == "__main__":
    main()
