"""The web page's LoRA picker in a real headless browser (tests/test_webui.py's setup): a server with a
--lora-dir lists its LoRAs; picking one writes A1111's <lora:NAME:0.8> tag into the prompt, and the image it
makes records the LoRA in its parameters, as the A1111 route does (tests/test_lora_faces.py)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.test_webui import (  # noqa: F401  (skips the module without a browser; the browser fixture)
    Server,
    browser,
    download_newest,
    generate,
    open_page,
    set_number,
    wait_for_samplers,
)

pytest.importorskip("peft")
from tests.test_lora_faces import lora_dir, short_hash  # noqa: E402, F401  (fixture)


@pytest.fixture(scope="module")
def server(tiny_model_dir, lora_dir):  # noqa: F811
    from kolors.pipeline import KolorsPipeline
    from kolors.serve import ServerConfig, create_app

    pipe = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    config = ServerConfig(max_width=256, max_height=256, max_steps=8, lora_dir=str(lora_dir))
    s = Server(create_app(pipe, config))
    yield s
    s.close()


def test_lora_picker_writes_the_tag_and_the_image_records_it(browser, server, lora_dir, tmp_path):  # noqa: F811
    page = open_page(browser, server.url)
    wait_for_samplers(page)
    page.wait_for_selector("#lora-row:not([hidden])")  # the server has a --lora-dir with LoRAs in it
    assert page.eval_on_selector_all("#lora option", "options => options.map(o => o.value)") == ["ink"]
    page.fill("#prompt", "a watercolor fox")
    page.click("#add-lora")
    assert page.input_value("#prompt") == "a watercolor fox <lora:ink:0.8>"
    set_number(page, "#steps", 2)
    set_number(page, "#width", 64)
    set_number(page, "#height", 64)
    generate(page)
    assert page.is_hidden("#error"), page.inner_text("#error")
    with Image.open(download_newest(page, tmp_path)) as im:
        text = im.text["parameters"]
    assert text.startswith("a watercolor fox <lora:ink:0.8>\n")
    assert f'Lora hashes: "ink: {short_hash(lora_dir / "ink.safetensors")}"' in text
    assert not page.errors
    page.close()
