"""IP-Adapter in every face: the CLI, the server (A1111 ControlNet units, OpenAI extension fields), batch jobs and
the PNG parameters, on the tiny model and the tiny adapter of tests/test_ip_adapter.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kolors import KolorsPipeline
from kolors.cli import main
from kolors.request import GenerationRequest, image_hash, read_parameters
from tests.test_clip_vision import photo, save_tiny_clip
from tests.test_ip_adapter import plus_state

ARGS = [
    "--steps",
    "2",
    "--seed",
    "7",
    "--width",
    "64",
    "--height",
    "64",
    "--dtype",
    "float32",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def adapter_dir(reference_pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("ipa-faces") / "Kolors-IP-Adapter-Plus-tiny"
    root.mkdir()
    save_tiny_clip(root / "image_encoder", seed=3)
    torch.save(plus_state(reference_pipeline.unet), root / "ip_adapter_plus_general.bin")
    return root


@pytest.fixture(scope="module")
def ref_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.png"
    photo(48, 64, seed=2).save(path)
    return path


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, adapter_dir):
    p = KolorsPipeline.from_pretrained(
        tiny_model_dir, dtype=torch.float32, device="cpu", ip_adapter=adapter_dir
    )
    p.set_progress_bar_config(disable=True)
    return p


def test_cli_generate_with_a_reference_image(tiny_model_dir, adapter_dir, ref_png, pipe, tmp_path, capsys):
    out = tmp_path / "out.png"
    model = ["--model", str(tiny_model_dir), "--ip-adapter", str(adapter_dir)]
    code = main(
        [
            "generate",
            "a cat",
            *model,
            "--ip-image",
            str(ref_png),
            "--ip-scale",
            "0.7",
            *ARGS,
            "-o",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    reference = Image.open(ref_png)
    params = read_parameters(out)
    assert params.endswith(
        f"IP-Adapter: ip_adapter_plus_general, IP-Adapter scale: 0.7, IP-Adapter image hash: {image_hash(reference)}"
    )
    pipe.set_ip_adapter_scale(0.7)
    again = pipe(
        "a cat", height=64, width=64, num_inference_steps=2, seed=7, ip_adapter_image=reference
    ).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(out)))


def test_cli_bad_input_is_one_line(tiny_model_dir, adapter_dir, ref_png, tmp_path, capsys):
    code = main(["generate", "a cat", "--model", str(tiny_model_dir), "--ip-image", str(ref_png), *ARGS])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--ip-image needs an IP-Adapter" in err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    code = main(
        [
            "generate",
            "a cat",
            "--model",
            str(tiny_model_dir),
            "--ip-adapter",
            str(adapter_dir),
            "--ip-image",
            str(broken),
            *ARGS,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "cannot decode image" in err and err.count("\n") == 1
    code = main(["generate", "a cat", "--model", str(tiny_model_dir), "--face", str(ref_png), *ARGS])
    assert code == 2 and "--face needs the FaceID adapter" in capsys.readouterr().err


def test_request_checks_and_infotext(ref_png):
    from kolors.request import InvalidRequest

    with pytest.raises(InvalidRequest, match="ip_scale must be a finite number"):
        GenerationRequest(prompt="x", ip_scale=float("nan")).validate()
    with pytest.raises(InvalidRequest, match="ip_image file not found"):
        GenerationRequest(prompt="x", ip_image="/nonexistent/ref.png").validate()
    with pytest.raises(InvalidRequest, match="face_embeds needs face_image"):
        GenerationRequest(prompt="x", face_embeds=(0.0,) * 512).validate()
    with pytest.raises(InvalidRequest, match="512 finite numbers"):
        GenerationRequest(prompt="x", face_image=Image.new("RGB", (8, 8)), face_embeds=(0.0,) * 3).validate()
    request = GenerationRequest(prompt="x", ip_image=str(ref_png), ip_scale=0.25)
    assert image_hash(str(ref_png)) == image_hash(Image.open(ref_png))
    assert "IP-Adapter: ip-adapter, IP-Adapter scale: 0.25" in request.infotext(1, "Kolors")


def test_generate_request_without_adapter_is_refused(tiny_model_dir, ref_png):
    from kolors.request import InvalidRequest

    p = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    with pytest.raises(InvalidRequest, match="no IP-Adapter loaded"):
        p.generate(GenerationRequest(prompt="x", ip_image=str(ref_png), steps=1, width=64, height=64))


# ---------------------------------------------------------------------------------------------- server


def b64(path) -> str:
    import base64

    return base64.b64encode(open(path, "rb").read()).decode()


@pytest.fixture(scope="module")
def client(pipe):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from kolors.serve import ServerConfig, create_app

    with TestClient(create_app(pipe, ServerConfig(max_steps=4)), base_url="http://127.0.0.1:7860") as c:
        yield c


def unit(image: str, **extra) -> dict:
    """A unit as webuiapi's ControlNetUnit(...).to_dict() sends it."""
    return {
        "image": image,
        "mask": None,
        "module": "ip-adapter_clip_sdxl_plus_vith",
        "model": "ip-adapter-plus_sdxl_vit-h [f1f1f1f1]",
        "weight": 0.6,
        "resize_mode": "Crop and Resize",
        "lowvram": False,
        "processor_res": 512,
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "control_mode": 0,
        "pixel_perfect": False,
        **extra,
    }


def direct(pipe, ref_png, scale: float) -> np.ndarray:
    pipe.set_ip_adapter_scale(scale)
    image = pipe(
        "a cat", height=64, width=64, num_inference_steps=2, seed=3, ip_adapter_image=Image.open(ref_png)
    )
    return np.asarray(image.images[0])


def test_a1111_controlnet_ip_adapter_unit(client, pipe, ref_png):
    from tests.server_helpers import decode_png

    body = {"prompt": "a cat", "steps": 2, "seed": 3, "width": 64, "height": 64}
    body["alwayson_scripts"] = {"ControlNet": {"args": [unit(b64(ref_png))]}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["images"][0])
    assert "IP-Adapter: ip_adapter_plus_general, IP-Adapter scale: 0.6" in image.text["parameters"]
    assert np.array_equal(np.asarray(image.convert("RGB")), direct(pipe, ref_png, 0.6))


def test_a1111_other_units_and_bad_units_are_422(client, ref_png):
    def post(args, field):
        body = {
            "prompt": "a cat",
            "steps": 1,
            "width": 64,
            "height": 64,
            "alwayson_scripts": {"ControlNet": {"args": args}},
        }
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}:"), r.text

    # A ControlNet unit goes to the ControlNet parser, which knows no ControlNet on this server.
    post([unit(b64(ref_png), module="canny")], "alwayson_scripts.ControlNet.args[0].model")
    post([unit("not base64!")], "alwayson_scripts.ControlNet.args[0].image")
    post([unit(b64(ref_png), weight=-1)], "alwayson_scripts.ControlNet.args[0].weight")
    post([unit(b64(ref_png)), unit(b64(ref_png))], "alwayson_scripts.ControlNet.args")


def test_openai_extension_fields(client, pipe, ref_png):
    from tests.server_helpers import decode_png

    body = {
        "prompt": "a cat",
        "steps": 2,
        "seed": 3,
        "size": "64x64",
        "ip_adapter_image": b64(ref_png),
        "ip_adapter_scale": 0.9,
    }
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["data"][0]["b64_json"])
    assert np.array_equal(np.asarray(image.convert("RGB")), direct(pipe, ref_png, 0.9))
    r = client.post("/v1/images/generations", json={**body, "ip_adapter_image": "%%%"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ip_adapter_image"


def test_openai_edits_take_the_reference_as_a_file(client, pipe, ref_png, tmp_path):
    """The multipart edits route takes the image prompt as a file beside the image it changes."""
    from tests.server_helpers import decode_png

    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (90, 60, 30)).save(init)
    data = {"prompt": "a cat", "steps": "2", "seed": "3", "ip_adapter_scale": "0.9"}
    files = {"image": ("init.png", init.read_bytes(), "image/png")}
    files["ip_adapter_image"] = ("ref.png", ref_png.read_bytes(), "image/png")
    r = client.post("/v1/images/edits", data=data, files=files)
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["data"][0]["b64_json"])
    assert "IP-Adapter: ip_adapter_plus_general, IP-Adapter scale: 0.9" in image.text["parameters"]
    pipe.set_ip_adapter_scale(0.9)
    expected = pipe(
        "a cat",
        image=Image.open(init),
        strength=0.75,
        num_inference_steps=2,
        seed=3,
        ip_adapter_image=Image.open(ref_png),
    ).images[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    files["ip_adapter_image"] = ("ref.png", b"not an image", "image/png")
    r = client.post("/v1/images/edits", data=data, files=files)
    assert r.status_code == 400 and r.json()["error"]["param"] == "ip_adapter_image", r.text


def test_server_without_adapter_names_the_flag(tiny_model_dir, ref_png):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from kolors.serve import ServerConfig, create_app

    plain = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    with TestClient(create_app(plain, ServerConfig()), base_url="http://127.0.0.1:7860") as c:
        r = c.post(
            "/v1/images/generations", json={"prompt": "x", "size": "64x64", "ip_adapter_image": b64(ref_png)}
        )
        assert r.status_code == 400 and "--ip-adapter" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- batch


def test_batch_jobs_with_a_reference_image(pipe, ref_png, tmp_path):
    import json

    from kolors.batch import run

    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"id": "ref", "prompt": "a cat", "ip_image": str(ref_png), "ip_scale": 0.6, "seed": 3},
        {"id": "plain", "prompt": "a cat", "seed": 3},
        {"id": "bad", "prompt": "a cat", "ip_image": str(tmp_path / "missing.png")},
    ]
    jobs.write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    small = dict(steps=2, width=64, height=64)
    summary = run(jobs, tmp_path / "out", pipe=pipe, defaults=small, progress=False)
    assert (summary.done, summary.failed) == (2, 1)
    made = np.asarray(Image.open(tmp_path / "out" / "ref-0.png").convert("RGB"))
    assert np.array_equal(made, direct(pipe, ref_png, 0.6))
    assert "IP-Adapter scale: 0.6" in read_parameters(tmp_path / "out" / "ref-0.png")
    plain = pipe("a cat", height=64, width=64, num_inference_steps=2, seed=3).images[0]
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "out" / "plain-0.png").convert("RGB")), np.asarray(plain)
    )


def test_controlnet_unit_parsing():
    pytest.importorskip("pydantic")
    from kolors.serve.schemas import RequestError, ip_adapter_unit, is_ip_adapter_unit

    ip = {"module": "ip-adapter_clip_sdxl", "image": {"image": "AAAA", "mask": None}, "weight": 0.4}
    off = {"module": "canny", "enabled": False, "image": "BBBB"}
    assert ip_adapter_unit({"ControlNet": {"args": [off, ip]}}) == (
        "alwayson_scripts.ControlNet.args[1]",
        "AAAA",
        0.4,
    )
    assert is_ip_adapter_unit(ip) and not is_ip_adapter_unit(off)
    assert ip_adapter_unit({"ControlNet": {"args": [{"module": "ip-adapter", "image": "A"}]}})[2] == 0.5
    assert ip_adapter_unit({"controlnet": {"args": [ip]}})[2] == 0.4  # the key matched as A1111 matches it
    assert ip_adapter_unit(None) is None and ip_adapter_unit({"ControlNet": {"args": [off]}}) is None
    with pytest.raises(RequestError, match="needs its reference image"):
        ip_adapter_unit({"ControlNet": {"args": [{"module": "ip-adapter", "image": None}]}})
