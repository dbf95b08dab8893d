"""`kolors batch --ray`: the same jobs on a Ray cluster, with Ray Data.

The driver (kolors.batch.run) plans as on one machine; here the pending images become a Ray Dataset, and
`map_batches` hands them to actors that each load the pipeline once: one actor per GPU, or per
`cpus_per_actor` CPUs on a cluster without GPUs. An actor writes its PNGs into the output folder itself,
which must therefore be a path every node sees (a shared filesystem), and returns their manifest rows; the
driver appends them, so the manifest and resume rules are exactly those of a run on one machine. Every node
needs kolors installed and the model reachable (a shared folder, or a hub id each node downloads).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from kolors.errors import KolorsError

INSTALL = 'pip install "kolors[ray]"'


def require_ray():
    """The ray module, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise KolorsError(
            f"--ray needs Ray Data, which is not installed; install it with: {INSTALL}"
        ) from None
    return ray


class ImageMaker:
    """A Ray Data actor: loads the pipeline once, then makes and writes each batch of images it is handed."""

    def __init__(self, output_dir: str, model_options: dict, threads: int | None):
        import torch

        from kolors.pipeline import KolorsPipeline

        if threads:
            torch.set_num_threads(threads)
        self.output_dir = Path(output_dir)
        self.pipe = KolorsPipeline.from_pretrained(**model_options)
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, batch: dict) -> dict:
        from kolors.batch.jobs import ImageSpec
        from kolors.batch.make import batches, make_images

        specs = [ImageSpec.from_row(json.loads(s)) for s in batch["spec"]]
        rows = []
        # Ray may join images of different settings into one batch: split it into pipeline calls.
        for chunk in batches(specs, len(specs)):
            try:
                rows.extend(make_images(self.pipe, chunk, self.output_dir))
            except Exception as e:  # as on one machine: this chunk fails with its reason, the others go on
                text = str(e).strip().splitlines()[0] if str(e).strip() else ""
                reason = text if isinstance(e, KolorsError) else f"{type(e).__name__}: {text}".rstrip(": ")
                rows.extend({"file": s.file, "error": reason} for s in chunk)
        return {"row": [json.dumps(r, ensure_ascii=False) for r in rows]}


def run(
    specs: list,
    output_dir: Path,
    on_row: Callable[[dict], None],
    *,
    address: str | None,
    batch_size: int,
    actors: int | None,
    cpus_per_actor: int,
    model_options: dict,
) -> None:
    """Make `specs` on Ray, calling `on_row` with each image's manifest row (or error) as it comes back.
    Connects to `address` (None: the running instance, RAY_ADDRESS, or a new local one)."""
    ray = require_ray()
    if Path(model_options["model"]).is_dir():  # a typo is one line here, not a traceback from every actor
        from kolors.pipeline import KolorsPipeline

        KolorsPipeline.resolve(model_options["model"])
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        # More actors than the cluster can place would wait forever: at most one per GPU, or per CPU share.
        if gpus:
            placement, threads = {"num_gpus": 1}, None
            actors = min(actors or gpus, gpus)
        else:
            cpus_per_actor = max(1, min(cpus_per_actor, cpus))
            placement, threads = {"num_cpus": cpus_per_actor}, cpus_per_actor
            actors = min(actors or cpus, max(1, cpus // cpus_per_actor))
        # The driver shows its own progress bar, over images.
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Pending images arrive grouped by settings (batches' order), so most Ray batches share them.
        items = [{"spec": json.dumps(s.row(), ensure_ascii=False)} for s in specs]
        # Blocks of about one batch each, so every actor gets work even when the job is small.
        blocks = max(1, min(len(items) // batch_size, 1000))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(
            ImageMaker,
            fn_constructor_kwargs=dict(
                output_dir=str(Path(output_dir).resolve()), model_options=model_options, threads=threads
            ),
            batch_size=batch_size,
            concurrency=min(actors, blocks),
            **placement,
        )
        for item in ds.iter_rows():
            on_row(json.loads(item["row"]))
    except ray.exceptions.RayError as e:
        # An actor's KolorsError (a bad model, no GPU memory) reaches the driver wrapped in Ray's traceback.
        cause = re.findall(r"KolorsError: (.+)", str(e))
        if cause:
            raise KolorsError(f"a Ray actor stopped: {cause[-1]}") from None
        raise
    finally:
        if started:
            ray.shutdown()
