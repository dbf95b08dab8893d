"""Every sampler, schedule and image input of the pipeline against diffusers' KolorsPipeline and
KolorsImg2ImgPipeline on the same tiny weights, and the gaps diffusers' own pipeline tests found."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from kolors import KolorsError, KolorsPipeline, samplers
from tests.reference import TE_HIDDEN, TINY_UNET, randomize_, save_reference_pipeline
from tests.test_pipeline import SIZE, assert_close, gen, init_image
from tests.test_samplers import CLASSES, reference_scheduler

STEPS = {"heun": 3, "lcm": 4}  # Heun calls the UNet twice a step


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    p = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


def diffusers_pipe(reference_pipeline, scheduler, img2img: bool = False):
    from diffusers import KolorsImg2ImgPipeline
    from diffusers import KolorsPipeline as DiffusersKolors

    cls = KolorsImg2ImgPipeline if img2img else DiffusersKolors
    ref = cls(**{**reference_pipeline.components, "scheduler": scheduler})
    ref.set_progress_bar_config(disable=True)
    return ref


def scheduler(reference_pipeline, name: str, kind: str | None = None):
    return reference_scheduler(name, reference_pipeline.scheduler.config, kind)


@pytest.mark.filterwarnings("ignore:lcm is meant")
@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_every_sampler_matches_diffusers(pipe, reference_pipeline, sampler):
    """Guided, two images with a generator each: stochastic samplers draw each image's step noise from its own
    generator, as diffusers does."""
    ref = diffusers_pipe(reference_pipeline, scheduler(reference_pipeline, sampler))
    kwargs = dict(
        prompt="一张瓢虫的照片", **SIZE, guidance_scale=5.0, num_inference_steps=STEPS.get(sampler, 4)
    )
    kwargs.update(num_images_per_prompt=2, output_type="np")
    theirs = ref(**kwargs, generator=[gen(7), gen(8)]).images
    ours = pipe(**kwargs, sampler=sampler, generator=[gen(7), gen(8)]).images
    assert_close(ours, theirs)


@pytest.mark.parametrize("sampler", sorted(samplers.STOCHASTIC - {"ddim"}))
def test_stochastic_samplers_one_generator_for_the_batch(pipe, reference_pipeline, sampler):
    ref = diffusers_pipe(reference_pipeline, scheduler(reference_pipeline, sampler))
    kwargs = dict(
        prompt=["a red car", "一只猫"], **SIZE, guidance_scale=1.5, num_inference_steps=3, output_type="np"
    )
    assert_close(
        pipe(**kwargs, sampler=sampler, generator=gen(5)).images, ref(**kwargs, generator=gen(5)).images
    )


@pytest.mark.filterwarnings("ignore:lcm is meant")
@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_every_sampler_image_to_image_matches_diffusers(pipe, reference_pipeline, sampler):
    ref = diffusers_pipe(reference_pipeline, scheduler(reference_pipeline, sampler), img2img=True)
    kwargs = dict(
        prompt="a watercolor painting", image=init_image(64, 96), strength=0.6, num_inference_steps=5
    )
    theirs = ref(**kwargs, generator=gen(3), output_type="np").images
    ours = pipe(**kwargs, sampler=sampler, generator=gen(3), output_type="np").images
    assert_close(ours, theirs)


@pytest.mark.parametrize(
    "sampler, kind", [("euler", "karras"), ("dpmpp-2m", "exponential"), ("unipc", "karras")]
)
def test_schedule_option_matches_diffusers_flags(pipe, reference_pipeline, sampler, kind):
    ref = diffusers_pipe(reference_pipeline, scheduler(reference_pipeline, sampler, kind))
    kwargs = dict(prompt="a cat", **SIZE, num_inference_steps=4, output_type="np")
    theirs = ref(**kwargs, generator=gen(2)).images
    assert_close(pipe(**kwargs, sampler=sampler, schedule=kind, generator=gen(2)).images, theirs)


def test_ddim_eta_matches_diffusers(pipe, reference_pipeline):
    ref = diffusers_pipe(reference_pipeline, scheduler(reference_pipeline, "ddim"))
    kwargs = dict(prompt="a cat", **SIZE, num_inference_steps=4, eta=1.0, output_type="np")
    theirs = ref(**kwargs, generator=gen(4)).images
    assert_close(pipe(**kwargs, sampler="ddim", generator=gen(4)).images, theirs)


@pytest.fixture(scope="module")
def folder_with(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model folder whose scheduler is `class_name` with `flags`, saved as diffusers does
    (scheduler_config.json's _class_name and model_index.json agree)."""

    def make(class_name: str, flags: dict):
        root = tmp_path_factory.mktemp("folder") / "Kolors-tiny"
        shutil.copytree(tiny_model_dir, root)
        path = root / "scheduler" / "scheduler_config.json"
        config = {**json.loads(path.read_text()), **flags, "_class_name": class_name}
        path.write_text(json.dumps(config))
        index = json.loads((root / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", class_name]
        (root / "model_index.json").write_text(json.dumps(index))
        return root

    return make


@pytest.mark.parametrize(
    "class_name, flags",
    [
        ("EulerAncestralDiscreteScheduler", {}),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
        ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    ],
)
def test_the_folder_scheduler_is_the_default(folder_with, reference_pipeline, class_name, flags):
    """sampler=None gives diffusers' from_pretrained of the folder: its class, with the config's own flags."""
    root = folder_with(class_name, flags)
    ours = KolorsPipeline.from_pretrained(root, dtype=torch.float32, device="cpu")
    ours.set_progress_bar_config(disable=True)
    ref = diffusers_pipe(reference_pipeline, CLASSES[class_name].from_pretrained(root / "scheduler"))
    kwargs = dict(prompt="a cat", **SIZE, num_inference_steps=4, output_type="np")
    assert_close(ours(**kwargs, generator=gen(6)).images, ref(**kwargs, generator=gen(6)).images)


def test_a_folder_scheduler_without_a_sampler_is_a_clear_error(folder_with):
    ours = KolorsPipeline.from_pretrained(folder_with("PNDMScheduler", {}), dtype=torch.float32, device="cpu")
    with pytest.raises(
        KolorsError, match="scheduler PNDMScheduler has no kolors sampler; pass sampler= one of"
    ):
        ours("a cat", **SIZE, num_inference_steps=1, seed=0)
    assert ours(
        "a cat", **SIZE, num_inference_steps=1, seed=0, sampler="euler", output_type="np"
    ).images.shape


def test_negative_prompt_none_with_guidance_encodes_empty(pipe, reference_pipeline):
    """diffusers encodes "" for negative_prompt=None when guiding (force_zeros_for_empty_prompt is false)."""
    kwargs = dict(prompt="a cat", negative_prompt=None, guidance_scale=5.0, **SIZE, num_inference_steps=2)
    theirs = reference_pipeline(**kwargs, generator=gen(1), output_type="np").images
    assert_close(pipe(**kwargs, generator=gen(1), output_type="np").images, theirs)


def image_inputs(tmp_path):
    pil = init_image(64, 64)
    array = np.asarray(pil, dtype=np.float32) / 255.0
    pil.save(tmp_path / "init.png")
    return {
        "path": (tmp_path / "init.png", "a cat"),
        "numpy HWC": (array, "a cat"),
        "numpy NHWC": (array[None], "a cat"),
        "torch NCHW": (torch.from_numpy(array).permute(2, 0, 1)[None], "a cat"),
        "torch CHW list": ([torch.from_numpy(array).permute(2, 0, 1)] * 2, ["a cat", "a dog"]),
        "PIL list": ([pil, init_image(64, 64).transpose(0)], ["a cat", "a dog"]),
    }


@pytest.mark.parametrize(
    "kind", ["path", "numpy HWC", "numpy NHWC", "torch NCHW", "torch CHW list", "PIL list"]
)
def test_image_inputs_match_diffusers(pipe, reference_pipeline, tmp_path, kind):
    from diffusers.utils import load_image

    image, prompt = image_inputs(tmp_path)[kind]
    ref = diffusers_pipe(reference_pipeline, reference_pipeline.scheduler, img2img=True)
    kwargs = dict(prompt=prompt, strength=0.6, num_inference_steps=3, output_type="np")
    theirs = ref(image=load_image(str(image)) if kind == "path" else image, **kwargs, generator=gen(2)).images
    assert_close(pipe(image=image, **kwargs, generator=gen(2)).images, theirs)


def test_lcm_warns_once_off_its_regime(pipe):
    common = dict(prompt="a cat", **SIZE, sampler="lcm", seed=0, output_type="latent")
    with pytest.warns(UserWarning, match="lcm is meant for LCM-distilled models"):
        pipe(**common, guidance_scale=5.0, num_inference_steps=1)
    with pytest.warns(UserWarning, match="17 steps"):
        pipe(**common, guidance_scale=1.0, num_inference_steps=17)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(**common, guidance_scale=1.5, num_inference_steps=4)


@pytest.fixture(scope="module")
def no_hid_proj(reference_pipeline, tmp_path_factory):
    """diffusers' own test components: a UNet with encoder_hid_dim null, the text states read by cross-attention
    as they are (cross_attention_dim = the text encoder's width)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(3)
    config = {
        **TINY_UNET,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "cross_attention_dim": TE_HIDDEN,
    }
    unet = UNet2DConditionModel(**config)
    randomize_(unet.conv_out, 4)
    ref = diffusers_pipe(reference_pipeline, reference_pipeline.scheduler)
    ref.unet = unet
    ref.register_modules(unet=unet)
    root = save_reference_pipeline(ref, tmp_path_factory.mktemp("nohid") / "Kolors-tiny")
    ours = KolorsPipeline.from_pretrained(root, dtype=torch.float32, device="cpu")
    ours.set_progress_bar_config(disable=True)
    return ref, ours


def test_unet_without_encoder_hid_proj_matches_diffusers(no_hid_proj):
    ref, ours = no_hid_proj
    assert ours.unet.encoder_hid_proj is None
    kwargs = dict(prompt="a cat", **SIZE, num_inference_steps=2, output_type="np")
    assert_close(ours(**kwargs, generator=gen(0)).images, ref(**kwargs, generator=gen(0)).images)
