"""The web page's reference-image slot and strength slider, and its face slot, in the headless browser of
tests/test_webui.py, against a server started with the tiny IP-Adapter and the tiny FaceID adapter (insightface:
the stub of tests/test_faceid.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_faceid import StubFaceAnalysis, face_embedding, faceid_dir, insightface  # noqa: F401  (fixtures)
from tests.test_webui import (  # noqa: F401  (skips the module without a browser)
    CHROMIUM_ARGS,
    TIMEOUT_MS,
    Server,
    download_newest,
    generate,
    open_page,
    set_number,
    sync_api,
    wait_for_samplers,
)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, reference_pipeline, faceid_dir, tmp_path_factory):  # noqa: F811
    from kolors.pipeline import KolorsPipeline
    from tests.test_clip_vision import save_tiny_clip
    from tests.test_ip_adapter import plus_state

    root = tmp_path_factory.mktemp("web-ipa")
    save_tiny_clip(root / "image_encoder", seed=3)
    torch.save(plus_state(reference_pipeline.unet), root / "ip_adapter_plus_general.bin")
    pipe = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu", ip_adapter=root)
    pipe.load_faceid(faceid_dir[0])
    return pipe


@pytest.fixture(scope="module")
def server(pipe):
    from kolors.serve import ServerConfig, create_app

    s = Server(create_app(pipe, ServerConfig(max_width=256, max_height=256, max_steps=8)))
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from tests.test_webui import CHROMIUM

    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            accept_downloads=True,
        )
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


def test_reference_image_and_strength(browser, server, tmp_path):
    page = open_page(browser, server.url)
    wait_for_samplers(page)
    ref = tmp_path / "ref.png"
    Image.new("RGB", (40, 30), (30, 120, 200)).save(ref)
    page.wait_for_selector("#ip-fieldset:not([hidden])")  # the server loaded an IP-Adapter
    page.fill("#prompt", "a cat")
    assert page.is_disabled("#ip-scale")
    page.set_input_files("#ip-image", ref)
    page.wait_for_selector("#ip-box:not([hidden])")
    page.eval_on_selector("#ip-scale", "el => { el.value = '0.7'; el.dispatchEvent(new Event('input')); }")
    assert page.inner_text("#ip-scale-value") == "0.70"
    set_number(page, "#steps", 2)
    set_number(page, "#width", 64)
    set_number(page, "#height", 64)
    generate(page)
    assert page.is_hidden("#error"), page.inner_text("#error")
    with Image.open(download_newest(page, tmp_path)) as im:
        assert "IP-Adapter: ip_adapter_plus_general, IP-Adapter scale: 0.7" in im.text["parameters"]
    page.click("#clear-ip")
    assert page.is_hidden("#ip-box") and page.is_disabled("#ip-scale")
    assert not page.errors
    page.close()


def test_face_slot(browser, server, pipe, insightface, tmp_path):  # noqa: F811
    StubFaceAnalysis.faces = [{"bbox": np.array([4.0, 4.0, 36.0, 28.0]), "embedding": face_embedding(3)}]
    pipe.face_models = insightface
    page = open_page(browser, server.url)
    wait_for_samplers(page)
    page.wait_for_selector("#face-fieldset:not([hidden])")  # the server loaded a FaceID adapter
    face = tmp_path / "face.png"
    Image.new("RGB", (40, 30), (200, 150, 120)).save(face)
    page.fill("#prompt", "a portrait")
    assert page.is_disabled("#face-scale")
    page.set_input_files("#face-image", face)
    page.wait_for_selector("#face-box:not([hidden])")
    page.eval_on_selector("#face-scale", "el => { el.value = '0.6'; el.dispatchEvent(new Event('input')); }")
    assert page.inner_text("#face-scale-value") == "0.60"
    set_number(page, "#steps", 2)
    set_number(page, "#width", 64)
    set_number(page, "#height", 64)
    generate(page)
    assert page.is_hidden("#error"), page.inner_text("#error")
    with Image.open(download_newest(page, tmp_path)) as im:
        assert "FaceID: ipa-faceid-plus, FaceID scale: 0.6" in im.text["parameters"]
        assert "IP-Adapter" not in im.text["parameters"]
    page.click("#clear-face")
    assert page.is_hidden("#face-box") and page.is_disabled("#face-scale")
    assert not page.errors
    page.close()
    pipe.face_models = None
