"""FaceID-Plus in every face: the server (OpenAI extension fields face_image / face_scale / face_embeds,
sd-webui-controlnet's FaceID units on the A1111 routes), the web page's face slot, batch jobs (face_image relative
to the jobs file), `kolors serve --faceid` and the PNG parameters, on the tiny model and tiny FaceID adapter of
tests/test_faceid.py. insightface is the stub module of that file: nothing here needs it or its models."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kolors import KolorsPipeline
from kolors.request import image_hash, read_parameters
from tests.test_clip_vision import photo
from tests.test_faceid import (  # noqa: F401  (fixtures)
    StubFaceAnalysis,
    face_embedding,
    faceid_dir,
    insightface,
    pipe,
)

SMALL = dict(height=64, width=64, num_inference_steps=2)
BOX = np.array([30.0, 10.0, 70.0, 60.0])  # where the stub "finds" the face in face_png's photo


def b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


@pytest.fixture(scope="module")
def face_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("face") / "face.png"
    photo(96, 80, seed=8).save(path)
    return path


@pytest.fixture
def detects(pipe, insightface):  # noqa: F811
    """The stub insightface finds one face in any photo; the pipeline has its (stub) models."""
    StubFaceAnalysis.faces = [{"bbox": BOX, "embedding": face_embedding(2)}]
    pipe.face_models = insightface
    yield
    pipe.face_models = None


def direct(pipe, scale: float, **face) -> np.ndarray:  # noqa: F811
    pipe.set_faceid_scale(scale)
    return np.asarray(pipe("a portrait", seed=3, **SMALL, **face).images[0])


@pytest.fixture(scope="module")
def client(pipe):  # noqa: F811
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from kolors.serve import ServerConfig, create_app

    with TestClient(create_app(pipe, ServerConfig(max_steps=4)), base_url="http://127.0.0.1:7860") as c:
        yield c


# ---------------------------------------------------------------------------------------------- server


def test_openai_face_fields(client, pipe, face_png):  # noqa: F811
    from tests.server_helpers import decode_png

    crop, ids = Image.open(face_png).convert("RGB"), face_embedding(5)
    body = {
        "prompt": "a portrait",
        "steps": 2,
        "seed": 3,
        "size": "64x64",
        "face_image": b64(face_png),
        "face_embeds": ids.tolist(),
        "face_scale": 0.6,
    }
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["data"][0]["b64_json"])
    assert image.text["parameters"].endswith(
        f"FaceID: ipa-faceid-plus, FaceID scale: 0.6, FaceID image hash: {image_hash(crop)}"
    )
    assert np.array_equal(
        np.asarray(image.convert("RGB")), direct(pipe, 0.6, face_image=crop, face_embeds=ids)
    )
    for field, value in (("face_image", "%%%"), ("face_embeds", [0.0] * 3), ("face_scale", -1)):
        r = client.post("/v1/images/generations", json={**body, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    # without face_embeds the server needs the face models: the engine's one line, naming the fix
    r = client.post("/v1/images/generations", json={**body, "face_embeds": None})
    assert r.status_code == 400 and "antelopev2" in r.json()["error"]["message"], r.text


def test_openai_edits_take_the_face_and_its_embedding(client, pipe, face_png, tmp_path):  # noqa: F811
    """The multipart edits route: face_image as a file, face_embeds as a JSON list in a form field."""
    from tests.server_helpers import decode_png

    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (90, 60, 30)).save(init)
    crop, ids = Image.open(face_png).convert("RGB"), face_embedding(5)
    data = {"prompt": "a portrait", "steps": "2", "seed": "3", "face_scale": "0.6"}
    data["face_embeds"] = json.dumps(ids.tolist())
    files = {
        "image": ("init.png", init.read_bytes(), "image/png"),
        "face_image": ("face.png", face_png.read_bytes(), "image/png"),
    }
    r = client.post("/v1/images/edits", data=data, files=files)
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["data"][0]["b64_json"])
    assert "FaceID: ipa-faceid-plus, FaceID scale: 0.6" in image.text["parameters"]
    pipe.set_faceid_scale(0.6)
    expected = pipe(
        "a portrait", image=Image.open(init), strength=0.75, seed=3, face_image=crop, face_embeds=ids, **SMALL
    ).images[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    for bad in ("[0.5, ", '{"a": 1}', '["x"]', json.dumps([0.0] * 3)):
        r = client.post("/v1/images/edits", data={**data, "face_embeds": bad}, files=files)
        assert r.status_code == 400 and r.json()["error"]["param"] == "face_embeds", r.text


def face_unit(image: str, **extra) -> dict:
    """A FaceID unit as webuiapi's ControlNetUnit(...).to_dict() sends it."""
    return {
        "image": {"image": image, "mask": None},
        "module": "ip-adapter_face_id_plus",
        "model": "ip-adapter-faceid-plusv2_sdxl [187cb962]",
        "weight": 0.7,
        "resize_mode": "Crop and Resize",
        "processor_res": 512,
        "control_mode": "Balanced",
        "pixel_perfect": False,
        **extra,
    }


def test_a1111_face_unit(client, pipe, face_png, detects):  # noqa: F811
    from tests.server_helpers import decode_png

    body = {"prompt": "a portrait", "steps": 2, "seed": 3, "width": 64, "height": 64}
    body["alwayson_scripts"] = {"ControlNet": {"args": [face_unit(b64(face_png))]}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["images"][0])
    assert "FaceID: ipa-faceid-plus, FaceID scale: 0.7" in image.text["parameters"]
    photo_ = Image.open(face_png).convert("RGB")
    assert np.array_equal(np.asarray(image.convert("RGB")), direct(pipe, 0.7, face_image=photo_))

    def refused(args, field, words):
        r = client.post(
            "/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ControlNet": {"args": args}}}
        )
        detail = r.json()["detail"]
        assert r.status_code == 422 and detail.startswith(f"{field}:") and words in detail, r.text

    refused([face_unit("not base64!")], "alwayson_scripts.ControlNet.args[0].image", "base64")
    refused([face_unit(b64(face_png), weight=11)], "alwayson_scripts.ControlNet.args[0].weight", "0 to 10")
    refused([face_unit(b64(face_png))] * 2, "alwayson_scripts.ControlNet.args", "one FaceID unit")
    # this server has FaceID but no IP-Adapter: a reference-image unit names the option that loads one
    ip = {"module": "ip-adapter_clip_sdxl_plus_vith", "image": b64(face_png)}
    refused([face_unit(b64(face_png)), ip], "alwayson_scripts.ControlNet.args[1]", "--ip-adapter")
    assert client.get("/controlnet/image_prompts").json() == {"ip_adapter": False, "faceid": True}


def test_server_without_faceid_names_the_flag(tiny_model_dir, face_png):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from kolors.serve import ServerConfig, create_app

    plain = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    with TestClient(create_app(plain, ServerConfig()), base_url="http://127.0.0.1:7860") as c:
        r = c.post(
            "/v1/images/generations", json={"prompt": "x", "size": "64x64", "face_image": b64(face_png)}
        )
        assert r.status_code == 400 and "--faceid" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "face_image"
        body = {"prompt": "x", "alwayson_scripts": {"ControlNet": {"args": [face_unit(b64(face_png))]}}}
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 422 and "--faceid" in r.json()["detail"]
        assert c.get("/controlnet/image_prompts").json() == {"ip_adapter": False, "faceid": False}


def test_face_units_are_told_from_reference_units():
    pytest.importorskip("pydantic")
    from kolors.serve.schemas import face_unit as face_of
    from kolors.serve.schemas import ip_adapter_unit, is_face_unit

    for module, model in (
        ("ip-adapter_face_id_plus", ""),
        ("ip-adapter_face_id", "ip-adapter-faceid_sdxl"),
        ("ip-adapter-auto", "ip-adapter-faceid-plusv2_sdxl [187cb962]"),
    ):
        assert is_face_unit({"module": module, "model": model}), module
    for unit in (
        {"module": "ip-adapter_clip_sdxl_plus_vith"},
        {"module": "ip-adapter-auto"},
        {"module": "canny"},
    ):
        assert not is_face_unit(unit), unit
    ip = {"module": "ip-adapter_clip_sdxl", "image": "AAAA", "weight": 0.4}
    face = {"module": "ip-adapter_face_id_plus", "image": {"image": "BBBB"}}
    scripts = {"ControlNet": {"args": [ip, face]}}
    assert ip_adapter_unit(scripts) == ("alwayson_scripts.ControlNet.args[0]", "AAAA", 0.4)
    assert face_of(scripts) == ("alwayson_scripts.ControlNet.args[1]", "BBBB", 0.8)  # the official 0.8
    assert face_of({"ControlNet": {"args": [ip]}}) is None


def test_serve_loads_faceid_at_start():
    from kolors.cli import LOAD_OPTIONS, build_parser

    args = build_parser().parse_args(["serve", "--faceid", "Kwai-Kolors/Kolors-IP-Adapter-FaceID-Plus"])
    args_with_models = build_parser().parse_args(["serve", "--faceid", "F", "--face-models", "M"])
    loaded = {k: v for k in LOAD_OPTIONS if (v := getattr(args_with_models, k, None)) is not None}
    assert args.faceid == "Kwai-Kolors/Kolors-IP-Adapter-FaceID-Plus"
    assert (loaded["faceid"], loaded["face_models"]) == ("F", "M")


# ---------------------------------------------------------------------------------------------- batch


def test_batch_face_jobs_relative_to_the_jobs_file(pipe, face_png, detects, tmp_path):  # noqa: F811
    from kolors.batch import run

    jobs_dir = tmp_path / "jobs"
    (jobs_dir / "faces").mkdir(parents=True)
    Image.open(face_png).save(jobs_dir / "faces" / "me.png")
    lines = [
        {"id": "face", "prompt": "a portrait", "face_image": "faces/me.png", "face_scale": 0.6, "seed": 3},
        {"id": "plain", "prompt": "a portrait", "seed": 3},
        {"id": "bad", "prompt": "a portrait", "face_image": "faces/missing.png"},
        {"id": "embeds", "prompt": "a portrait", "face_image": "faces/me.png", "face_embeds": [0.0] * 512},
    ]
    jobs = jobs_dir / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    small = dict(steps=2, width=64, height=64)
    summary = run(jobs, tmp_path / "out", pipe=pipe, defaults=small, progress=False)
    assert (summary.done, summary.failed) == (2, 2)
    assert any("face_image file not found" in str(b) for b in summary.bad_lines)
    assert any("unknown field(s) 'face_embeds'" in str(b) for b in summary.bad_lines)
    made = np.asarray(Image.open(tmp_path / "out" / "face-0.png").convert("RGB"))
    assert np.array_equal(made, direct(pipe, 0.6, face_image=Image.open(face_png).convert("RGB")))
    params = read_parameters(tmp_path / "out" / "face-0.png")
    assert params.endswith(f"FaceID scale: 0.6, FaceID image hash: {image_hash(Image.open(face_png))}")
    rows = {
        r["id"]: r for r in map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())
    }
    assert rows["face"]["face_image"] == str((jobs_dir / "faces" / "me.png").resolve())
    assert rows["face"]["face_scale"] == 0.6
    assert "face_image" not in rows["plain"]  # rows without a face stay as they were
    plain = pipe("a portrait", seed=3, **SMALL).images[0]
    made = np.asarray(Image.open(tmp_path / "out" / "plain-0.png").convert("RGB"))
    assert np.array_equal(made, np.asarray(plain))
    # a rerun finds every image made
    again = run(jobs, tmp_path / "out", pipe=pipe, defaults=small, progress=False)
    assert (again.done, again.skipped) == (0, 2)


def test_batch_ip_image_is_relative_to_the_jobs_file_too(tmp_path):
    from kolors.batch.jobs import parse_jobs

    (tmp_path / "refs").mkdir()
    photo(32, 32).save(tmp_path / "refs" / "ref.png")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a cat", "ip_image": "refs/ref.png", "ip_scale": 0.3}) + "\n")
    specs, bad = parse_jobs(jobs)
    assert not bad and specs[0].request.ip_image == str((tmp_path / "refs" / "ref.png").resolve())
    assert specs[0].file.startswith("a_cat-")
