"""The HTTP API in-process on the tiny model: AUTOMATIC1111 and OpenAI shapes, PNG parameters, the API key,
and a 4xx naming the field for every kind of malformed request."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from kolors import KolorsPipeline  # noqa: E402
from kolors.cli import main  # noqa: E402
from kolors.errors import KolorsError  # noqa: E402
from kolors.request import MAX_SEED  # noqa: E402
from kolors.serve import ServerConfig, check_bind, create_app  # noqa: E402
from tests.server_helpers import decode_png, png_b64  # noqa: E402

LIMITS = dict(
    max_steps=4, max_width=128, max_height=128, max_n=4, max_upload_mb=0.25, max_upload_pixels=160 * 160
)
KEY = "test-key-123"
BASE = "http://127.0.0.1:7860"  # a loopback Host, as a browser on this machine sends


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, ServerConfig(**LIMITS)), base_url=BASE) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(pipe):
    with TestClient(create_app(pipe, ServerConfig(api_key=KEY, **LIMITS)), base_url=BASE) as c:
        yield c


def txt2img(client, **body):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "一只瓢虫, macro photo", "steps": 2, **body})
    assert r.status_code == 200, r.text
    return r.json()


def padded_png(size: int) -> str:
    """A tiny image in a PNG of more than `size` bytes (a big text chunk)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("padding", "x" * size)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ AUTOMATIC1111


def test_txt2img_matches_the_pipeline_and_carries_its_parameters(client, pipe):
    body = txt2img(client, seed=66, width=64, height=48, cfg_scale=4.5, negative_prompt="blurry")
    info = json.loads(body["info"])  # a JSON string, as AUTOMATIC1111 sends it
    image = decode_png(body["images"][0])
    expected_text = (
        "一只瓢虫, macro photo\nNegative prompt: blurry\nSteps: 2, Sampler: euler, CFG scale: 4.5, Seed: 66, "
        f"Size: 64x48, Model: {pipe.name}"
    )
    assert image.size == (64, 48)
    assert image.text["parameters"] == expected_text
    assert info["infotexts"] == [expected_text]
    assert info["all_seeds"] == [66] and info["seed"] == 66
    assert info["all_prompts"] == ["一只瓢虫, macro photo"]
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 48, 2, 4.5)
    assert info["sampler_name"] == "Euler"
    assert body["parameters"]["seed"] == 66 and body["parameters"]["negative_prompt"] == "blurry"
    direct = pipe(
        "一只瓢虫, macro photo",
        negative_prompt="blurry",
        height=48,
        width=64,
        num_inference_steps=2,
        guidance_scale=4.5,
        seed=66,
    ).images[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(direct))


def test_random_seed_batches_and_iterations(client):
    body = txt2img(client, seed=-1, batch_size=2, n_iter=2, width=32, height=32)
    info = json.loads(body["info"])
    seeds = info["all_seeds"]
    assert len(body["images"]) == 4 and len(info["infotexts"]) == 4
    assert 0 <= seeds[0] <= MAX_SEED and seeds == [seeds[0] + i for i in range(4)]
    for b64, seed, text in zip(body["images"], seeds, info["infotexts"], strict=True):
        assert f"Seed: {seed}," in text and decode_png(b64).text["parameters"] == text
    assert body["parameters"]["seed"] == -1  # the request as sent


def test_default_size_is_the_models_native_size(client, pipe):
    image = decode_png(txt2img(client, seed=1)["images"][0])
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert image.size == (native, native)


@pytest.mark.parametrize("name", ["DPM++ 2M Karras", "dpmpp-2m", "DPM++ 2M"])
def test_sampler_names_and_aliases(client, name):
    info = json.loads(txt2img(client, seed=3, width=32, height=32, sampler_name=name)["info"])
    assert "Sampler: dpmpp-2m" in info["infotexts"][0] and info["sampler_name"] == "DPM++ 2M Karras"


@pytest.mark.parametrize(
    ("fields", "sampler", "schedule"),
    [
        ({"sampler_name": "Euler a"}, "euler-a", None),
        ({"sampler_name": "k_euler_a"}, "euler-a", None),
        ({"sampler_name": "DPM++ 2M SDE Karras"}, "dpmpp-2m-sde", None),
        ({"sampler_name": "unipc"}, "unipc", None),
        ({"sampler_name": "Euler", "scheduler": "Karras"}, "euler", "karras"),
        ({"sampler_name": "Heun Karras"}, "heun", "karras"),
        ({"sampler_name": "DDIM", "scheduler": "Automatic"}, "ddim", None),
    ],
)
def test_every_sampler_and_schedule_by_its_a1111_name(client, pipe, fields, sampler, schedule):
    """The image is the pipeline's for the sampler and schedule the names mean, and its parameters say them."""
    body = txt2img(client, seed=5, width=32, height=32, steps=2, **fields)
    info = json.loads(body["info"])
    text = info["infotexts"][0]
    assert f"Sampler: {sampler}," in text and (f"Schedule type: {schedule}" in text) == (schedule is not None)
    kwargs = dict(height=32, width=32, num_inference_steps=2, sampler=sampler, schedule=schedule, seed=[5])
    expected = pipe("一只瓢虫, macro photo", **kwargs)
    diff = np.abs(np.asarray(decode_png(body["images"][0]), dtype=np.int16) - np.asarray(expected.images[0]))
    assert diff.max() <= 1


def test_samplers_and_schedulers_are_listed(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert [s["name"] for s in samplers] == [
        "Euler",
        "Euler a",
        "Heun",
        "DPM++ 2M Karras",
        "DPM++ 2M SDE Karras",
        "UniPC",
        "DDIM",
        "LCM",
    ]
    assert "DPM++ 2M" in samplers[3]["aliases"] and "k_euler_a" in samplers[1]["aliases"]
    labels = [s["label"] for s in client.get("/sdapi/v1/schedulers").json()]
    assert labels == ["Automatic", "Karras", "Exponential"]


def test_unknown_fields_are_ignored_as_a1111_does(client):
    body = txt2img(
        client,
        seed=5,
        width=32,
        height=32,
        enable_hr=False,
        restore_faces=False,
        styles=[],
        override_settings={"CLIP_stop_at_last_layers": 2},  # settings other than the checkpoint: ignored
        save_images=True,
        send_images=True,
        do_not_save_grid=True,
        script_args=[],
        scheduler="Automatic",
        negative_prompt=None,
    )
    assert len(body["images"]) == 1


@pytest.mark.parametrize("prefix", [False, True])
def test_img2img_base64_with_or_without_data_prefix(client, prefix):
    init = noise_image(72, 48)
    r = client.post(
        "/sdapi/v1/img2img",
        json={
            "init_images": [png_b64(init, prefix)],
            "prompt": "oil painting",
            "steps": 4,
            "seed": 9,
            "denoising_strength": 0.5,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    image = decode_png(body["images"][0])
    assert image.size == (72, 48)  # the init image's size when no width/height is given
    assert info["denoising_strength"] == 0.5
    assert info["infotexts"][0].endswith("Size: 72x48, Model: Kolors-tiny, Denoising strength: 0.5")
    assert body["parameters"]["init_images"] is None  # not echoed back unless include_init_images


def test_img2img_resizes_to_width_and_height(client):
    r = client.post(
        "/sdapi/v1/img2img",
        json={
            "init_images": [png_b64(noise_image(100, 75))],
            "steps": 2,
            "width": 48,
            "height": 32,
            "include_init_images": True,
        },
    )
    assert r.status_code == 200, r.text
    assert decode_png(r.json()["images"][0]).size == (48, 32)
    assert r.json()["parameters"]["init_images"]


def test_progress_samplers_models_and_options_shapes(client, pipe):
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["progress"] == 0 and progress["eta_relative"] == 0 and progress["current_image"] is None
    assert progress["state"]["job_count"] == 0 and progress["state"]["interrupted"] is False
    samplers = client.get("/sdapi/v1/samplers").json()
    assert [s["name"] for s in samplers][:1] == ["Euler"] and "DPM++ 2M Karras" in [
        s["name"] for s in samplers
    ]
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    assert client.get("/sdapi/v1/sd-models").json()[0]["model_name"] == pipe.name
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == pipe.name
    assert (
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": pipe.name, "x": 1}).status_code == 200
    )
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "v1-5-pruned.safetensors"})
    assert r.status_code == 422 and "sd_model_checkpoint" in r.json()["detail"]
    assert client.post("/sdapi/v1/interrupt").json() == {}  # nothing running: harmless


# ------------------------------------------------------------------------------------------------ OpenAI


def test_openai_generation_b64_and_url(client, pipe):
    r = client.post(
        "/v1/images/generations",
        json={
            "prompt": "a red fox",
            "n": 2,
            "size": "48x32",
            "model": "kolors",
            "seed": 11,
            "steps": 2,
            "guidance_scale": 3.0,
            "negative_prompt": "dark",
            "sampler": "dpmpp-2m",
            "quality": "hd",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == "48x32" and isinstance(body["created"], int)
    assert [d["seed"] for d in body["data"]] == [11, 12]
    image = decode_png(body["data"][1]["b64_json"])
    assert image.size == (48, 32)
    assert image.text["parameters"] == (
        "a red fox\nNegative prompt: dark\nSteps: 2, Sampler: dpmpp-2m, CFG scale: 3.0, Seed: 12, "
        f"Size: 48x32, Model: {pipe.name}"
    )
    r = client.post(
        "/v1/images/generations",
        json={
            "prompt": "a red fox",
            "size": "32x32",
            "steps": 1,
            "response_format": "url",
            "model": pipe.name,
        },
    )
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    assert "b64_json" not in item and item["url"].startswith(f"{BASE}/v1/files/")
    served = client.get(item["url"])
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(served.content)).size == (32, 32)
    missing = client.get("/v1/files/nothing-here.png")
    assert missing.status_code == 404 and "expired" in missing.json()["error"]["message"]


def test_openai_edits_is_image_to_image(client):
    buf = io.BytesIO()
    noise_image(64, 40).save(buf, format="JPEG")
    r = client.post(
        "/v1/images/edits",
        files={"image": ("photo.jpg", buf.getvalue(), "image/jpeg")},
        data={"prompt": "watercolor", "n": "2", "steps": "3", "strength": "0.6", "seed": "4"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == "64x40" and len(body["data"]) == 2
    assert "Denoising strength: 0.6" in decode_png(body["data"][0]["b64_json"]).text["parameters"]
    r = client.post(
        "/v1/images/edits",
        files={"image[]": ("photo.jpg", buf.getvalue(), "image/jpeg")},
        data={"prompt": "watercolor", "steps": "1", "size": "32x32"},
    )
    assert r.status_code == 200, r.text
    assert decode_png(r.json()["data"][0]["b64_json"]).size == (32, 32)


def test_models_lists_the_loaded_model(client, pipe):
    assert client.get("/v1/models").json()["data"][0]["id"] == pipe.name


# ------------------------------------------------------------------------------------------------ key, pages


def test_api_key_guards_every_api_call_but_not_the_open_routes(keyed):
    r = keyed.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in r.json()["detail"]
    wrong = {"Authorization": "Bearer not-the-key"}
    assert keyed.get("/sdapi/v1/progress", headers=wrong).status_code == 401
    r = keyed.get("/v1/models", headers=wrong)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert keyed.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    r = keyed.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "x", "steps": 1, "width": 32, "height": 32},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 200
    for path in ("/", "/health", "/ready", "/docs", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path


def test_index_page_and_static_files(client, monkeypatch, tmp_path):
    from kolors.serve import web

    page = web.WEB_DIR / "index.html"
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    if page.is_file():
        assert r.text == page.read_text(encoding="utf-8")
    monkeypatch.setattr(web, "WEB_DIR", tmp_path)
    assert "/docs" in client.get("/").text  # the placeholder when the page is absent
    (tmp_path / "app.js").write_text("console.log(1)")
    assert client.get("/web/app.js").text == "console.log(1)"
    assert client.get("/web/missing.js").status_code == 404
    assert client.get("/web/%2e%2e/server.py").status_code == 404  # nothing outside the web folder


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["ready"] is True and ready["queued"] == 0


# ------------------------------------------------------------------------------------------------ bad input

A1111_BAD = [
    ({"width": 65}, "width"),
    ({"height": 12}, "height"),
    ({"width": 256}, "width"),  # over the server's limit
    ({"steps": 0}, "steps"),
    ({"steps": 5}, "steps"),  # over the server's limit
    ({"steps": "many"}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"cfg_scale": float("nan")}, "cfg_scale"),
    ({"cfg_scale": -1}, "cfg_scale"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 3, "n_iter": 2}, "batch_size"),  # 6 images: over the server's limit
    ({"n_iter": -1}, "n_iter"),
    ({"sampler_name": "Euler z"}, "sampler_name"),
    ({"scheduler": "Uniform"}, "scheduler"),
    ({"seed": -2}, "seed"),
    ({"seed": MAX_SEED, "batch_size": 2}, "seed"),
    ({"seed": "lucky"}, "seed"),
    ({"prompt": 123}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
]


@pytest.mark.parametrize(("fields", "field"), A1111_BAD)
def test_txt2img_bad_input_is_422_naming_the_field(client, fields, field):
    body = json.dumps({"prompt": "x", "steps": 2, **fields})  # json.dumps writes NaN, as some clients do
    r = client.post("/sdapi/v1/txt2img", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"{field}:"), r.json()


def test_bodies_that_are_not_objects(client):
    for kwargs in (
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        {"json": [1, 2]},
        {},
    ):
        r = client.post("/sdapi/v1/txt2img", **kwargs)
        assert r.status_code == 422 and r.json()["detail"].startswith("body:"), r.text


def test_img2img_bad_images(client):
    good = png_b64(noise_image(32, 32))
    cases = [
        ({"init_images": []}, 422, "init_images"),
        ({}, 422, "init_images"),
        ({"init_images": ["###"]}, 422, "init_images"),
        ({"init_images": [base64.b64encode(b"GIF89a but not really").decode()]}, 422, "init_images"),
        ({"init_images": ["data:image/png,abc"]}, 422, "init_images"),
        ({"init_images": [good], "mask": "###"}, 422, "mask"),
        ({"init_images": [good], "mask": png_b64(Image.new("L", (32, 32), 128))}, 422, "mask"),  # all grey
        ({"init_images": [good], "mask": good, "inpainting_fill": 4}, 422, "inpainting_fill"),
        ({"init_images": [good], "denoising_strength": 1.5}, 422, "denoising_strength"),
        ({"init_images": [good], "width": 30}, 422, "width"),
        ({"init_images": [png_b64(noise_image(4, 4))]}, 422, "init_images"),  # too small
        ({"init_images": [png_b64(noise_image(200, 150))]}, 422, "init_images"),  # over the pixel limit
        ({"init_images": [png_b64(Image.new("RGB", (136, 136)))]}, 422, "init_images"),  # over max width
        ({"init_images": [padded_png(300_000)]}, 413, "init_images"),  # over the byte limit
    ]
    for fields, status, field in cases:
        r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, **fields})
        assert r.status_code == status, (fields.keys(), r.text)
        assert r.json()["detail"].startswith(f"{field}:"), r.json()


def test_a_body_over_the_upload_limit_is_refused_before_parsing(client):
    huge = "A" * (2 * 2**20)  # past the 0.25 MB upload limit even as base64 JSON
    r = client.post("/sdapi/v1/img2img", json={"init_images": [huge]})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = client.post("/v1/images/generations", json={"prompt": huge})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


OPENAI_BAD = [
    ({"size": "64x65"}, "size"),
    ({"size": "big"}, "size"),
    ({"size": "1024x1024"}, "size"),  # over the server's limit
    ({"n": 0}, "n"),
    ({"n": -3}, "n"),
    ({"n": 5}, "n"),  # over the server's limit
    ({"n": "two"}, "n"),
    ({"response_format": "gif"}, "response_format"),
    ({"model": "sd_xl_base_1.0"}, "model"),
    ({"stream": True}, "stream"),
    ({"steps": 0}, "steps"),
    ({"sampler": "ddpm"}, "sampler"),
    ({"schedule": "polyexponential"}, "schedule"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"seed": -2}, "seed"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": None}, "prompt"),
]


@pytest.mark.parametrize(("fields", "field"), OPENAI_BAD)
def test_openai_bad_input_is_400_in_openais_shape(client, fields, field):
    r = client.post("/v1/images/generations", json={"prompt": "x", "steps": 1, "size": "32x32", **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == field
    assert error["message"].startswith(f"{field}:")


def test_openai_edits_bad_input(client):
    png = io.BytesIO()
    noise_image(32, 32).save(png, format="PNG")
    image = {"image": ("a.png", png.getvalue(), "image/png")}
    small_mask = io.BytesIO()
    Image.new("RGBA", (16, 16)).save(small_mask, format="PNG")  # not the image's size
    cases = [
        ({}, {"prompt": "x"}, "image"),
        ({"image": ("a.png", b"not an image", "image/png")}, {"prompt": "x"}, "image"),
        ({**image, "mask": ("m.png", small_mask.getvalue(), "image/png")}, {"prompt": "x"}, "mask"),
        ({**image, "mask": ("m.png", b"no", "image/png")}, {"prompt": "x"}, "mask"),
        (
            {**image, "mask": ("m.png", png.getvalue(), "image/png")},
            {"prompt": "x", "masked_content": "x"},
            "masked_content",
        ),
        (image, {}, "prompt"),
        (image, {"prompt": "x", "n": "0"}, "n"),
        (image, {"prompt": "x", "strength": "2"}, "strength"),
        (image, {"prompt": "x", "size": "30x30"}, "size"),
        (image, {"prompt": "x", "model": "flux-dev"}, "model"),
    ]
    for files, data, field in cases:
        r = client.post("/v1/images/edits", files=files or None, data=data)
        assert r.status_code == 400, (field, r.text)
        assert r.json()["error"]["param"] == field, r.json()


# ------------------------------------------------------------------------------------------------ serving


def test_refuses_to_listen_beyond_localhost_without_a_key():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind(host, None)
    check_bind("0.0.0.0", "k")
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        with pytest.raises(KolorsError, match="--api-key"):
            check_bind(host, None)


def test_serve_command_checks_before_loading(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("KOLORS_API_KEY", raising=False)
    assert main(["serve", "--model", str(tmp_path / "nope"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kolors: error: refusing to listen on 0.0.0.0") and "\n" not in err
    assert main(["serve", "--model", str(tmp_path / "nope"), "--max-width", "100"]) == 2
    assert "multiples of 8" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "nope"), "--queue-size", "0"]) == 2
    assert "queue-size" in capsys.readouterr().err


def test_url_images_expire(monkeypatch):
    from kolors.serve import state

    clock = [1000.0]
    monkeypatch.setattr(state.time, "monotonic", lambda: clock[0])
    store = state.FileStore(ttl=60, max_bytes=25)
    first = store.put(b"0123456789")
    assert store.get(first) == b"0123456789"
    clock[0] += 61
    assert store.get(first) is None
    a, b, c = store.put(b"a" * 10), store.put(b"b" * 10), store.put(b"c" * 10)
    assert store.get(a) is None and store.get(b) and store.get(c)  # past max_bytes, the oldest go first


def test_out_of_memory_answers_503_and_a_stopped_server_503(pipe):
    class OutOfMemory:
        def __init__(self, pipe):
            self._pipe, self.calls = pipe, 0

        def __getattr__(self, name):
            return getattr(self._pipe, name)

        def __call__(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return self._pipe(*args, **kwargs)

    app = create_app(OutOfMemory(pipe), ServerConfig(**LIMITS))
    client = TestClient(app, base_url=BASE)
    body = {"prompt": "x", "steps": 1, "width": 32, "height": 32}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 503 and "out of memory" in r.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200  # the worker goes on
    app.state.queue.close()
    assert client.get("/ready").status_code == 503
    r = client.post("/v1/images/generations", json={"prompt": "x", "steps": 1, "size": "32x32"})
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]


def test_the_app_serves_again_after_its_lifespan_restarts(pipe):
    """A harness may start and stop the app's lifespan more than once (schemathesis does, per test)."""
    app = create_app(pipe, ServerConfig(**LIMITS))
    for _ in range(2):
        with TestClient(app, base_url=BASE) as client:
            r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 32, "height": 32})
            assert r.status_code == 200 and client.get("/ready").json()["ready"] is True
        assert not app.state.queue.alive


# ------------------------------------------------------------------------------------------------ other sites


def test_a_keyless_server_answers_only_loopback_host_names(pipe):
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 sends Host: evil.example."""
    app = create_app(pipe, ServerConfig(allowed_hosts=("studio.lan",), **LIMITS))
    with TestClient(app, base_url="http://evil.example:7860") as c:
        for method, path in (("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/interrupt"), ("GET", "/")):
            r = c.request(method, path)
            assert r.status_code == 421 and "--allowed-host evil.example" in r.json()["detail"], path
        assert c.get("/v1/models").json()["error"]["message"].startswith("host 'evil.example'")
        for host in (
            "localhost:7860",
            "127.0.0.1",
            "[::1]:7860",
            "app.localhost",
            "127.9.9.9:1",
            "STUDIO.lan",
        ):
            assert c.get("/health", headers={"host": host}).status_code == 200, host
    app.state.queue.close()
    keyed_app = create_app(pipe, ServerConfig(api_key=KEY, **LIMITS))  # a key is what a rebinding page lacks
    with TestClient(keyed_app, base_url="http://studio.example") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/sdapi/v1/progress", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    keyed_app.state.queue.close()


def test_cross_site_state_changes_are_refused_and_no_cors(client):
    forged = [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:7860", "Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # another port or subdomain of the same site
    ]
    for headers in forged:
        r = client.post("/sdapi/v1/interrupt", headers=headers)
        assert r.status_code == 403 and "cross-site" in r.json()["detail"], headers
        r = client.post("/v1/images/generations", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["message"].startswith("cross-site"), headers
    same = {"Origin": "http://127.0.0.1:7860", "Sec-Fetch-Site": "same-origin"}
    assert client.post("/sdapi/v1/interrupt", headers=same).status_code == 200
    assert client.post("/sdapi/v1/interrupt").status_code == 200  # scripts send neither header
    # a form a page may post cross-site without a preflight is not JSON, and is not read as JSON
    r = client.post(
        "/sdapi/v1/txt2img", content='{"prompt": "x", "steps": 1}', headers={"content-type": "text/plain"}
    )
    assert r.status_code == 422
    r = client.get("/sdapi/v1/progress", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
    r = client.options(
        "/sdapi/v1/txt2img",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert not any(h.startswith("access-control-") for h in r.headers)


def test_with_a_key_the_key_is_checked_before_the_body_is_read(keyed, monkeypatch):
    from kolors.serve import http

    read = []
    monkeypatch.setattr(
        http.BodyLimit, "__call__", lambda *a: read.append(a) or (_ for _ in ()).throw(AssertionError)
    )
    r = keyed.post(
        "/sdapi/v1/img2img", content=b"{" + b"x" * 100_000, headers={"content-type": "application/json"}
    )
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and not read
    r = keyed.post(
        "/v1/images/edits", files={"image": ("a.png", b"x" * 1000, "image/png")}, data={"prompt": "x"}
    )
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error" and not read


def test_a_nul_byte_in_a_web_path_is_404(client, caplog):
    with caplog.at_level("ERROR"):
        assert client.get("/web/a%00b").status_code == 404
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_docs_work_offline(client):
    pytest.importorskip("fastapi_offline")
    for page, script in (
        ("/docs", "/docs-assets/swagger-ui-bundle.js"),
        ("/redoc", "/docs-assets/redoc.standalone.js"),
    ):
        html = client.get(page).text
        assert script in html and "cdn." not in html and "fonts.googleapis" not in html, page
        r = client.get(script)
        assert r.status_code == 200 and len(r.content) > 100_000
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200
    assert client.get("/docs-assets/..%2Fcore.py").status_code == 404


def test_requests_are_logged(client, caplog):
    with caplog.at_level("INFO", logger="kolors.server"):
        client.get("/health")
        client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 0})
    lines = [r.getMessage() for r in caplog.records if r.name == "kolors.server"]
    assert any('"GET /health" 200' in line for line in lines), lines
    assert any('"POST /sdapi/v1/txt2img" 422' in line for line in lines), lines


# ------------------------------------------------------------------------------------------------ compatibility


def test_openai_clients_with_a_hard_coded_model_are_served(pipe):
    app = create_app(pipe, ServerConfig(served_model_names=("kolors-v1", "my-alias"), **LIMITS))
    with TestClient(app, base_url=BASE) as c:
        for name in ("dall-e-2", "dall-e-3", "gpt-image-1", "my-alias", "kolors", pipe.name):
            r = c.post(
                "/v1/images/generations", json={"prompt": "x", "size": "32x32", "steps": 1, "model": name}
            )
            assert r.status_code == 200 and r.json()["model"] == "kolors-v1", (name, r.text)
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["kolors-v1", "my-alias"]
        r = c.post("/v1/images/generations", json={"prompt": "x", "model": "stable-diffusion-3"})
        assert r.status_code == 400 and "'kolors-v1'" in r.json()["error"]["message"]


def test_openai_edits_with_several_images_is_400_and_variations_are_image_to_image(client):
    png = io.BytesIO()
    noise_image(32, 24).save(png, format="PNG")
    two = [
        ("image", ("a.png", png.getvalue(), "image/png")),
        ("image", ("b.png", png.getvalue(), "image/png")),
    ]
    r = client.post("/v1/images/edits", files=two, data={"prompt": "x", "steps": "1"})
    assert r.status_code == 400 and "2 images were sent" in r.json()["error"]["message"]
    one = {"image": ("a.png", png.getvalue(), "image/png")}
    r = client.post("/v1/images/variations", files=one, data={"model": "dall-e-2", "steps": "2", "seed": "3"})
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["data"][0]["b64_json"])
    assert image.size == (32, 24) and image.text["parameters"].startswith("\nNegative prompt: ")
    assert "Denoising strength: 0.75" in image.text["parameters"]
    assert client.post("/v1/images/variations", data={"n": "1"}).json()["error"]["param"] == "image"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"enable_hr": True, "hr_scale": 2}, "enable_hr"),
        ({"alwayson_scripts": {"controlnet": {"args": [{"image": "..."}]}}}, "alwayson_scripts"),
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"override_settings": {"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"}}, "override_settings"),
        ({"restore_faces": True}, "restore_faces"),
        ({"tiling": True}, "tiling"),
    ],
)
def test_a1111_fields_that_change_the_result_are_refused(client, fields, field):
    for route in ("txt2img", "img2img"):
        body = {"prompt": "x", "steps": 1, "width": 32, "height": 32, **fields}
        if route == "img2img":
            body["init_images"] = [png_b64(noise_image(32, 32))]
        r = client.post(f"/sdapi/v1/{route}", json=body)
        assert r.status_code == 422 and r.json()["detail"].startswith(field), r.text


def test_a1111_checkpoint_naming_this_model_and_empty_extras_are_accepted(client, pipe):
    extras = {"alwayson_scripts": {}, "script_name": "", "enable_hr": False}
    body = txt2img(
        client, width=32, height=32, override_settings={"sd_model_checkpoint": pipe.name}, **extras
    )
    assert len(body["images"]) == 1


def test_health_answers_while_large_uploads_decode(client):
    """Three 20 MB base64 bodies (of an image over the pixel limit, so each answers 413/422 after decoding):
    /health stays under 100 ms meanwhile, because the base64 is decoded off the loop in pieces."""
    import threading
    import time

    from kolors.serve.schemas import decode_base64

    big = base64.b64encode(np.random.default_rng(0).bytes(15 * 2**20)).decode()
    cfg = ServerConfig(max_upload_mb=20)
    assert decode_base64(big, cfg, "x") == base64.b64decode(big)  # pieces join to the same bytes
    spaced = " \n".join(big[:4000][i : i + 76] for i in range(0, 4000, 76))
    assert decode_base64(spaced, cfg, "x") == base64.b64decode(big[:4000])
    with pytest.raises(Exception, match="not valid base64"):
        decode_base64(big[:-1], cfg, "x")

    stop, worst = threading.Event(), []

    def decode_many():
        while not stop.is_set():
            decode_base64(big, cfg, "x")

    threads = [threading.Thread(target=decode_many) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        for _ in range(10):
            t0 = time.perf_counter()
            assert client.get("/health").status_code == 200
            worst.append(time.perf_counter() - t0)
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    # Typically under 100 ms; the slowest of ten is allowed the noise of a shared 2-core machine (before the
    # change a single 20 MB decode held the GIL, and the loop, for about a second).
    assert sorted(worst)[len(worst) // 2] < 0.1 and max(worst) < 0.5, worst
