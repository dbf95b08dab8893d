"""The web page's ControlNet slot in a real headless browser (see tests/test_webui.py): model, preprocessor with
its preview, scale; the image comes back with the unit in its parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kolors.pipeline import KolorsPipeline  # noqa: E402
from kolors.serve import ServerConfig, create_app  # noqa: E402
from tests.test_controlnet import make_controlnet  # noqa: E402
from tests.test_webui import (  # noqa: F401 (browser is a fixture)
    Server,
    browser,
    download_newest,
    generate,
    open_page,
    set_number,
    wait_for_samplers,
)


@pytest.fixture(scope="module")
def server(tiny_model_dir, reference_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("web-cn") / "edges"
    make_controlnet(reference_pipeline.unet, 10).save_pretrained(path)
    pipe = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    pipe.load_controlnet(path)
    s = Server(create_app(pipe, ServerConfig(max_width=256, max_height=256, max_steps=8)))
    yield s
    s.close()


def test_control_image_slot(browser, server, tmp_path):  # noqa: F811
    page = open_page(browser, server.url)
    wait_for_samplers(page)
    page.wait_for_selector("#control-box:not([hidden])")
    assert page.eval_on_selector("#control-model", "s => [...s.options].map(o => o.value)") == ["edges"]
    photo = np.zeros((64, 64, 3), dtype=np.uint8)
    photo[16:48, 20:44] = (220, 160, 60)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    page.set_input_files("#control-image", tmp_path / "photo.png")
    page.select_option("#control-module", "canny")
    page.select_option("#control-mode", "My prompt is more important")
    # The preview is the server's canny map: white edges on black.
    page.wait_for_function("document.querySelector('#control-preview').src.includes('base64,iVBOR')")
    page.fill("#prompt", "a cat")
    set_number(page, "#width", 64)
    set_number(page, "#height", 64)
    set_number(page, "#steps", 2)
    generate(page)
    assert page.is_hidden("#error"), page.inner_text("#error")
    with Image.open(download_newest(page, tmp_path)) as im:
        assert 'ControlNet 0: "Module: canny, Model: edges, Weight: 0.7' in im.text["parameters"]
        assert 'Control Mode: My prompt is more important"' in im.text["parameters"]
    assert not page.errors, page.errors
    page.close()
