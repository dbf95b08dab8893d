"""Whole images against diffusers' KolorsPipeline and KolorsImg2ImgPipeline on the same tiny weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kolors import KolorsError, KolorsPipeline
from kolors.models.layers import FAST_CPU_DTYPES

TOL = 1e-3
SIZE = dict(height=64, width=64)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    p = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def dpm_reference(reference_pipeline):
    from diffusers import DPMSolverMultistepScheduler
    from diffusers import KolorsPipeline as DiffusersKolors

    scheduler = DPMSolverMultistepScheduler.from_config(
        reference_pipeline.scheduler.config, use_karras_sigmas=True
    )
    ref = DiffusersKolors(**{**reference_pipeline.components, "scheduler": scheduler})
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def img2img_reference(reference_pipeline):
    from diffusers import KolorsImg2ImgPipeline

    ref = KolorsImg2ImgPipeline(**reference_pipeline.components)
    ref.set_progress_bar_config(disable=True)
    return ref


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def assert_close(ours: np.ndarray, theirs: np.ndarray, tol: float = TOL) -> None:
    assert ours.shape == theirs.shape
    diff = np.abs(ours - theirs).max()
    assert diff <= tol, f"max |diff| {diff} > {tol}"
    assert theirs.std() > 0.01  # a blank image would match anything


CASES = {
    "cfg": dict(prompt="一张瓢虫的照片，微距", guidance_scale=5.0),
    "no-cfg": dict(prompt="a photo of a cat", guidance_scale=1.0),
    "negative": dict(prompt="a red car", negative_prompt="blurry, low quality", guidance_scale=6.5),
    "batch": dict(prompt=["a red car", "一只猫"], negative_prompt=["", "模糊"], guidance_scale=5.0),
    "per-prompt": dict(prompt="a cat", num_images_per_prompt=2, guidance_scale=5.0),
    "non-square": dict(prompt="a tall tower", height=96, width=64, guidance_scale=5.0),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sampler", ["euler", "dpmpp-2m"])
def test_text_to_image_matches_diffusers(pipe, reference_pipeline, dpm_reference, case, sampler):
    kwargs = {**SIZE, **CASES[case]}
    ref = reference_pipeline if sampler == "euler" else dpm_reference
    steps = 4 if sampler == "euler" else 6
    theirs = ref(**kwargs, num_inference_steps=steps, generator=gen(7), output_type="np").images
    ours = pipe(
        **kwargs, num_inference_steps=steps, sampler=sampler, generator=gen(7), output_type="np"
    ).images
    assert_close(ours, theirs)


def test_seed_is_a_cpu_generator(pipe, reference_pipeline):
    theirs = reference_pipeline(
        "a cat", **SIZE, num_inference_steps=2, generator=gen(66), output_type="np"
    ).images
    out = pipe("a cat", **SIZE, num_inference_steps=2, seed=66, output_type="np")
    assert_close(out.images, theirs)
    assert out.seeds == [66]


def test_per_image_seeds_reproduce_alone(pipe):
    both = pipe(
        "a cat", **SIZE, num_inference_steps=2, seed=[5, 6], num_images_per_prompt=2, output_type="np"
    )
    second = pipe("a cat", **SIZE, num_inference_steps=2, seed=6, output_type="np")
    np.testing.assert_allclose(both.images[1], second.images[0], atol=1e-5)


def init_image(w: int = 64, h: int = 64) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1).astype("uint8")
    return Image.fromarray(rgb)


@pytest.mark.parametrize("strength", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp-2m"])
def test_image_to_image_matches_diffusers(pipe, img2img_reference, strength, sampler):
    from diffusers import DPMSolverMultistepScheduler

    ref = img2img_reference
    if sampler == "dpmpp-2m":
        from diffusers import KolorsImg2ImgPipeline

        scheduler = DPMSolverMultistepScheduler.from_config(ref.scheduler.config, use_karras_sigmas=True)
        ref = KolorsImg2ImgPipeline(**{**ref.components, "scheduler": scheduler})
        ref.set_progress_bar_config(disable=True)
    image = init_image(64, 96)
    kwargs = dict(prompt="a watercolor painting", image=image, strength=strength, num_inference_steps=10)
    theirs = ref(**kwargs, generator=gen(3), output_type="np").images
    ours = pipe(**kwargs, sampler=sampler, generator=gen(3), output_type="np").images
    assert_close(ours, theirs)


def test_image_to_image_batch_matches_diffusers(pipe, img2img_reference):
    kwargs = dict(
        prompt="a cat", image=init_image(), strength=0.6, num_inference_steps=5, num_images_per_prompt=2
    )
    theirs = img2img_reference(**kwargs, generator=gen(1), output_type="np").images
    ours = pipe(**kwargs, generator=gen(1), output_type="np").images
    assert_close(ours, theirs)


def test_encode_prompt_is_reusable(pipe):
    embeds = pipe.encode_prompt("a cat", negative_prompt="")
    a = pipe(prompt_embeds=embeds, **SIZE, num_inference_steps=2, seed=1, output_type="np").images
    b = pipe("a cat", **SIZE, num_inference_steps=2, seed=1, output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_output_types(pipe):
    common = dict(prompt="a cat", **SIZE, num_inference_steps=1, seed=0)
    pil = pipe(**common).images
    assert len(pil) == 1 and isinstance(pil[0], Image.Image) and pil[0].size == (64, 64)
    latent = pipe(**common, output_type="latent").images
    f = pipe.vae_scale_factor
    assert latent.shape == (1, 4, 64 // f, 64 // f)
    arr = pipe(**common, output_type="np").images
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype("uint8"))


def test_callback_sees_every_step(pipe):
    seen = []
    pipe(
        "a cat",
        **SIZE,
        num_inference_steps=3,
        seed=0,
        callback=lambda i, n, x, denoised: seen.append((i, n, x.shape, denoised.shape)),
    )
    assert [s[:2] for s in seen] == [(0, 3), (1, 3), (2, 3)]
    assert all(s[2] == s[3] == (1, 4, 16, 16) for s in seen)  # latents and denoised, 64 px / the tiny VAE's 4


def test_fp16_variant_sharded_loads_the_same_weights(tiny_model_dir_fp16, reference_pipeline):
    p16 = KolorsPipeline.from_pretrained(
        tiny_model_dir_fp16, dtype=torch.float32, device="cpu", variant="fp16"
    )
    ref = reference_pipeline.unet.state_dict()
    for key, value in p16.unet.state_dict().items():
        torch.testing.assert_close(value, ref[key].half().float(), rtol=0, atol=0)
    # The variant is found without naming it when only fp16 files exist, as in the real repo.
    auto = KolorsPipeline.from_pretrained(tiny_model_dir_fp16, dtype=torch.float32, device="cpu")
    emb = auto.text_encoder.state_dict()["embedding.word_embeddings.weight"]
    torch.testing.assert_close(
        emb, reference_pipeline.text_encoder.embedding.word_embeddings.weight.half().float()
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=60), "height 60 is not a multiple of 8; use 56 or 64"),
        (dict(width=100), "width 100 is not a multiple of 8; use 96 or 104"),
        (dict(num_inference_steps=0), "steps must be"),
        (dict(strength=1.5, image=Image.new("RGB", (64, 64))), "strength must be between 0 and 1"),
        (dict(guidance_scale=float("nan")), "guidance scale must be a finite number"),
        (dict(guidance_scale=-1.0), "guidance scale must be a finite number"),
        (
            dict(sampler="dpm"),
            "unknown sampler 'dpm'; choose one of: euler, euler-a, heun, dpmpp-2m, dpmpp-2m-sde,",
        ),
        (dict(schedule="beta"), "unknown schedule 'beta'; choose one of: karras, exponential"),
        (dict(sampler="lcm", schedule="karras"), "sampler lcm has no karras schedule"),
        (dict(sampler="lcm", num_inference_steps=51), "lcm takes at most 50 steps"),
        (dict(eta=0.5), "eta is DDIM's noise; sampler euler takes none"),
        (dict(sampler="ddim", eta=2.0), "eta must be between 0 and 1"),
        (dict(num_images_per_prompt=0), "number of images must be at least 1"),
        (dict(output_type="jpeg"), "unknown output_type"),
        (dict(seed=-3), "seed must be a whole number"),
    ],
)
def test_bad_input_is_one_clear_line(pipe, kwargs, message):
    with pytest.raises(KolorsError) as e:
        pipe(**{"prompt": "a cat", **SIZE, "num_inference_steps": 1, **kwargs})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_strength_zero_returns_the_image_reencoded(pipe):
    out = pipe("a cat", image=init_image(), strength=0.0, num_inference_steps=4, seed=0, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize(
    "dtype, vae_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]
)
def test_half_precision_close_to_float32_and_vae_upcast(tiny_model_dir, pipe, dtype, vae_dtype):
    half = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=dtype, device="cpu")
    half.set_progress_bar_config(disable=True)
    # The SDXL VAE overflows in fp16, so like diffusers' force_upcast it runs in fp32 then; bf16 has the range.
    assert next(half.unet.parameters()).dtype == dtype and next(half.vae.parameters()).dtype == vae_dtype
    # bf16 on a CPU with oneDNN: the UNet's weights are packed once for it (kolors.models.layers.pack_weights)
    assert half.unet.conv_in.weight.is_mkldnn == (dtype in FAST_CPU_DTYPES)
    common = dict(prompt="a cat", **SIZE, num_inference_steps=4, seed=0, output_type="np")
    diff = np.abs(half(**common).images - pipe(**common).images).max()
    assert diff < 0.1, diff
