"""LoRAs through every face: the CLI's --lora, the server's --lora-dir with A1111's <lora:NAME:SCALE> tags and
OpenAI's loras field, batch jobs' loras, and the `Lora hashes` every PNG records. Each image must be the
pipeline's own for the same LoRA set (the engine's parity with diffusers is tests/test_lora.py's)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("fastapi")
pytest.importorskip("peft")

from fastapi.testclient import TestClient  # noqa: E402

from kolors import KolorsPipeline  # noqa: E402
from kolors.batch import run as run_batch  # noqa: E402
from kolors.cli import main  # noqa: E402
from kolors.request import read_parameters  # noqa: E402
from kolors.serve import ServerConfig, create_app  # noqa: E402
from tests.server_helpers import decode_png  # noqa: E402
from tests.test_lora import ATTENTION, kohya, peft_lora  # noqa: E402

PROMPT = "a watercolor fox"
SMALL = dict(height=32, width=32, num_inference_steps=2)


@pytest.fixture(scope="module")
def lora_dir(reference_pipeline, tmp_path_factory):
    """One kohya-format LoRA, ink.safetensors, in a folder as a server's --lora-dir."""
    folder = tmp_path_factory.mktemp("lora-dir")
    state, _ = peft_lora(reference_pipeline.unet, ATTENTION, r=4, alpha=4, seed=7)
    save_file(kohya(state, alpha=4), folder / "ink.safetensors")
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def expected(pipe, loras, seed, prompt=PROMPT):
    pipe.set_loras(loras)
    try:
        return np.asarray(pipe(prompt, **SMALL, seed=[seed]).images[0], dtype=np.int16)
    finally:
        pipe.set_loras([])


def short_hash(file) -> str:
    """A1111's addnet hash of a safetensors file: the sha256 of the bytes after the header."""
    data = file.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]


def test_server_lora_tags_listing_and_openai_field(pipe, lora_dir):
    file = lora_dir / "ink.safetensors"
    app = create_app(pipe, ServerConfig(max_steps=4, max_width=64, max_height=64, lora_dir=str(lora_dir)))
    client = TestClient(app, base_url="http://127.0.0.1")
    assert [entry["name"] for entry in client.get("/sdapi/v1/loras").json()] == ["ink"]

    body = {"prompt": f"{PROMPT} <lora:ink:0.7>", "steps": 2, "width": 32, "height": 32, "seed": 3}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["images"][0])
    text = image.text["parameters"]
    assert text.startswith(f"{PROMPT} <lora:ink:0.7>\n") and f'Lora hashes: "ink: {short_hash(file)}"' in text
    with_lora = expected(pipe, [(str(file), 0.7)], 3)
    assert np.abs(np.asarray(image, dtype=np.int16) - with_lora).max() <= 1
    assert np.abs(with_lora - expected(pipe, [], 3)).max() > 5  # the LoRA changes the image

    openai = {
        "prompt": PROMPT,
        "steps": 2,
        "size": "32x32",
        "seed": 3,
        "loras": [{"name": "ink", "scale": 0.7}],
    }
    r = client.post("/v1/images/generations", json=openai)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["b64_json"] == client.post("/sdapi/v1/txt2img", json=body).json()["images"][0]

    # The next request without LoRAs is the base model again.
    plain = client.post("/sdapi/v1/txt2img", json={**body, "prompt": PROMPT}).json()["images"][0]
    assert np.abs(np.asarray(decode_png(plain), dtype=np.int16) - expected(pipe, [], 3)).max() <= 1

    r = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "x <lora:nope:1>"})
    assert r.status_code == 422 and r.json()["detail"].startswith("prompt: unknown LoRA 'nope'")
    r = client.post("/v1/images/generations", json={**openai, "loras": [{"name": "ink", "scale": -1}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("loras")
    (lora_dir / "more.safetensors").write_bytes(file.read_bytes())
    try:
        assert client.post("/sdapi/v1/refresh-loras").status_code == 200
        assert [entry["name"] for entry in client.get("/sdapi/v1/loras").json()] == ["ink", "more"]
    finally:
        (lora_dir / "more.safetensors").unlink()
    app.state.queue.close()


def test_cli_lora_and_its_parameters(pipe, tiny_model_dir, lora_dir, tmp_path, capsys):
    file = lora_dir / "ink.safetensors"
    out = tmp_path / "fox.png"
    argv = ["generate", PROMPT, "--model", str(tiny_model_dir), "--dtype", "float32", "--device", "cpu"]
    argv += ["--steps", "2", "--width", "32", "--height", "32", "--seed", "5", "--output", str(out)]
    assert main([*argv, "--lora", f"{file}:0.7"]) == 0, capsys.readouterr().err
    text = read_parameters(out)
    assert "<lora:ink:0.7>" in text.splitlines()[0] and f'Lora hashes: "ink: {short_hash(file)}"' in text
    from PIL import Image

    with Image.open(out) as im:
        assert np.abs(np.asarray(im, dtype=np.int16) - expected(pipe, [(str(file), 0.7)], 5)).max() <= 1
    assert main([*argv, "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_batch_jobs_with_loras(pipe, lora_dir, tmp_path):
    file = lora_dir / "ink.safetensors"
    jobs = [
        {"id": "plain", "prompt": PROMPT, "seed": 1},
        {"id": "ink", "prompt": PROMPT, "seed": 1, "loras": [f"{file}:0.7"]},
        {"id": "ink2", "prompt": PROMPT, "seed": 1, "loras": [{"name": str(file), "scale": 0.7}]},
    ]
    defaults = dict(steps=2, width=32, height=32)
    summary = run_batch(jobs, tmp_path / "out", pipe=pipe, defaults=defaults, progress=False)
    assert summary.done == 3 and summary.failed == 0
    rows = {
        r["file"]: r for r in map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())
    }
    assert rows["ink-0.png"]["loras"] == [[str(file), 0.7]] and rows["plain-0.png"]["loras"] == []
    pixels = {}
    for name in ("plain", "ink", "ink2"):
        from PIL import Image

        with Image.open(tmp_path / "out" / f"{name}-0.png") as im:
            pixels[name] = np.asarray(im, dtype=np.int16)
    assert np.abs(pixels["ink"] - expected(pipe, [(str(file), 0.7)], 1)).max() <= 1
    assert np.array_equal(pixels["ink"], pixels["ink2"])
    assert np.abs(pixels["plain"] - expected(pipe, [], 1)).max() <= 1
    assert "Lora hashes" in read_parameters(tmp_path / "out" / "ink-0.png")
    # A rerun finds every image made.
    again = run_batch(jobs, tmp_path / "out", pipe=pipe, defaults=defaults, progress=False)
    assert again.done == 0 and again.skipped == 3


def test_a_lora_file_for_another_model_is_a_4xx_and_exit_2_naming_it(
    pipe, tiny_model_dir, lora_dir, tmp_path, capsys
):
    """A file in --lora-dir that fits no layer (SDXL's second text encoder): the request is answered 4xx naming
    the file and its first key, the good LoRA of the same request is not left applied, the next request runs."""
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "ink.safetensors").write_bytes((lora_dir / "ink.safetensors").read_bytes())
    key = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    bad = folder / "bad.safetensors"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 8), f"{key}.lora_up.weight": torch.zeros(8, 4)}, bad)
    app = create_app(pipe, ServerConfig(max_steps=4, max_width=64, max_height=64, lora_dir=str(folder)))
    client = TestClient(app, base_url="http://127.0.0.1")
    body = {
        "prompt": f"{PROMPT} <lora:ink:0.7> <lora:bad:1>",
        "steps": 2,
        "width": 32,
        "height": 32,
        "seed": 3,
    }
    openai = {
        "prompt": PROMPT,
        "steps": 2,
        "size": "32x32",
        "seed": 3,
        "loras": [{"name": "bad", "scale": 1}],
    }
    for route, json_ in (("/sdapi/v1/txt2img", body), ("/v1/images/generations", openai)):
        r = client.post(route, json=json_)
        assert 400 <= r.status_code < 500, r.text
        assert str(bad) in r.text and f"'{key}.lora_down.weight' matches no layer" in r.text, r.text
    plain = client.post("/sdapi/v1/txt2img", json={**body, "prompt": PROMPT}).json()["images"][0]
    assert np.abs(np.asarray(decode_png(plain), dtype=np.int16) - expected(pipe, [], 3)).max() <= 1
    app.state.queue.close()

    argv = ["generate", PROMPT, "--model", str(tiny_model_dir), "--dtype", "float32", "--device", "cpu"]
    argv += ["--steps", "2", "--width", "32", "--height", "32", "--output", str(tmp_path / "x.png")]
    assert main([*argv, "--lora", f"{bad}:0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        str(bad) in err
        and "matches no layer" in err
        and "Traceback" not in err
        and len(err.splitlines()) == 1
    )
    assert not (tmp_path / "x.png").exists()
