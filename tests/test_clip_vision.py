"""The CLIP vision tower and its preprocessing against transformers' CLIPVisionModelWithProjection and
CLIPImageProcessorPil on a tiny random config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kolors import KolorsError
from kolors.components import load_image_encoder
from kolors.models.clip_vision import ImageProcessorConfig, load_image_processor_config, preprocess

TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=37,
    projection_dim=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
)


def save_tiny_clip(path, seed: int = 0, **overrides):
    """A tiny CLIPVisionModelWithProjection saved by transformers' own save_pretrained, with random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_CLIP, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return model.eval()


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype("uint8"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "image_encoder"
    save_tiny_clip(path)
    return path


@pytest.mark.parametrize("size", [(40, 31), (31, 40), (28, 28), (100, 60)])
def test_preprocess_matches_transformers_pil_backend(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = photo(*size, seed=size[0])
    theirs = CLIPImageProcessorPil(size=28, crop_size=28)(image, return_tensors="pt").pixel_values
    ours = preprocess([image], ImageProcessorConfig(28, 28))
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


def test_hidden_states_match_transformers(clip_dir):
    from transformers import CLIPVisionModelWithProjection

    theirs_model = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    ours, processor = load_image_encoder(clip_dir, dtype=torch.float32, device="cpu")
    pixels = preprocess([photo(40, 31), photo(50, 50, 1)], processor)
    with torch.no_grad():
        out = theirs_model(pixels, output_hidden_states=True)
        for skip in (0, 1, 2):
            diff = (ours.hidden_states(pixels, skip_last=skip) - out.hidden_states[-1 - skip]).abs().max()
            assert diff <= 1e-5, (skip, diff)
        assert (ours(pixels) - out.image_embeds).abs().max() <= 1e-5


def test_whole_clip_model_folder_loads(tmp_path):
    """The FaceID repo's encoder folder is a whole CLIPModel: its vision half and its projection are used."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2),
        vision_config=TINY_CLIP,
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path)
    ours, _ = load_image_encoder(tmp_path, dtype=torch.float32, device="cpu")
    theirs = CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval()
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert (
            ours.hidden_states(pixels) - theirs(pixels, output_hidden_states=True).hidden_states[-2]
        ).abs().max() <= 1e-5


def test_preprocessor_config_is_read(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {"size": {"shortest_edge": 30}, "crop_size": {"height": 28, "width": 28}, "image_mean": [0.5] * 3}
        )
    )
    cfg = load_image_processor_config(tmp_path, 336)
    assert (cfg.size, cfg.crop_size, cfg.image_mean) == (30, 28, (0.5, 0.5, 0.5))
    assert load_image_processor_config(tmp_path / "absent", 336) == ImageProcessorConfig(336, 336)


def test_missing_config_is_one_clear_error(tmp_path):
    with pytest.raises(KolorsError, match="no config.json"):
        load_image_encoder(tmp_path, dtype=torch.float32, device="cpu")
