"""ControlNet: the model against diffusers' ControlNetModel, whole images against diffusers'
StableDiffusionXLControlNetPipeline and ...ControlNetImg2ImgPipeline on the same tiny weights, and the bad inputs.

diffusers' core ControlNetModel never applies its own encoder_hid_proj; Kolors' ControlNets need it (the
official pipeline patches the forward), so the reference here is a subclass whose forward applies it first. The
reference pipelines take diffusers' KolorsPipeline.encode_prompt embeddings, as Kolors' official ones do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kolors import KolorsError, KolorsPipeline
from kolors.config import ConfigError, load_config
from kolors.models.controlnet import ControlNetConfig, ControlNetModel
from kolors.weights import build_on_meta, load_weights, weight_files
from tests.reference import randomize_

TOL = 1e-3
SIZE = dict(height=64, width=64)
COND_CHANNELS = (8, 16, 32)  # two stride-2 convolutions: the tiny VAE scales by 4


def _reference_class():
    from diffusers import ControlNetModel as DiffusersControlNet

    class KolorsControlNet(DiffusersControlNet):
        """diffusers' ControlNetModel with the text projection applied, as Kolors' pipeline patches it."""

        def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
            states = self.encoder_hid_proj(encoder_hidden_states)
            return super().forward(sample, timestep, states, *args, **kwargs)

    return KolorsControlNet


def make_controlnet(unet, seed: int):
    """A ControlNet copied from the UNet (diffusers' from_unet) with its zero-initialised layers and its own
    text projection given random weights, so that it steers the image and its projection is not the UNet's."""
    cn = _reference_class().from_unet(unet, conditioning_embedding_out_channels=COND_CHANNELS)
    for module in (cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding):
        randomize_(module, seed)
    with torch.no_grad():  # small residuals: a visible change that does not saturate the tiny images
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            conv.weight.mul_(0.3)
    randomize_(cn.encoder_hid_proj, seed + 1)
    return cn.eval()


@pytest.fixture(scope="module")
def reference_controlnets(reference_pipeline):
    return [make_controlnet(reference_pipeline.unet, 10), make_controlnet(reference_pipeline.unet, 20)]


@pytest.fixture(scope="module")
def controlnet_dirs(reference_controlnets, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    dirs = [root / "cn-edges", root / "cn-depth"]
    for cn, d in zip(reference_controlnets, dirs, strict=True):
        cn.save_pretrained(d)
    return dirs


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, controlnet_dirs):
    p = KolorsPipeline.from_pretrained(
        tiny_model_dir, dtype=torch.float32, device="cpu", controlnet=controlnet_dirs
    )
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def embeds(reference_pipeline):
    """diffusers' Kolors embeddings of the prompt and the empty negative, as its ControlNet pipelines take them."""
    with torch.no_grad():
        pe, npe, pp, npp = reference_pipeline.encode_prompt(
            "一只戴着帽子的猫", device="cpu", num_images_per_prompt=1, negative_prompt=""
        )
    return dict(
        prompt_embeds=pe,
        negative_prompt_embeds=npe,
        pooled_prompt_embeds=pp,
        negative_pooled_prompt_embeds=npp,
    )


def reference(reference_pipeline, controlnets, img2img: bool = False, scheduler=None):
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetPipeline

    cls = StableDiffusionXLControlNetImg2ImgPipeline if img2img else StableDiffusionXLControlNetPipeline
    ref = cls(
        vae=reference_pipeline.vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=reference_pipeline.unet,
        controlnet=controlnets if len(controlnets) > 1 else controlnets[0],
        scheduler=scheduler or reference_pipeline.scheduler,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    ref.set_progress_bar_config(disable=True)
    return ref


def control_image(w: int = 96, h: int = 96, seed: int = 0) -> Image.Image:
    """Edges on black, like a canny map: a ring and a bar, shifted by the seed."""
    y, x = np.mgrid[0:h, 0:w]
    r = np.hypot(x - w / 2 - 8 * seed, y - h / 2)
    mask = (np.abs(r - w / 4) < 2) | (np.abs(x - w / 5 - 6 * seed) < 2)
    return Image.fromarray((np.stack([mask] * 3, -1) * 255).astype("uint8"))


def init_image(w: int = 64, h: int = 64) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1).astype("uint8")
    return Image.fromarray(rgb)


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def assert_close(ours: np.ndarray, theirs: np.ndarray, tol: float = TOL) -> float:
    assert ours.shape == theirs.shape
    diff = float(np.abs(ours - theirs).max())
    print(f"max |diff| {diff:.2e}")  # the parity figure, shown with -s
    assert diff <= tol, f"max |diff| {diff} > {tol}"
    assert theirs.std() > 0.01  # a blank image would match anything
    return diff


# ------------------------------------------------------------------------------------------------ the model


def test_model_matches_diffusers(reference_controlnets, controlnet_dirs):
    config = load_config(ControlNetConfig, controlnet_dirs[0] / "config.json")
    model = build_on_meta(lambda: ControlNetModel(config))
    load_weights(model, weight_files(controlnet_dirs[0]), dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    x, states, pooled = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 7, 64, generator=g),
        torch.randn(2, 64),
    )
    t, ids, cond = (
        torch.tensor([500.0, 20.0]),
        torch.tensor([[64, 64, 0, 0, 64, 64]] * 2).float(),
        torch.rand(2, 3, 32, 32),
    )
    with torch.no_grad():
        for guess in (False, True):
            down, mid = model(x, t, states, pooled, ids, cond, 0.7, guess_mode=guess)
            ref_down, ref_mid = reference_controlnets[0](
                x, t, states, cond, 0.7, guess_mode=guess, return_dict=False,
                added_cond_kwargs=dict(text_embeds=pooled, time_ids=ids),
            )  # fmt: skip
            assert len(down) == len(ref_down) == 9
            for a, b in zip([*down, mid], [*ref_down, ref_mid], strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            assert ref_mid.abs().max() > 0.1
            # The control image embedded once (prepare_hint, as the pipeline does): the same residuals.
            hinted = model(x, t, states, pooled, ids, model.prepare_hint(cond), 0.7, guess_mode=guess)
            for a, b in zip([*hinted[0], hinted[1]], [*down, mid], strict=True):
                torch.testing.assert_close(a, b, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ whole images

CASES = {
    "one": dict(nets=[0], scale=0.7),
    "scale-0": dict(nets=[0], scale=0.0),
    "scale-1-window": dict(nets=[0], scale=1.0, start=0.25, end=0.75),
    "two": dict(nets=[0, 1], scale=[0.7, 1.0], start=[0.0, 0.25], end=[1.0, 0.75]),
    "guess-mode": dict(nets=[0], scale=0.7, guess_mode=True),
    "no-cfg": dict(nets=[0], scale=1.0, guidance_scale=1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_text_to_image_matches_diffusers(pipe, reference_pipeline, reference_controlnets, embeds, case):
    c = CASES[case]
    nets, guidance = c["nets"], c.get("guidance_scale", 5.0)
    images = [control_image(seed=i) for i in nets]
    control = dict(
        controlnet_conditioning_scale=c["scale"],
        control_guidance_start=c.get("start", 0.0),
        control_guidance_end=c.get("end", 1.0),
        guess_mode=c.get("guess_mode", False),
    )
    ref = reference(reference_pipeline, [reference_controlnets[i] for i in nets])
    ref_embeds = embeds if guidance > 1 else {k: v for k, v in embeds.items() if "negative" not in k}
    theirs = ref(
        **ref_embeds, **SIZE, **control, image=images if len(nets) > 1 else images[0], guidance_scale=guidance,
        num_inference_steps=4, generator=gen(7), output_type="np",
    ).images  # fmt: skip
    names = [["cn-edges", "cn-depth"][i] for i in nets]
    ours = pipe(
        "一只戴着帽子的猫", **SIZE, **control, control_image=images if len(nets) > 1 else images[0],
        controlnet=names if len(nets) > 1 else names[0], guidance_scale=guidance, num_inference_steps=4,
        generator=gen(7), output_type="np",
    ).images  # fmt: skip
    assert_close(ours, theirs)
    if case == "scale-0":  # no control at all: the plain image
        plain = pipe(
            "一只戴着帽子的猫", **SIZE, num_inference_steps=4, generator=gen(7), output_type="np"
        ).images
        np.testing.assert_array_equal(ours, plain)
    if case == "one":  # the control steers the image
        plain = reference_pipeline(
            prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=embeds["pooled_prompt_embeds"],
            negative_prompt_embeds=embeds["negative_prompt_embeds"],
            negative_pooled_prompt_embeds=embeds["negative_pooled_prompt_embeds"],
            **SIZE, num_inference_steps=4, generator=gen(7), output_type="np",
        ).images  # fmt: skip
        assert np.abs(plain - theirs).max() > 0.05


def a1111_weighting(monkeypatch, controlnet, mode: str) -> None:
    """The reference ControlNet weighted as sd-webui-controlnet's hook.py does in its control modes, written
    from that code: it runs on both guidance halves, each output i (the skips', then the mid's) is scaled by
    weight * 0.825 ** (12 - i) ("soft injection"), and in "ControlNet is more important" (cfg_injection) the
    unconditional rows are multiplied by 0 (cond_mark; diffusers puts them first)."""
    forward = controlnet.forward

    def weighted(*args, conditioning_scale=1.0, **kwargs):
        down, mid = forward(*args, conditioning_scale=1.0, **kwargs)
        outs = [*down, mid]
        outs = [o * (conditioning_scale * 0.825 ** float(12 - i)) for i, o in enumerate(outs)]
        if mode == "control":
            cond_mark = torch.ones(outs[0].shape[0], 1, 1, 1)
            cond_mark[: outs[0].shape[0] // 2] = 0
            outs = [o * cond_mark for o in outs]
        return tuple(outs[:-1]), outs[-1]

    monkeypatch.setattr(controlnet, "forward", weighted)


A1111_CASES = {
    "prompt": dict(nets=[0], modes=["prompt"]),
    "control": dict(nets=[0], modes=["control"]),
    "control-window": dict(nets=[0], modes=["control"], end=0.5),
    "two-mixed": dict(nets=[0, 1], modes=["balanced", "control"]),
}


@pytest.mark.parametrize("case", A1111_CASES)
def test_a1111_control_modes(pipe, reference_pipeline, reference_controlnets, embeds, monkeypatch, case):
    """control_mode="prompt" / "control": sd-webui-controlnet's "My prompt is more important" and "ControlNet is
    more important", against diffusers' pipeline with its ControlNets weighted as that extension's hook."""
    c = A1111_CASES[case]
    nets = [reference_controlnets[i] for i in c["nets"]]
    for net, mode in zip(nets, c["modes"], strict=True):
        if mode != "balanced":
            a1111_weighting(monkeypatch, net, mode)
    images = [control_image(seed=i) for i in c["nets"]]
    one = len(nets) == 1
    kwargs = dict(**SIZE, controlnet_conditioning_scale=0.9, control_guidance_end=c.get("end", 1.0))
    theirs = reference(reference_pipeline, nets)(
        **embeds, **kwargs, image=images[0] if one else images, num_inference_steps=4, generator=gen(7),
        output_type="np",
    ).images  # fmt: skip
    names = [["cn-edges", "cn-depth"][i] for i in c["nets"]]
    ours = pipe(
        "一只戴着帽子的猫", **kwargs, control_image=images[0] if one else images, controlnet=names[0] if one else names,
        control_mode=c["modes"][0] if one else c["modes"], num_inference_steps=4, generator=gen(7), output_type="np",
    ).images  # fmt: skip
    assert_close(ours, theirs)
    if case == "prompt":  # the soft weights are not the plain ones
        plain = pipe(
            "一只戴着帽子的猫", **kwargs, control_image=images[0], controlnet="cn-edges", num_inference_steps=4,
            generator=gen(7), output_type="np",
        ).images  # fmt: skip
        assert np.abs(plain - ours).max() > 1e-3


def test_sampler_dpmpp_2m_matches_diffusers(pipe, reference_pipeline, reference_controlnets, embeds):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(
        reference_pipeline.scheduler.config, use_karras_sigmas=True
    )
    ref = reference(reference_pipeline, reference_controlnets[:1], scheduler=scheduler)
    kwargs = dict(**SIZE, controlnet_conditioning_scale=0.7, control_guidance_end=0.8, num_inference_steps=5)
    theirs = ref(**embeds, **kwargs, image=control_image(), generator=gen(3), output_type="np").images
    ours = pipe(
        "一只戴着帽子的猫", **kwargs, control_image=control_image(), controlnet="cn-edges", sampler="dpmpp-2m",
        generator=gen(3), output_type="np",
    ).images  # fmt: skip
    assert_close(ours, theirs)


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_image_to_image_matches_diffusers(pipe, reference_pipeline, reference_controlnets, embeds, strength):
    ref = reference(reference_pipeline, reference_controlnets[:1], img2img=True)
    kwargs = dict(**SIZE, controlnet_conditioning_scale=0.7, control_guidance_end=0.9, strength=strength)
    theirs = ref(
        **embeds, **kwargs, image=init_image(), control_image=control_image(), num_inference_steps=5,
        generator=gen(5), output_type="np",
    ).images  # fmt: skip
    ours = pipe(
        "一只戴着帽子的猫", **kwargs, image=init_image(), control_image=control_image(), controlnet="cn-edges",
        num_inference_steps=5, generator=gen(5), output_type="np",
    ).images  # fmt: skip
    assert_close(ours, theirs)


def test_control_image_sets_the_size(pipe):
    out = pipe(
        "a cat", control_image=control_image(80, 48), controlnet="cn-edges", num_inference_steps=1,
        guidance_scale=1.0, seed=1, output_type="np",
    )  # fmt: skip
    assert out.images.shape == (1, 48, 80, 3)


# ------------------------------------------------------------------------------------------------ bad input


def test_sdxl_controlnet_is_refused(controlnet_dirs, tmp_path, pipe):
    sdxl = tmp_path / "sdxl-controlnet"
    sdxl.mkdir()
    config = json.loads((controlnet_dirs[0] / "config.json").read_text())
    config.update(encoder_hid_dim=None, encoder_hid_dim_type=None)
    (sdxl / "config.json").write_text(json.dumps(config))
    with pytest.raises(KolorsError, match="no encoder_hid_proj: it is for SDXL"):
        pipe.load_controlnet(sdxl)
    config = json.loads((controlnet_dirs[0] / "config.json").read_text())
    config.update(cross_attention_dim=48)
    (sdxl / "config.json").write_text(json.dumps(config))
    with pytest.raises(KolorsError, match="another base model: its cross_attention_dim is 48, the UNet's 32"):
        pipe.load_controlnet(sdxl)
    assert list(pipe.controlnets) == ["cn-edges", "cn-depth"]  # nothing half-applied


def test_bad_config_is_a_clear_error(controlnet_dirs, tmp_path):
    config = json.loads((controlnet_dirs[0] / "config.json").read_text())
    config.update(use_linear_projection=False)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="controlnet config: use_linear_projection=False is not supported"):
        load_config(ControlNetConfig, path)


def test_not_found(pipe, tmp_path):
    with pytest.raises(KolorsError, match="ControlNet not found"):
        pipe.load_controlnet(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(controlnet="openpose"), r"unknown ControlNet 'openpose'; known: cn-edges, cn-depth"),
        (dict(controlnet="cn-edges [a1b2c3d4]"), None),  # A1111's "name [hash]"
        (
            dict(control_image=[control_image()] * 3, controlnet=["cn-edges", "cn-depth"]),
            "3 control images for 2",
        ),
        (dict(controlnet="cn-edges", controlnet_conditioning_scale=float("nan")), "scale must be a finite"),
        (
            dict(controlnet="cn-edges", control_guidance_start=0.5, control_guidance_end=0.5),
            "start 0.5 must be",
        ),
        (dict(controlnet="cn-edges", control_guidance_end=1.5), "end must be between 0 and 1"),
        (
            dict(
                control_image=[control_image()] * 2,
                controlnet=["cn-edges", "cn-depth"],
                control_guidance_end=[1.0],
            ),
            "control_guidance_end has 1 values for 2",
        ),
        (dict(control_image=control_image()), r"1 control image\(s\) for 2 ControlNets"),
        (dict(control_image=Path("/nonexistent.png"), controlnet="cn-edges"), "image file not found"),
        (
            dict(controlnet="cn-edges", control_mode="strong"),
            "unknown control mode 'strong'; choose one of: bal",
        ),
        (dict(controlnet="cn-edges", control_mode="control", guess_mode=True), "guess_mode and control_mode"),
    ],
)
def test_bad_input(pipe, kwargs, message):
    kwargs = {"control_image": control_image(), **kwargs}
    call = dict(**SIZE, num_inference_steps=1, guidance_scale=1.0, output_type="latent", seed=0)
    if message is None:
        pipe("a cat", **call, **kwargs)
        return
    with pytest.raises(KolorsError, match=message):
        pipe("a cat", **call, **kwargs)


def test_undecodable_control_image(pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(KolorsError, match="cannot decode image"):
        pipe("a cat", **SIZE, control_image=bad, controlnet="cn-edges", num_inference_steps=1)


def test_controlnets_run_in_the_unets_stage(pipe, monkeypatch):
    """memory="low" moves a module to the device for its stage (KolorsPipeline._stage): the ControlNets of a
    call enter it with the UNet, and stay out of the other stages."""
    staged, inside = [], []
    real_stage = pipe._stage

    def stage(module):
        staged.append(module)
        return real_stage(module)

    def spy(*args, **kwargs):
        inside.append(list(staged))
        return original(*args, **kwargs)

    original = type(pipe.controlnets["cn-edges"]).forward
    monkeypatch.setattr(pipe, "_stage", stage)
    monkeypatch.setattr(type(pipe.controlnets["cn-edges"]), "forward", spy)
    pipe("a cat", **SIZE, control_image=control_image(), controlnet="cn-edges", num_inference_steps=1,
         guidance_scale=1.0, seed=0, output_type="latent")  # fmt: skip
    assert pipe.controlnets["cn-edges"] in inside[0] and pipe.unet in inside[0]
    assert pipe.controlnets["cn-depth"] not in staged


def test_bench_smoke(capsys):
    """bench/bench_controlnet.py runs (tiny widths), and its two ControlNet steps agree."""
    from bench.bench_controlnet import main as bench

    bench(["--channels", "64,128,128", "--depth", "1,1,1", "--latent", "8", "--tokens", "64", "--threads", "1",
           "--dtype", "float32", "--warmup", "0", "--repeats", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "diffusers+cn / kolors+cn" in out
    assert float(out.split("max |diff| of the two steps ")[1].split()[0]) < 1e-4


def test_with_inpainting_matches_diffusers(pipe, reference_pipeline, reference_controlnets, embeds):
    """A ControlNet and a mask together: diffusers' StableDiffusionXLControlNetInpaintPipeline, base UNet."""
    from diffusers import StableDiffusionXLControlNetInpaintPipeline

    from tests.test_inpaint import box_mask

    ref = StableDiffusionXLControlNetInpaintPipeline(
        vae=reference_pipeline.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=reference_pipeline.unet, controlnet=reference_controlnets[0], scheduler=reference_pipeline.scheduler,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(**SIZE, controlnet_conditioning_scale=0.7, strength=0.999, num_inference_steps=4)
    common = dict(image=init_image(), mask_image=box_mask(), control_image=control_image(64, 64))
    theirs = ref(**embeds, **kwargs, **common, guidance_scale=5.0, generator=gen(5), output_type="np").images
    ours = pipe(
        "一只戴着帽子的猫", **kwargs, **common, controlnet="cn-edges", generator=gen(5), output_type="np"
    ).images
    assert_close(ours, theirs)
