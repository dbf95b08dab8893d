from __future__ import annotations

import pytest
import torch

from tests.reference import build_reference_pipeline, save_reference_pipeline

# One thread: tiny models gain nothing from a second one, and on a shared 2-core machine two threads ran a tiny
# UNet step 15x slower (they wait for each other while other processes hold the cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _grad_mode_restored():
    """Benchmarks called from tests switch autograd off process-wide; each test starts as a fresh process would."""
    yield
    torch.set_grad_enabled(True)


@pytest.fixture(scope="session")
def reference_pipeline():
    """diffusers' tiny KolorsPipeline (float32): the reference every parity test compares to."""
    return build_reference_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(reference_pipeline, tmp_path_factory):
    """The tiny reference saved by diffusers' save_pretrained in float32."""
    return save_reference_pipeline(reference_pipeline, tmp_path_factory.mktemp("tiny") / "Kolors-tiny")


@pytest.fixture(scope="session")
def tiny_model_dir_fp16(reference_pipeline, tmp_path_factory):
    """The tiny reference saved as the fp16 variant with a sharded text encoder, like the real repo."""
    return save_reference_pipeline(
        reference_pipeline, tmp_path_factory.mktemp("tiny16") / "Kolors-tiny-fp16", variant="fp16"
    )
