"""schemathesis over the server's own OpenAPI schema: generated requests, valid and malformed, on every
operation; none may answer 5xx. Kept bounded: the tiny model, the server's limits at 2 steps, 64x64 pixels and 2
images, and a few examples per operation and mode."""

from __future__ import annotations

import os

import pytest
import torch

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from kolors import KolorsPipeline  # noqa: E402
from kolors.serve import ServerConfig, create_app  # noqa: E402

LIMITS = ServerConfig(
    max_steps=2,
    max_width=64,
    max_height=64,
    max_n=2,
    max_upload_mb=1,
    queue_size=8,
    allowed_hosts=("testserver",),  # the Host schemathesis sends in-process
)
EXAMPLES = int(os.environ.get("KOLORS_FUZZ_EXAMPLES", 25))  # per operation and mode; raise it to hunt


@pytest.fixture(scope="module")
def schema(tiny_model_dir):
    pipe = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    app = create_app(pipe, LIMITS)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    app.state.queue.close()


def fuzz(operation, mode: GenerationMode) -> set[int]:
    """Send `EXAMPLES` generated requests to one operation; the status codes it answered."""
    codes: set[int] = set()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,  # the same requests on every run
    )
    def check(case):
        codes.add(case.call_and_validate(checks=[not_a_server_error]).status_code)

    try:
        check()
    except Unsatisfiable:  # nothing in the operation can be malformed (no parameters, no body)
        assert mode is GenerationMode.NEGATIVE and not codes
    return codes


# schemathesis' own pytest plugin (schema.parametrize with a lazy fixture) does not run under pytest 9, so each
# operation is driven through its hypothesis strategy here.
@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "malformed"]
)
def test_no_request_makes_the_server_fail(schema, mode):
    operations = [result.ok() for result in schema.get_all_operations()]
    answered = {f"{op.method.upper()} {op.path}": fuzz(op, mode) for op in operations}
    for route in ("POST /sdapi/v1/txt2img", "POST /sdapi/v1/img2img", "POST /v1/images/generations"):
        assert answered[route], route
    print(mode.value, answered)
