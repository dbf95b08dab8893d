"""IP-Adapter-Plus against diffusers' KolorsPipeline.load_ip_adapter on the same tiny files.

The files are made here: a tiny CLIP vision model saved by transformers' save_pretrained as image_encoder/, and an
adapter state dict in the official key layout (a Tencent Resampler under `image_proj`, `{k}.to_k_ip/to_v_ip` for
k = 1, 3, … under `ip_adapter`) sized for the tiny UNet, saved as .bin (torch.save) and .safetensors (diffusers'
prefixed keys). diffusers infers the Resampler's sizes from the keys as kolors does.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kolors import KolorsError, KolorsPipeline, samplers
from tests.reference import TINY_UNET
from tests.test_clip_vision import TINY_CLIP, photo, save_tiny_clip
from tests.test_pipeline import assert_close

SIZE = dict(height=64, width=64)
CALL = dict(prompt="a photo of a cat", **SIZE, num_inference_steps=2, guidance_scale=5.0, output_type="np")
RESAMPLER = dict(dim=32, depth=4, heads=1, num_queries=4, ff_mult=4)


def gen() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(5)


def block_widths(unet) -> list[int]:
    """Each cross-attention's width in diffusers' attn_processors order (the files' 1, 3, 5, … numbering)."""
    return [
        unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
        for name in unet.attn_processors
        if name.endswith("attn2.processor")
    ]


def resampler_state(
    g,
    embedding_dim: int,
    output_dim: int,
    dim: int,
    depth: int,
    heads: int,
    ff_mult: int,
    num_queries: int = 0,
):
    """A Tencent Resampler's tensors in the official names, random."""

    def r(*shape, scale=None):
        return torch.randn(shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    inner = 64 * heads
    s = {
        "proj_in.weight": r(dim, embedding_dim),
        "proj_in.bias": r(dim, scale=0.02),
        "proj_out.weight": r(output_dim, dim),
        "proj_out.bias": r(output_dim, scale=0.02),
        "norm_out.weight": 1 + r(output_dim, scale=0.1),
        "norm_out.bias": r(output_dim, scale=0.02),
    }
    if num_queries:
        s["latents"] = r(1, num_queries, dim, scale=dim**-0.5)
    for i in range(depth):
        p = f"layers.{i}."
        s |= {
            p + "0.norm1.weight": 1 + r(dim, scale=0.1),
            p + "0.norm1.bias": r(dim, scale=0.02),
            p + "0.norm2.weight": 1 + r(dim, scale=0.1),
            p + "0.norm2.bias": r(dim, scale=0.02),
            p + "0.to_q.weight": r(inner, dim),
            p + "0.to_kv.weight": r(2 * inner, dim),
            p + "0.to_out.weight": r(dim, inner),
            p + "1.0.weight": 1 + r(dim, scale=0.1),
            p + "1.0.bias": r(dim, scale=0.02),
            p + "1.1.weight": r(ff_mult * dim, dim),
            p + "1.3.weight": r(dim, ff_mult * dim),
        }
    return s


def attention_state(g, widths: list[int], token_dim: int, scale: float = 1.0) -> dict:
    out = {}
    for n, width in enumerate(widths):
        for which in ("to_k_ip", "to_v_ip"):
            out[f"{2 * n + 1}.{which}.weight"] = (
                torch.randn(width, token_dim, generator=g) * scale / token_dim**0.5
            )
    return out


def plus_state(reference_unet, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    proj = resampler_state(g, TINY_CLIP["hidden_size"], TINY_UNET["cross_attention_dim"], **RESAMPLER)
    return {
        "image_proj": proj,
        "ip_adapter": attention_state(g, block_widths(reference_unet), TINY_UNET["cross_attention_dim"], 3.0),
    }


@pytest.fixture(scope="module")
def adapter_dir(reference_pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("ipa") / "Kolors-IP-Adapter-Plus-tiny"
    root.mkdir()
    save_tiny_clip(root / "image_encoder", seed=3)
    state = plus_state(reference_pipeline.unet)
    torch.save(state, root / "ip_adapter_plus_general.bin")
    flat = {f"{group}.{k}": v.contiguous() for group, tensors in state.items() for k, v in tensors.items()}
    save_file(flat, root / "ip_adapter_plus_general.safetensors")
    return root


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, adapter_dir):
    p = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    p.set_progress_bar_config(disable=True)
    p.load_ip_adapter(adapter_dir, weight_name="ip_adapter_plus_general.bin")
    return p


@pytest.fixture(scope="module")
def reference(reference_pipeline, adapter_dir):
    """diffusers' KolorsPipeline with the same adapter on a copy of the tiny UNet (load_ip_adapter changes it), and
    transformers' PIL image processor (CLIPImageProcessor would switch to torchvision where it is installed)."""
    from diffusers import KolorsPipeline as DiffusersKolors
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = TINY_CLIP["image_size"]
    components = {**reference_pipeline.components, "unet": copy.deepcopy(reference_pipeline.unet)}
    components["feature_extractor"] = CLIPImageProcessorPil(size=size, crop_size=size)
    ref = DiffusersKolors(**components)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(
        adapter_dir, subfolder="", weight_name="ip_adapter_plus_general.bin", low_cpu_mem_usage=False
    )
    return ref


def test_encode_image_matches_diffusers(pipe, reference):
    image = photo(50, 40, seed=1)
    theirs = reference.encode_image(image, "cpu", 1, output_hidden_states=True)
    ours = pipe.encode_image(image, "cpu", 1, output_hidden_states=True)  # diffusers' call
    tokens = (TINY_CLIP["image_size"] // TINY_CLIP["patch_size"]) ** 2 + 1
    assert ours[0].shape == (1, tokens, TINY_CLIP["hidden_size"])
    for a, b in zip(ours, theirs, strict=True):
        assert (a - b).abs().max() <= 1e-5
    assert (ours[1] - ours[0]).abs().max() > 0.1  # zeroed normalised pixels, not the image


SCALES = {
    "0": 0.0,
    "0.5": 0.5,
    "1": 1.0,
    "per-block": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}, "mid": 0.7},
}


@pytest.mark.parametrize("scale", SCALES)
def test_images_match_diffusers(pipe, reference, scale):
    image = photo(48, 64, seed=2)
    reference.set_ip_adapter_scale(SCALES[scale])
    pipe.set_ip_adapter_scale(SCALES[scale])
    theirs = reference(**CALL, ip_adapter_image=image, generator=gen()).images
    ours = pipe(**CALL, ip_adapter_image=image, generator=gen()).images
    assert_close(ours, theirs)


def test_adapter_changes_the_image_and_scale_zero_does_not(pipe):
    image = photo(48, 64, seed=2)
    plain = pipe(**CALL, generator=gen()).images
    pipe.set_ip_adapter_scale(0.0)
    zero = pipe(**CALL, ip_adapter_image=image, generator=gen()).images
    pipe.set_ip_adapter_scale(1.0)
    one = pipe(**CALL, ip_adapter_image=image, generator=gen()).images
    np.testing.assert_array_equal(zero, plain)
    assert np.abs(one - plain).max() > 1e-2


@pytest.mark.parametrize("case", ["two-images", "no-cfg", "per-prompt"])
def test_more_calls_match_diffusers(pipe, reference, case):
    a, b = photo(48, 64, seed=2), photo(64, 64, seed=4)
    kwargs = dict(CALL, ip_adapter_image=[[a, b]])
    if case == "no-cfg":
        kwargs = dict(CALL, ip_adapter_image=a, guidance_scale=1.0)
    if case == "per-prompt":
        kwargs = dict(CALL, ip_adapter_image=a, num_images_per_prompt=2)
    reference.set_ip_adapter_scale(0.8)
    pipe.set_ip_adapter_scale(0.8)
    theirs = reference(**kwargs, generator=gen()).images
    ours = pipe(**kwargs, generator=gen()).images
    assert_close(ours, theirs)


def test_image_embeds_are_accepted(pipe):
    image = photo(48, 64, seed=2)
    pipe.set_ip_adapter_scale(1.0)
    hidden, uncond = pipe.encode_image(image)
    by_image = pipe(**CALL, ip_adapter_image=image, generator=gen()).images
    embeds = torch.stack([uncond, hidden])  # (2, images, tokens, width), uncond first: diffusers' layout
    by_embeds = pipe(**CALL, ip_adapter_image_embeds=[embeds], generator=gen()).images
    np.testing.assert_allclose(by_embeds, by_image, atol=1e-6)
    with pytest.raises(KolorsError, match="tokens but the image encoder gives"):
        pipe(**CALL, ip_adapter_image_embeds=[embeds[:, :, :5]], generator=gen())


def test_safetensors_file_and_unload(tiny_model_dir, adapter_dir, pipe):
    p = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    p.set_progress_bar_config(disable=True)
    plain = p(**CALL, generator=gen()).images
    p.load_ip_adapter(adapter_dir, weight_name="ip_adapter_plus_general.safetensors")
    image = photo(48, 64, seed=2)
    pipe.set_ip_adapter_scale(1.0)
    np.testing.assert_allclose(
        p(**CALL, ip_adapter_image=image, generator=gen()).images,
        pipe(**CALL, ip_adapter_image=image, generator=gen()).images,
        atol=1e-6,
    )
    p.unload_ip_adapter()
    assert p.ip_adapter is None and p.image_encoder is None
    np.testing.assert_array_equal(p(**CALL, generator=gen()).images, plain)
    with pytest.raises(KolorsError, match="no IP-Adapter is loaded"):
        p(**CALL, ip_adapter_image=image)


def test_image_encoder_path(tiny_model_dir, adapter_dir, tmp_path):
    p = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    p.load_ip_adapter(
        adapter_dir / "ip_adapter_plus_general.bin",
        image_encoder_folder=None,
        image_encoder_path=adapter_dir / "image_encoder",
    )
    assert p.image_encoder is not None


# ---------------------------------------------------------------------------------------------- bad input


def test_low_memory_reads_the_image_encoder_for_its_stage_only(tiny_model_dir, adapter_dir, pipe):
    """memory="low" on CPU streams the encoder as it does the text encoder: no weight of it stays in memory
    outside its stage, and the images are the same bit for bit."""
    low = KolorsPipeline.from_pretrained(
        tiny_model_dir, dtype=torch.float32, device="cpu", memory="low", ip_adapter=adapter_dir
    )
    low.set_progress_bar_config(disable=True)
    assert all(p.is_meta for p in low.image_encoder.parameters())
    image = photo(48, 64, seed=2)
    low.set_ip_adapter_scale(0.7)
    pipe.set_ip_adapter_scale(0.7)
    ours = low(**CALL, ip_adapter_image=image, generator=gen()).images
    np.testing.assert_array_equal(ours, pipe(**CALL, ip_adapter_image=image, generator=gen()).images)
    assert all(p.is_meta for p in low.image_encoder.parameters())
    layers = TINY_CLIP["num_hidden_layers"]
    assert low.image_encoder.weight_stream.fetches >= 2 * layers  # the image's pass and the zeroed pixels'


def write(tmp_path, state, name="bad.bin"):
    torch.save(state, tmp_path / name)
    return tmp_path / name


def test_sdxl_shapes_do_not_fit(pipe, reference_pipeline, adapter_dir, tmp_path):
    before = pipe.ip_adapter
    g = torch.Generator().manual_seed(1)
    wide = plus_state(reference_pipeline.unet)
    wide["image_proj"] = resampler_state(
        g, 48, TINY_UNET["cross_attention_dim"], **RESAMPLER
    )  # ViT-bigG-like input
    with pytest.raises(KolorsError, match="reads image features 48 wide but the image encoder gives 32"):
        pipe.load_ip_adapter(write(tmp_path, wide), image_encoder_folder=None)
    out = plus_state(reference_pipeline.unet)
    out["image_proj"] = resampler_state(g, TINY_CLIP["hidden_size"], 40, **RESAMPLER)
    with pytest.raises(KolorsError, match="image tokens 40 wide but this model needs 32"):
        pipe.load_ip_adapter(write(tmp_path, out), image_encoder_folder=None)
    kv = plus_state(reference_pipeline.unet)
    kv["ip_adapter"]["3.to_k_ip.weight"] = torch.zeros(80, 32)
    with pytest.raises(KolorsError, match=r"'3.to_k_ip.weight' has shape \(80, 32\)"):
        pipe.load_ip_adapter(write(tmp_path, kv), image_encoder_folder=None)
    fewer = plus_state(reference_pipeline.unet)
    del fewer["ip_adapter"]["33.to_v_ip.weight"]
    with pytest.raises(KolorsError, match="lacks '33.to_v_ip.weight'"):
        pipe.load_ip_adapter(write(tmp_path, fewer), image_encoder_folder=None)
    assert pipe.ip_adapter is before  # nothing half-applied


def test_adapter_file_not_found_is_one_line(pipe, adapter_dir, monkeypatch):
    """A missing subfolder, weight_name or file, and a hub repo the cache lacks: one clear line each (the lookup
    the LoRA loader shares, kolors.weights.hub.find_weight_file)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo, filename, **kwargs):
        raise LocalEntryNotFoundError("no connection and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    for kwargs, message in [
        (dict(subfolder="nope"), "adapter folder .*nope not found; check subfolder="),
        (dict(weight_name="nope.bin"), "adapter file .*nope.bin not found; check weight_name="),
        (dict(path_or_repo="./missing.bin"), "adapter file not found: ./missing.bin"),
        (
            dict(path_or_repo="someone/missing"),
            "could not get adapter 'someone/missing' from the model hub: no connection",
        ),
    ]:
        with pytest.raises(KolorsError, match=message) as e:
            pipe.load_ip_adapter(**{"path_or_repo": adapter_dir} | kwargs)
        assert "\n" not in str(e.value)


def test_not_an_adapter_file(pipe, tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(KolorsError, match="truncated or corrupt"):
        pipe.load_ip_adapter(tmp_path / "junk.bin", image_encoder_folder=None)
    with pytest.raises(KolorsError, match="lacks 'image_proj'"):
        pipe.load_ip_adapter(write(tmp_path, {"x": torch.zeros(1)}), image_encoder_folder=None)


def test_224_px_clip_l_is_refused(pipe, adapter_dir, tmp_path):
    import json

    folder = tmp_path / "clip224"
    folder.mkdir()
    config = json.loads((adapter_dir / "image_encoder" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 1024, "image_size": 224}))
    with pytest.raises(KolorsError, match=r"224-px images \(257 tokens\).*336 px \(577 tokens\)"):
        pipe.load_ip_adapter(adapter_dir, image_encoder_path=folder)


def test_bad_reference_image(pipe, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(KolorsError, match="cannot decode image"):
        pipe(**CALL, ip_adapter_image=str(tmp_path / "broken.png"))
    with pytest.raises(KolorsError, match="nested list"):
        pipe(**CALL, ip_adapter_image=[photo(8, 8), photo(8, 8)])


def test_bad_scales(pipe):
    with pytest.raises(KolorsError, match="down has no 'block_0'"):
        pipe.set_ip_adapter_scale({"down": {"block_0": 1.0}})
    with pytest.raises(KolorsError, match="3 scales for 2 attentions"):
        pipe.set_ip_adapter_scale({"down": {"block_1": [1.0, 1.0, 1.0]}})
    with pytest.raises(KolorsError, match="keys are 'down', 'mid' and 'up'"):
        pipe.set_ip_adapter_scale({"middle": 1.0})
    with pytest.raises(KolorsError, match="must be a number"):
        pipe.set_ip_adapter_scale("strong")


# ---------------------------------------------------------------------------------------------- with the rest


def test_image_to_image_matches_diffusers(pipe, reference):
    from diffusers import KolorsImg2ImgPipeline

    from tests.test_pipeline import init_image

    ref = KolorsImg2ImgPipeline(**reference.components)
    ref.set_progress_bar_config(disable=True)
    ref.set_ip_adapter_scale(0.7)
    pipe.set_ip_adapter_scale(0.7)
    kwargs = dict(prompt="a watercolor", image=init_image(64, 64), strength=0.6, num_inference_steps=4)
    image = photo(48, 64, seed=2)
    theirs = ref(**kwargs, ip_adapter_image=image, generator=gen(), output_type="np").images
    ours = pipe(**kwargs, ip_adapter_image=image, generator=gen(), output_type="np").images
    assert_close(ours, theirs)


def test_another_sampler_matches_diffusers(pipe, reference):
    from diffusers import DPMSolverMultistepScheduler
    from diffusers import KolorsPipeline as DiffusersKolors

    scheduler = DPMSolverMultistepScheduler.from_config(reference.scheduler.config, use_karras_sigmas=True)
    ref = DiffusersKolors(**{**reference.components, "scheduler": scheduler})
    ref.set_progress_bar_config(disable=True)
    ref.set_ip_adapter_scale(0.5)
    pipe.set_ip_adapter_scale(0.5)
    image = photo(48, 64, seed=2)
    kwargs = dict(CALL, num_inference_steps=3)
    theirs = ref(**kwargs, ip_adapter_image=image, generator=gen()).images
    ours = pipe(**kwargs, ip_adapter_image=image, sampler="dpmpp-2m", generator=gen()).images
    assert_close(ours, theirs)


@pytest.mark.filterwarnings("ignore:lcm is meant")
@pytest.mark.parametrize("sampler", sorted(set(samplers.SAMPLERS) - {"euler", "dpmpp-2m"}))
def test_every_sampler_matches_diffusers(pipe, reference, sampler):
    """The image prompt only adds keys and values to the UNet's context: each of the other samplers, stochastic
    ones included, matches diffusers' scheduler with the adapter (euler and dpmpp-2m are checked above)."""
    from diffusers import KolorsPipeline as DiffusersKolors

    from tests.test_samplers import reference_scheduler

    scheduler = reference_scheduler(sampler, reference.scheduler.config, None)
    ref = DiffusersKolors(**{**reference.components, "scheduler": scheduler})
    ref.set_progress_bar_config(disable=True)
    ref.set_ip_adapter_scale(0.6)
    pipe.set_ip_adapter_scale(0.6)
    image = photo(48, 64, seed=2)
    kwargs = dict(CALL, num_inference_steps=2)
    theirs = ref(**kwargs, ip_adapter_image=image, generator=gen()).images
    ours = pipe(**kwargs, ip_adapter_image=image, sampler=sampler, generator=gen()).images
    assert_close(ours, theirs)


def test_with_a_lora_matches_diffusers(pipe, reference, reference_pipeline, tmp_path):
    from diffusers import KolorsPipeline as DiffusersKolors

    from tests.test_lora import ATTENTION, peft_lora

    state, config = peft_lora(reference_pipeline.unet, ATTENTION, r=4, alpha=4, seed=5)
    DiffusersKolors.save_lora_weights(
        tmp_path, unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict()
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    reference.load_lora_weights(file, adapter_name="ink")
    pipe.load_lora_weights(file, adapter_name="ink")
    try:
        reference.set_ip_adapter_scale(0.6)
        pipe.set_ip_adapter_scale(0.6)
        image = photo(48, 64, seed=2)
        theirs = reference(**CALL, ip_adapter_image=image, generator=gen()).images
        ours = pipe(**CALL, ip_adapter_image=image, generator=gen()).images
        assert_close(ours, theirs)
    finally:
        reference.unload_lora_weights()
        pipe.unload_lora_weights()


def test_with_inpainting_matches_diffusers(pipe, reference):
    """IP-Adapter and a mask together: diffusers' SDXL inpaint pipeline with the same adapted UNet and image
    encoder, fed diffusers' Kolors prompt embeddings (as tests/test_inpaint.py)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    from tests.test_inpaint import box_mask
    from tests.test_pipeline import init_image

    ref = StableDiffusionXLInpaintPipeline(
        vae=reference.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=reference.unet, scheduler=reference.scheduler, image_encoder=reference.image_encoder,
        feature_extractor=reference.feature_extractor, add_watermarker=False,
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    e, neg, pooled, neg_pooled = reference.encode_prompt("a hat", "cpu", 1, True, negative_prompt="")
    embeds = dict(
        prompt_embeds=e,
        negative_prompt_embeds=neg,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=neg_pooled,
    )
    ref.set_ip_adapter_scale(0.6)
    pipe.set_ip_adapter_scale(0.6)
    kwargs = dict(image=init_image(64, 64), mask_image=box_mask(), height=64, width=64, num_inference_steps=3)
    reference_image = photo(48, 64, seed=2)
    theirs = ref(
        **embeds,
        **kwargs,
        guidance_scale=5.0,
        ip_adapter_image=reference_image,
        generator=gen(),
        output_type="np",
    ).images
    ours = pipe("a hat", **kwargs, ip_adapter_image=reference_image, generator=gen(), output_type="np").images
    assert_close(ours, theirs)
