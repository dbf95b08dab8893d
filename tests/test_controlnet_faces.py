"""ControlNet in every face on the tiny model: the request and its PNG parameters, the CLI, the server (A1111's
ControlNet extension API and OpenAI's extension field). Whole-image parity is tests/test_controlnet.py's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kolors import KolorsPipeline
from kolors.cli import main
from kolors.request import ControlUnit, GenerationRequest, InvalidRequest, read_parameters
from tests.server_helpers import decode_png, png_b64
from tests.test_controlnet import make_controlnet

SMALL = dict(steps=2, width=64, height=64, seed=3)


@pytest.fixture(scope="module")
def controlnet_dir(reference_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("faces") / "Kolors-ControlNet-Tiny"
    make_controlnet(reference_pipeline.unet, 10).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, controlnet_dir):
    p = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    p.load_controlnet(controlnet_dir, name="edges")
    p.set_progress_bar_config(disable=True)
    return p


def photo(w: int = 64, h: int = 64) -> Image.Image:
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[16:48, 20:44] = (220, 160, 60)
    return Image.fromarray(a)


# ------------------------------------------------------------------------------------------------ request


def test_request_units_reach_the_pipeline_and_the_parameters(pipe):
    unit = ControlUnit("edges", photo(), scale=0.7, preprocess="canny", end=0.9)
    request = GenerationRequest(prompt="a cat", controlnets=(unit,), **SMALL)
    ((image, seed),) = pipe.generate(request)
    same = pipe(
        "a cat", height=64, width=64, num_inference_steps=2, seed=3, control_image=pipe_canny(photo()),
        controlnet="edges", controlnet_conditioning_scale=0.7, control_guidance_end=0.9,
    ).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(image), np.asarray(same))
    plain = pipe("a cat", height=64, width=64, num_inference_steps=2, seed=3).images[0]
    assert not np.array_equal(np.asarray(image), np.asarray(plain))
    text = request.infotext(seed, "Kolors")
    assert text.endswith(
        'ControlNet 0: "Module: canny, Model: edges, Weight: 0.7, Resize Mode: Just Resize, Guidance Start: 0.0, '
        'Guidance End: 0.9, Control Mode: Balanced"'
    )
    assert request.as_dict()["controlnets"][0]["model"] == "edges"


def test_request_control_modes_and_guess_mode(pipe):
    """A unit's control mode and the request's guess mode reach the pipeline and the parameters: the unit's
    as sd-webui-controlnet writes it, guess mode (which it has not) as a field of its own after the units."""
    unit = ControlUnit("edges", photo(), scale=0.7, control_mode="control")
    request = GenerationRequest(prompt="a cat", controlnets=(unit,), **SMALL)
    ((image, seed),) = pipe.generate(request)
    call = dict(height=64, width=64, num_inference_steps=2, seed=3, control_image=photo(), controlnet="edges")
    same = pipe("a cat", **call, controlnet_conditioning_scale=0.7, control_mode="control").images[0]
    assert np.array_equal(np.asarray(image), np.asarray(same))
    assert request.infotext(seed, "Kolors").endswith('Control Mode: ControlNet is more important"')
    unit = ControlUnit("edges", photo(), scale=0.7)
    request = GenerationRequest(prompt="a cat", controlnets=(unit,), control_guess_mode=True, **SMALL)
    ((image, seed),) = pipe.generate(request)
    same = pipe("a cat", **call, controlnet_conditioning_scale=0.7, guess_mode=True).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(same))
    assert request.infotext(seed, "Kolors").endswith('Control Mode: Balanced", Guess Mode: True')
    assert read_parameters_of(request, seed)["Guess Mode"] == "True"
    with pytest.raises(InvalidRequest, match="use one") as e:
        GenerationRequest(
            prompt="x",
            controlnets=(ControlUnit("edges", photo(), control_mode="prompt"),),
            control_guess_mode=True,
        ).validate()
    assert e.value.field == "control_guess_mode"


def read_parameters_of(request, seed) -> dict:
    """The fields after the prompts of a request's parameters, as a dict (values unquoted)."""
    fields = request.infotext(seed, "Kolors").splitlines()[-1]
    return {k: v.strip('"') for k, v in (f.split(": ", 1) for f in fields.split(", ") if ": " in f)}


def pipe_canny(image):
    import kolors

    return kolors.preprocess("canny", image)


@pytest.mark.parametrize(
    "unit, message",
    [
        (ControlUnit("edges", None), "has no control image"),
        (ControlUnit("edges", photo(), preprocess="scribble"), "unknown preprocessor 'scribble'"),
        (ControlUnit("", photo()), "names no model"),
        (ControlUnit("edges", photo(), start=0.9, end=0.5), "start 0.9 must be below its end 0.5"),
        (ControlUnit("edges", photo(), scale=float("inf")), "scale must be a finite number"),
        (
            ControlUnit("edges", photo(), control_mode="strict"),
            "unknown control mode 'strict' for ControlNet 0; choose one of: balanced",
        ),
    ],
)
def test_request_validation(unit, message):
    with pytest.raises(InvalidRequest, match=message) as e:
        GenerationRequest(prompt="x", controlnets=(unit,)).validate()
    assert e.value.field == "controlnets"


# ------------------------------------------------------------------------------------------------ CLI


def cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_controlnet(tiny_model_dir, controlnet_dir, tmp_path, capsys):
    photo().save(tmp_path / "photo.png")
    out = tmp_path / "out.png"
    base = ["generate", "a cat", "--model", str(tiny_model_dir), "--dtype", "float32", "--device", "cpu"]
    base += ["--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--quiet", "-o", str(out)]
    code, _, err = cli(
        [*base, "--controlnet", str(controlnet_dir), "--control-image", str(tmp_path / "photo.png"),
         "--control-preprocess", "canny", "--control-scale", "0.5", "--control-end", "0.9"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert 'ControlNet 0: "Module: canny, Model: Kolors-ControlNet-Tiny, Weight: 0.5' in read_parameters(out)
    code, _, err = cli([*base, "--controlnet", str(controlnet_dir)], capsys)
    assert code == 2 and "0 --control-image for 1 --controlnet" in err
    code, _, err = cli(
        [*base, "--controlnet", str(controlnet_dir), "--control-image", str(tmp_path / "nope.png")], capsys
    )
    assert code == 2 and "image file not found" in err and err.count("\n") == 1
    code, _, err = cli(
        [*base, "--controlnet", str(tmp_path), "--control-image", str(tmp_path / "photo.png")], capsys
    )
    assert code == 2 and "config file not found" in err
    unit = ["--controlnet", str(controlnet_dir), "--control-image", str(tmp_path / "photo.png")]
    code, _, err = cli([*base, *unit, "--control-mode", "prompt"], capsys)
    assert code == 0, err
    assert "Control Mode: My prompt is more important" in read_parameters(out)
    code, _, err = cli([*base, *unit, "--control-guess-mode"], capsys)
    assert code == 0, err
    assert read_parameters(out).endswith('Control Mode: Balanced", Guess Mode: True')
    code, _, err = cli([*base, *unit, "--control-guess-mode", "--control-mode", "control"], capsys)
    assert code == 2 and "guess mode is diffusers' weighting" in err and err.count("\n") == 1
    code, _, err = cli([*base, "--control-guess-mode"], capsys)
    assert code == 2 and "--control-guess-mode was given without --controlnet" in err


# ------------------------------------------------------------------------------------------------ server


@pytest.fixture(scope="module")
def client(pipe):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from kolors.serve import ServerConfig, create_app

    config = ServerConfig(max_steps=4, max_width=128, max_height=128, max_n=2)
    with TestClient(create_app(pipe, config), base_url="http://127.0.0.1:7860") as c:
        yield c


def a1111_unit(**fields):
    return {"enabled": True, "module": "canny", "model": "edges [0f1e2d3c]", "weight": 0.7,
            "image": png_b64(photo(96, 96)), "resize_mode": "Just Resize", "guidance_start": 0.0,
            "guidance_end": 0.9, "control_mode": "Balanced", "processor_res": 512,
            "threshold_a": 100, "threshold_b": 200, **fields}  # fmt: skip


def test_a1111_controlnet_units(client, pipe):
    assert client.get("/controlnet/model_list").json() == {"model_list": ["edges"]}
    assert "canny" in client.get("/controlnet/module_list").json()["module_list"]
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3}
    r = client.post(
        "/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ControlNet": {"args": [a1111_unit()]}}}
    )
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["images"][0])
    assert (
        'ControlNet 0: "Module: canny, Model: edges, Weight: 0.7, Resize Mode: Just Resize, '
        "Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 0.9"
        in image.text["parameters"]
    )
    ours = pipe(
        "a cat", height=64, width=64, num_inference_steps=2, seed=3, control_image=pipe_canny(photo(96, 96).resize((64, 64), Image.LANCZOS)),
        controlnet="edges", controlnet_conditioning_scale=0.7, control_guidance_end=0.9,
    ).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ours))
    # A disabled unit and the key in lower case: a plain image.
    off = {"controlnet": {"args": [a1111_unit(enabled=False)]}}
    r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": off})
    assert r.status_code == 200 and "ControlNet 0" not in decode_png(r.json()["images"][0]).text["parameters"]


@pytest.mark.parametrize(
    "fields, field, message",
    [
        (
            dict(model="control_sdxl_canny"),
            "args[0].model",
            "unknown ControlNet 'control_sdxl_canny'; this server has: edges",
        ),
        (dict(module="scribble_hed"), "args[0].module", "unknown preprocessor 'scribble_hed'"),
        (dict(image="not base64!"), "args[0].image", ""),
        (dict(control_mode=3), "args[0].control_mode", "unknown control mode 3"),
        (dict(resize_mode="Stretch"), "args[0].resize_mode", "unknown resize mode"),
        (dict(weight="heavy"), "args[0].weight", ""),
        (
            dict(guidance_start=0.9, guidance_end=0.5),
            "alwayson_scripts.ControlNet",
            "start 0.9 must be below",
        ),
    ],
)
def test_a1111_bad_units_name_the_field(client, fields, field, message):
    body = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64}
    r = client.post(
        "/sdapi/v1/txt2img",
        json={**body, "alwayson_scripts": {"ControlNet": {"args": [a1111_unit(**fields)]}}},
    )
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert field in detail.split(":")[0] and message in detail, detail


@pytest.mark.parametrize(
    "mode, key",
    [(2, "control"), ("My prompt is more important", "prompt"), ("controlnet is more important", "control")],
)
def test_a1111_control_modes(client, pipe, mode, key):
    """sd-webui-controlnet's control_mode, by number or name, is its weighting (control_mode= of the pipeline)."""
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3}
    unit = a1111_unit(control_mode=mode, module="none")
    r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["images"][0])
    name = {"prompt": "My prompt is more important", "control": "ControlNet is more important"}[key]
    assert f'Control Mode: {name}"' in image.text["parameters"]
    ours = pipe(
        "a cat", height=64, width=64, num_inference_steps=2, seed=3, control_image=photo(96, 96).resize((64, 64), Image.LANCZOS),
        controlnet="edges", controlnet_conditioning_scale=0.7, control_guidance_end=0.9, control_mode=key,
    ).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ours))


def test_a1111_other_extensions_are_still_refused(client):
    body = {
        "prompt": "x",
        "steps": 1,
        "width": 32,
        "height": 32,
        "alwayson_scripts": {"ADetailer": {"args": []}},
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422 and r.json()["detail"].startswith("alwayson_scripts.ADetailer")


def test_a1111_img2img_with_a_unit(client):
    body = {
        "prompt": "a cat",
        "steps": 2,
        "seed": 3,
        "init_images": [png_b64(photo(64, 48))],
        "denoising_strength": 1.0,
    }
    unit = a1111_unit(resize_mode="Crop and Resize")
    r = client.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    assert r.status_code == 200, r.text
    assert decode_png(r.json()["images"][0]).size == (64, 48)


def test_detect(client):
    r = client.post(
        "/controlnet/detect",
        json={"controlnet_module": "canny", "controlnet_input_images": [png_b64(photo())],
              "controlnet_threshold_a": 100, "controlnet_threshold_b": 200},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    edges = decode_png(r.json()["images"][0])
    assert np.array_equal(np.asarray(edges), np.asarray(pipe_canny(photo())))
    r = client.post(
        "/controlnet/detect", json={"controlnet_module": "hed", "controlnet_input_images": [png_b64(photo())]}
    )
    assert r.status_code == 422 and r.json()["detail"].startswith("controlnet_module")


def test_openai_controlnet_field(client):
    body = {"prompt": "a cat", "size": "64x64", "steps": 2, "seed": 3}
    unit = {"model": "edges", "image": png_b64(photo()), "scale": 0.7, "preprocess": "canny"}
    r = client.post("/v1/images/generations", json={**body, "controlnet": [unit]})
    assert r.status_code == 200, r.text
    assert (
        'ControlNet 0: "Module: canny, Model: edges'
        in decode_png(r.json()["data"][0]["b64_json"]).text["parameters"]
    )
    r = client.post("/v1/images/generations", json={**body, "controlnet": [{**unit, "model": "depth"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "controlnet[0].model", r.text
    r = client.post("/v1/images/generations", json={**body, "controlnet": [{**unit, "preprocess": "hed"}]})
    assert r.status_code == 400 and "unknown preprocessor 'hed'" in r.json()["error"]["message"], r.text
    r = client.post(
        "/v1/images/generations",
        json={**body, "controlnet": [{**unit, "control_mode": "prompt"}], "response_format": "b64_json"},
    )
    assert r.status_code == 200, r.text
    assert (
        "Control Mode: My prompt is more important"
        in decode_png(r.json()["data"][0]["b64_json"]).text["parameters"]
    )
    r = client.post("/v1/images/generations", json={**body, "controlnet": [unit], "control_guess_mode": True})
    assert r.status_code == 200, r.text
    assert "Guess Mode: True" in decode_png(r.json()["data"][0]["b64_json"]).text["parameters"]
    r = client.post(
        "/v1/images/generations",
        json={**body, "controlnet": [{**unit, "control_mode": "control"}], "control_guess_mode": True},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "control_guess_mode", r.text
    r = client.post("/v1/images/generations", json={**body, "controlnet": [{**unit, "control_mode": "soft"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "controlnet[0].control_mode", r.text


# ------------------------------------------------------------------------------------------------ batch


def test_batch_jobs_with_a_controlnet(pipe, controlnet_dir, tmp_path):
    import json

    from kolors.batch import run

    photo().save(tmp_path / "photo.png")
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"prompt": "a cat", "id": "cn", "seed": 3, "controlnet": "edges", "control_image": str(tmp_path / "photo.png"),
         "control_scale": 0.7, "control_preprocess": "canny"},
        {"prompt": "a cat", "id": "plain"},
        {"prompt": "a cat", "control_image": str(tmp_path / "photo.png")},
        {"prompt": "a cat", "controlnet": "edges", "control_image": str(tmp_path / "photo.png"), "control_scale": "x"},
        {"prompt": "a cat", "id": "guess", "seed": 3, "controlnet": "edges", "control_image": str(tmp_path / "photo.png"),
         "control_guess_mode": "true"},
        {"prompt": "a cat", "id": "soft", "seed": 3, "controlnet": "edges", "control_image": str(tmp_path / "photo.png"),
         "control_mode": "prompt"},
    ]  # fmt: skip
    jobs.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    summary = run(jobs, out, pipe=pipe, defaults=dict(steps=2, width=64, height=64), progress=False)
    assert [b.line for b in summary.bad_lines] == [3, 4]
    assert "need a controlnet" in summary.bad_lines[0].message
    assert "control_scale must be a number" in summary.bad_lines[1].message
    same = pipe(
        "a cat", height=64, width=64, num_inference_steps=2, seed=3, control_image=pipe_canny(photo()),
        controlnet="edges", controlnet_conditioning_scale=0.7,
    ).images[0]  # fmt: skip
    made = Image.open(out / "cn-0.png")
    assert np.array_equal(np.asarray(made.convert("RGB")), np.asarray(same))
    assert 'ControlNet 0: "Module: canny, Model: edges, Weight: 0.7' in made.text["parameters"]
    assert "ControlNet" not in Image.open(out / "plain-0.png").text["parameters"]
    rows = {r["file"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert rows["cn-0.png"]["controlnet"] == "edges" and "controlnet" not in rows["plain-0.png"]
    again = run(jobs, out, pipe=pipe, defaults=dict(steps=2, width=64, height=64), progress=False)
    assert again.done == 0 and again.skipped == 4  # resumed: nothing made twice
    call = dict(height=64, width=64, num_inference_steps=2, seed=3, control_image=photo(), controlnet="edges")
    for job, kwargs in (("guess", dict(guess_mode=True)), ("soft", dict(control_mode="prompt"))):
        same = pipe("a cat", **call, controlnet_conditioning_scale=0.7, **kwargs).images[0]
        made = Image.open(out / f"{job}-0.png")
        assert np.array_equal(np.asarray(made.convert("RGB")), np.asarray(same)), job
    assert "Guess Mode: True" in Image.open(out / "guess-0.png").text["parameters"]
    assert (
        rows["soft-0.png"]["control_mode"] == "prompt" and rows["guess-0.png"]["control_guess_mode"] is True
    )


def test_a1111_body_as_webuiapi_sends_it(client):
    """The unit exactly as the webuiapi package's ControlNetUnit(...).to_dict() writes it (its defaults: input_image,
    mask None, Resize and Fill, thresholds 0.1, control_mode 0), under the "ControlNet" script key."""
    unit = {
        "input_image": png_b64(photo(96, 64)),
        "mask": None,
        "module": "canny",
        "model": "edges [a1b2c3d4]",
        "weight": 1.0,
        "resize_mode": "Resize and Fill",
        "lowvram": False,
        "processor_res": 512,
        "threshold_a": 0.1,
        "threshold_b": 0.1,
        "guidance": 1.0,
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "control_mode": 0,
        "pixel_perfect": False,
    }
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3}
    r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["images"][0])
    assert image.size == (64, 64)
    assert 'ControlNet 0: "Module: canny, Model: edges, Weight: 1.0' in image.text["parameters"]


def test_every_sampler_takes_a_controlnet(pipe):
    """The window is by the step whose sigma a sampler evaluates: heun's two evaluations of a step alike."""
    kwargs = dict(height=64, width=64, num_inference_steps=2, seed=3, output_type="np", sampler="heun")
    plain = pipe("a cat", **kwargs).images
    late = pipe("a cat", **kwargs, control_image=pipe_canny(photo()), control_guidance_start=0.5).images
    early = pipe("a cat", **kwargs, control_image=pipe_canny(photo()), control_guidance_end=0.5).images
    assert np.abs(late - plain).max() > 0 and np.abs(early - plain).max() > 0
    assert np.abs(late - early).max() > 0


def test_the_webuiapi_package_gets_images_with_a_controlnet_unit_and_an_inpaint_mask(pipe):
    """The `webuiapi` client, as A1111 users script it, against kolors over real HTTP."""
    webuiapi = pytest.importorskip("webuiapi")
    from kolors.serve import ServerConfig, create_app
    from tests.server_helpers import live_server

    with live_server(create_app(pipe, ServerConfig(max_steps=4, max_width=128, max_height=128))) as base:
        api = webuiapi.WebUIApi(baseurl=f"{base}/sdapi/v1", sampler="Euler", steps=2)
        unit = webuiapi.ControlNetUnit(image=photo(), module="canny", model="edges", weight=0.7)
        result = api.txt2img(prompt="a cat", width=64, height=64, seed=3, controlnet_units=[unit])
        assert result.image.size == (64, 64)
        assert 'ControlNet 0: "Module: canny, Model: edges, Weight: 0.7' in result.info["infotexts"][0]

        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        result = api.img2img(
            images=[photo()],
            mask_image=mask,
            prompt="a hat",
            seed=4,
            denoising_strength=0.9,
            mask_blur=0,
            width=64,
            height=64,
        )
        assert result.image.size == (64, 64)
        assert "Mask blur: 0" in result.info["infotexts"][0]
