"""`kolors batch`: many images from a jobs file, resumable, on one machine or a Ray cluster.

jobs reads the jobs file into the images it asks for; folder keeps the output folder (manifest, lock, resume);
make runs the pipeline on groups of images; run ties them together on this machine, on_ray on a Ray cluster.
"""

from kolors.batch.folder import MANIFEST
from kolors.batch.jobs import ImageSpec, derived_seed, parse_jobs
from kolors.batch.make import batches, generate
from kolors.batch.run import BatchSummary, run

__all__ = [
    "MANIFEST",
    "BatchSummary",
    "ImageSpec",
    "batches",
    "derived_seed",
    "generate",
    "parse_jobs",
    "run",
]
