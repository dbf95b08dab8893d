"""Inpainting against diffusers' core StableDiffusionXLInpaintPipeline fed Kolors prompt embeddings, for the
base (4-channel) UNet and a 9-channel inpainting UNet, on the same tiny weights; and the mask helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kolors import KolorsError, KolorsPipeline, masks, samplers
from tests.reference import TINY_UNET, randomize_, save_reference_pipeline
from tests.test_pipeline import assert_close, gen, init_image
from tests.test_samplers import reference_scheduler

PROMPT, NEGATIVE = "一只戴帽子的猫", "模糊"
STEPS = {"heun": 3}


def box_mask(w: int = 64, h: int = 64, box=(16, 8, 48, 40)) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, box)
    return mask


@pytest.fixture(scope="module")
def inpaint_components(reference_pipeline):
    """The tiny reference with a 9-channel UNet (latents, mask, masked-image latents), as Kolors-Inpainting."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(3)
    unet = UNet2DConditionModel(**{**TINY_UNET, "in_channels": 9})
    randomize_(unet.conv_out, 4)
    return {**reference_pipeline.components, "unet": unet}


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    p = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def pipe9(inpaint_components, reference_pipeline, tmp_path_factory):
    from diffusers import KolorsPipeline as DiffusersKolors

    ref = DiffusersKolors(**inpaint_components, force_zeros_for_empty_prompt=False)
    path = save_reference_pipeline(ref, tmp_path_factory.mktemp("inpaint") / "Kolors-Inpainting-tiny")
    p = KolorsPipeline.from_pretrained(path, dtype=torch.float32, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def embeds(reference_pipeline):
    """diffusers' KolorsPipeline.encode_prompt: what the SDXL pipeline is fed in place of its CLIP encoders."""
    e, neg, pooled, neg_pooled = reference_pipeline.encode_prompt(
        PROMPT, "cpu", 1, True, negative_prompt=NEGATIVE
    )
    return dict(
        prompt_embeds=e,
        negative_prompt_embeds=neg,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=neg_pooled,
    )


def reference(components, sampler: str):
    from diffusers import StableDiffusionXLInpaintPipeline

    scheduler = reference_scheduler(sampler, components["scheduler"].config)
    ref = StableDiffusionXLInpaintPipeline(
        vae=components["vae"],
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=components["unet"],
        scheduler=scheduler,
        add_watermarker=False,
    )
    ref.set_progress_bar_config(disable=True)
    return ref


def run_both(ours, components, embeds, sampler="euler", output_type="np", **kwargs):
    kwargs = {"image": init_image(), "mask_image": box_mask(), "height": 64, "width": 64, **kwargs}
    kwargs.setdefault("num_inference_steps", STEPS.get(sampler, 4))
    theirs = reference(components, sampler)(
        **embeds, **kwargs, guidance_scale=5.0, generator=gen(11), output_type=output_type
    ).images
    mine = ours(
        PROMPT,
        negative_prompt=NEGATIVE,
        **kwargs,
        guidance_scale=5.0,
        sampler=sampler,
        generator=gen(11),
        output_type=output_type,
    ).images
    return mine, theirs


@pytest.mark.parametrize("strength", [0.5, 0.999, 1.0])
@pytest.mark.parametrize("channels", [4, 9])
def test_inpainting_matches_diffusers(
    pipe, pipe9, reference_pipeline, inpaint_components, embeds, channels, strength
):
    ours, components = (pipe, reference_pipeline.components) if channels == 4 else (pipe9, inpaint_components)
    mine, theirs = run_both(ours, components, embeds, strength=strength)
    assert_close(mine, theirs)


# The 4-channel path blends inside each sampler (Heun twice a step), so every sampler is checked there; the
# 9-channel UNet only widens the input, the same for all of them.
SAMPLER_CASES = [(4, s) for s in samplers.SAMPLERS if s != "euler"] + [(9, "heun"), (9, "dpmpp-2m-sde")]


@pytest.mark.filterwarnings("ignore:lcm is meant")
@pytest.mark.parametrize("channels, sampler", SAMPLER_CASES)
def test_every_sampler_inpaints_as_diffusers(
    pipe, pipe9, reference_pipeline, inpaint_components, embeds, channels, sampler
):
    ours, components = (pipe, reference_pipeline.components) if channels == 4 else (pipe9, inpaint_components)
    mine, theirs = run_both(ours, components, embeds, sampler=sampler, strength=0.999)
    assert_close(mine, theirs)


def test_two_generators_two_images(pipe, reference_pipeline, embeds):
    kwargs = dict(
        image=init_image(),
        mask_image=box_mask(),
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=5.0,
    )
    ref = reference(reference_pipeline.components, "euler-a")
    theirs = ref(
        **embeds, **kwargs, num_images_per_prompt=2, generator=[gen(1), gen(2)], output_type="np"
    ).images
    mine = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        **kwargs,
        sampler="euler-a",
        num_images_per_prompt=2,
        generator=[gen(1), gen(2)],
        output_type="np",
    ).images
    assert_close(mine, theirs)


@pytest.mark.parametrize("channels", [4, 9])
def test_padding_mask_crop_matches_diffusers_within_one_level(
    pipe, pipe9, reference_pipeline, inpaint_components, embeds, channels
):
    ours, components = (pipe, reference_pipeline.components) if channels == 4 else (pipe9, inpaint_components)
    image, mask = init_image(96, 80), box_mask(96, 80, (50, 30, 70, 52))
    mine, theirs = run_both(
        ours, components, embeds, output_type="pil", image=image, mask_image=mask, padding_mask_crop=6
    )
    a, b = np.asarray(mine[0], dtype=int), np.asarray(theirs[0], dtype=int)
    assert a.shape == b.shape == (80, 96, 3)
    assert np.abs(a - b).max() <= 1
    # Outside the crop the original comes back untouched.
    assert np.array_equal(a[:, :20], np.asarray(image)[:, :20])


def test_base_model_keeps_the_unmasked_region_up_to_the_vae_round_trip(pipe):
    image = init_image()
    out = pipe(PROMPT, image=image, mask_image=box_mask(), num_inference_steps=3, seed=1).images[0]
    pasted = pipe(
        PROMPT, image=image, mask_image=box_mask(), num_inference_steps=3, seed=1, paste_back=True
    ).images[0]
    a, b, o = (np.asarray(x, dtype=int) for x in (out, pasted, image))
    keep = np.asarray(box_mask()) == 0
    assert np.array_equal(b[keep], o[keep])  # pasted back: the original exactly
    assert not np.array_equal(a[keep], o[keep])  # without: the VAE's round trip
    assert np.array_equal(a[~keep], b[~keep])


def test_all_black_mask_is_the_vae_round_trip_as_diffusers(pipe, reference_pipeline, embeds):
    black = Image.new("L", (64, 64), 0)
    mine, theirs = run_both(pipe, reference_pipeline.components, embeds, mask_image=black)
    assert_close(mine, theirs)


def test_mask_of_another_size_is_resized(pipe):
    small, big = box_mask(), box_mask(128, 128, (32, 16, 96, 80))
    a = pipe(PROMPT, image=init_image(), mask_image=small, num_inference_steps=2, seed=3, output_type="np")
    b = pipe(PROMPT, image=init_image(), mask_image=big, num_inference_steps=2, seed=3, output_type="np")
    assert np.abs(a.images - b.images).max() < 1e-5


@pytest.mark.parametrize("content", ["fill", "latent noise", "latent nothing"])
def test_masked_content_changes_only_the_start(pipe, content):
    base = pipe(
        PROMPT, image=init_image(), mask_image=box_mask(), num_inference_steps=2, seed=3, strength=0.6
    )
    other = pipe(
        PROMPT,
        image=init_image(),
        mask_image=box_mask(),
        num_inference_steps=2,
        seed=3,
        strength=0.6,
        masked_content=content,
    )
    assert not np.array_equal(np.asarray(base.images[0]), np.asarray(other.images[0]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image=None), "without image="),
        (dict(mask_image=Image.new("L", (64, 64), 128)), "mid grey"),
        (dict(padding_mask_crop=500), "larger than the image"),
        (dict(padding_mask_crop=-1), "padding_mask_crop"),
        (dict(mask_blur=-2), "mask_blur"),
        (dict(masked_content="noise"), "masked_content"),
        (dict(paste_back=True, output_type="np"), "PIL"),
        (dict(mask_image="/nonexistent/mask.png"), "not found"),
    ],
)
def test_bad_inpainting_input_is_one_clear_error(pipe, kwargs, message):
    call = {**dict(image=init_image(), mask_image=box_mask(), num_inference_steps=2), **kwargs}
    with pytest.raises(KolorsError, match=message):
        pipe(PROMPT, **call)


def test_nine_channel_model_needs_a_mask(pipe9):
    with pytest.raises(KolorsError, match="inpainting model"):
        pipe9(PROMPT, num_inference_steps=2, height=64, width=64)


# ------------------------------------------------------------------------------------------ helpers


def test_crop_region_is_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    for size, box, target, pad in [
        ((96, 80), (50, 30, 70, 52), (64, 64), 6),
        ((96, 80), (0, 0, 10, 70), (64, 32), 0),
        ((200, 120), (150, 100, 199, 119), (48, 64), 20),
    ]:
        mask = box_mask(*size, box)
        assert masks.crop_region(mask, *target, pad) == VaeImageProcessor.get_crop_region(
            mask, *target, pad=pad
        )


def test_outpaint_canvas():
    image = init_image(60, 50)
    canvas, mask = masks.outpaint_canvas(image, left=10, bottom=5)
    assert canvas.size == mask.size == (72, 56)  # rounded up to multiples of 8 on the growing sides
    assert np.array_equal(np.asarray(canvas)[0:50, 12:72], np.asarray(image))  # the image, untouched
    m = np.asarray(mask)
    assert m[:, :5].min() == 255 and m[52:, :].min() == 255  # the new border is painted
    assert m[10:30, 30:50].max() == 0  # the image's middle is kept
    with pytest.raises(KolorsError, match="outpaint left"):
        masks.outpaint_canvas(image, left=-1)
    with pytest.raises(KolorsError, match="at least one side"):
        masks.outpaint_canvas(image)


def test_grow_and_invert():
    mask = box_mask()
    grown, shrunk = masks.grow_mask(mask, 3), masks.grow_mask(mask, -3)
    area = lambda m: int((np.asarray(m) > 127).sum())  # noqa: E731
    assert area(grown) == 38 * 38 and area(shrunk) == 26 * 26
    assert area(masks.invert_mask(mask)) == 64 * 64 - 32 * 32


# ------------------------------------------------------------------------------------------ faces: CLI


def cli(tiny_model_dir, tmp_path, *extra):
    from kolors.cli import main

    init = tmp_path / "photo.png"
    init_image(64, 48).save(init)
    out = tmp_path / "out.png"
    args = ["generate", "a cat", "--model", str(tiny_model_dir), "--steps", "2", "--seed", "5"]
    args += ["--dtype", "float32", "--image", str(init), "--output", str(out), "--quiet", *extra]
    return main(args), out


def test_cli_inpaints_with_a_mask_and_records_it(tiny_model_dir, tmp_path, capsys):
    from kolors.request import read_parameters

    mask = tmp_path / "mask.png"
    box_mask(64, 48, (8, 8, 40, 40)).save(mask)
    code, out = cli(
        tiny_model_dir, tmp_path, "--mask", str(mask), "--mask-blur", "2", "--inpaint-padding", "4"
    )
    assert code == 0
    params = read_parameters(out)
    for field in (
        "Denoising strength: 0.9999",
        "Mask blur: 2",
        "Masked content: original",
        "Masked area padding: 4",
    ):
        assert field in params
    result, original = np.asarray(Image.open(out), dtype=int), np.asarray(init_image(64, 48), dtype=int)
    assert np.array_equal(result[:, 48:], original[:, 48:])  # far from the mask: pasted back exactly
    assert not np.array_equal(result[10:38, 10:38], original[10:38, 10:38])


def test_cli_outpaints(tiny_model_dir, tmp_path, capsys):
    code, out = cli(tiny_model_dir, tmp_path, "--outpaint", "0,16,8,0")
    assert code == 0 and Image.open(out).size == (80, 56)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--outpaint", "1,2"], "four pixel counts"),
        (["--outpaint", "0,-8,0,0"], "four pixel counts"),
        (["--mask", "/nonexistent.png"], "not found"),
        (["--masked-content", "fill", "--mask-blur", "-1", "--mask", "MASK"], "mask_blur"),
    ],
)
def test_cli_bad_inpaint_options_exit_2(tiny_model_dir, tmp_path, capsys, extra, message):
    mask = tmp_path / "m.png"
    box_mask(64, 48).save(mask)
    code, out = cli(tiny_model_dir, tmp_path, *[str(mask) if e == "MASK" else e for e in extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_cli_mask_without_image_exit_2(tiny_model_dir, tmp_path, capsys):
    from kolors.cli import main

    code = main(["generate", "a cat", "--model", str(tiny_model_dir), "--mask", "m.png"])
    assert code == 2 and "needs --image" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ faces: server


def png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(pipe):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from kolors.serve import ServerConfig, create_app

    with TestClient(create_app(pipe, ServerConfig(max_steps=4)), base_url="http://127.0.0.1") as c:
        yield c


def test_a1111_img2img_inpaints_with_a1111s_fields(client):
    import base64
    import json

    from tests.server_helpers import decode_png

    b64 = lambda im: base64.b64encode(png(im)).decode()  # noqa: E731
    body = {
        "prompt": "a cat",
        "steps": 2,
        "seed": 4,
        "init_images": [b64(init_image())],
        "mask": b64(box_mask(128, 128, (32, 16, 96, 80))),  # another size: resized to the image
        "denoising_strength": 0.9,
        "inpainting_fill": 1,
        "inpaint_full_res": False,
        "mask_blur": 0,
    }
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["images"][0])
    params = image.text["parameters"]
    assert (
        "Denoising strength: 0.9" in params
        and "Mask blur: 0" in params
        and "Masked content: original" in params
    )
    assert "Inpaint area" not in params
    kept = np.asarray(masks.grow_mask(box_mask(), 4)) == 0  # beyond the resized mask's Lanczos ringing
    assert np.array_equal(np.asarray(image)[kept], np.asarray(init_image())[kept])  # pasted back, as A1111
    # A1111's defaults: fill, only masked (padding 0), blur 4.
    r = client.post(
        "/sdapi/v1/img2img",
        json={k: v for k, v in body.items() if k in ("prompt", "steps", "init_images", "mask")},
    )
    params = decode_png(r.json()["images"][0]).text["parameters"]
    assert (
        "Masked content: fill" in params
        and "Inpaint area: Only masked" in params
        and "Mask blur: 4" in params
    )
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.75


def test_openai_edits_inpaint_where_the_mask_is_transparent(client):
    from tests.server_helpers import decode_png

    alpha = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    alpha.paste((0, 0, 0, 0), (16, 8, 48, 40))  # transparent: edit here
    files = {
        "image": ("photo.png", png(init_image()), "image/png"),
        "mask": ("mask.png", png(alpha), "image/png"),
    }
    r = client.post(
        "/v1/images/edits", files=files, data={"prompt": "a hat", "steps": "2", "seed": "1", "mask_blur": "0"}
    )
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["data"][0]["b64_json"])
    assert "Denoising strength: 0.9999" in image.text["parameters"]
    result, original = np.asarray(image, dtype=int), np.asarray(init_image(), dtype=int)
    kept = np.asarray(box_mask()) == 0
    assert np.array_equal(result[kept], original[kept])
    assert np.abs(result[~kept] - original[~kept]).mean() > 5


# ------------------------------------------------------------------------------------------ faces: batch


def test_batch_jobs_take_image_mask_and_strength_relative_to_the_jobs_file(pipe, tmp_path):
    import json

    from kolors.batch import parse_jobs, run
    from kolors.request import read_parameters

    (tmp_path / "in").mkdir()
    init_image(64, 48).save(tmp_path / "in" / "photo.png")
    box_mask(64, 48, (8, 8, 40, 40)).save(tmp_path / "in" / "mask.png")
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"prompt": "a hat", "image": "in/photo.png", "mask": "in/mask.png", "mask_blur": 0, "num_images": 2},
        {"prompt": "a watercolor", "image": "in/photo.png", "strength": 0.5},
        {"prompt": "a cat", "width": 32, "height": 32},
    ]
    jobs.write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    out = tmp_path / "out"
    summary = run(jobs, out, pipe=pipe, defaults=dict(steps=2), progress=False)
    assert summary.done == 4 and summary.failed == 0
    rows = {
        r["prompt"] + str(r["index"]): r
        for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())
    }
    hat = rows["a hat0"]
    assert hat["strength"] == 0.9999 and hat["image"].endswith("photo.png") and hat["mask_hash"]
    params = read_parameters(out / hat["file"])
    assert "Denoising strength: 0.9999" in params and "Mask blur: 0" in params
    result = np.asarray(Image.open(out / hat["file"]).convert("RGB"), dtype=int)
    assert result.shape == (48, 64, 3)
    assert np.array_equal(result[:, 44:], np.asarray(init_image(64, 48), dtype=int)[:, 44:])
    assert "Denoising strength: 0.5" in read_parameters(out / rows["a watercolor0"]["file"])
    assert Image.open(out / rows["a cat0"]["file"]).size == (32, 32)
    # A changed picture is another job's image: a new file.
    before = parse_jobs(jobs)[0][0].file
    init_image(64, 48).transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "in" / "photo.png")
    assert parse_jobs(jobs)[0][0].file != before
    # Bad files: one clear line each.
    jobs.write_text(
        json.dumps({"prompt": "x", "image": "in/nope.png"})
        + "\n"
        + json.dumps({"prompt": "x", "mask": "in/mask.png"}),
        encoding="utf-8",
    )
    specs, bad = parse_jobs(jobs)
    assert not specs and "not found" in str(bad[0]) and "needs the image" in str(bad[1])


def test_low_memory_inpaints_the_same(tiny_model_dir, pipe):
    low = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu", memory="low")
    low.set_progress_bar_config(disable=True)
    kwargs = dict(image=init_image(), mask_image=box_mask(), num_inference_steps=2, seed=9, output_type="np")
    assert np.abs(low(PROMPT, **kwargs).images - pipe(PROMPT, **kwargs).images).max() < 1e-5
