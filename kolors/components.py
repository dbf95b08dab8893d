"""The components of a Kolors-diffusers folder, each built from its sub-folder's config.json on the meta device
and strictly loaded from its weights: what KolorsPipeline.from_pretrained assembles, and what the benchmarks load
one at a time."""

from __future__ import annotations

from pathlib import Path

import torch

from kolors.config import load_config
from kolors.errors import KolorsError
from kolors.models import clip_vision
from kolors.models.layers import packer
from kolors.models.quant import load_quantized
from kolors.models.sgm import unet_keys_transform
from kolors.models.text_encoder import ChatGLMModel, TextEncoderConfig, checkpoint_keys_transform
from kolors.models.unet import UNet2DConditionModel, UNetConfig
from kolors.models.vae import AutoencoderKL, VAEConfig
from kolors.weights import Checkpoint, build_on_meta, load_weights, stream_weights, weight_files


def load_text_encoder(
    folder: Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    variant: str | None = None,
    quant: str | None = None,
    stream: bool = False,
) -> ChatGLMModel:
    """ChatGLM3 from `folder` (text_encoder/). `quant` ("int8", "int4"): each big matrix quantized as it loads;
    `stream`: nothing loaded now, each layer fetched when it runs (low memory; kolors.weights.stream)."""
    model = build_on_meta(lambda: ChatGLMModel(load_config(TextEncoderConfig, folder / "config.json")))
    checkpoint = Checkpoint(weight_files(folder, variant), checkpoint_keys_transform)
    if quant is not None:
        load_quantized(model, checkpoint, quant, dtype=dtype, device=device)
    elif stream:
        stream_weights(model, checkpoint, dtype=dtype, device=torch.device(device))
    else:
        checkpoint.load(model, dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


def load_unet(
    folder: Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    variant: str | None = None,
    pack: bool = False,
    file: Path | None = None,
) -> UNet2DConditionModel:
    """The UNet from `folder` (unet/), or its config with the weights of one `file` (a community fine-tune, in
    diffusers' or the original SGM keys; see unet_files). `pack`: the CPU fast path's pack pass
    (kolors.models.layers), applied to each weight as soon as it is read, so the plain and packed UNet never both
    exist."""
    config = load_config(UNetConfig, folder / "config.json")
    model = build_on_meta(lambda: UNet2DConditionModel(config))
    files, transform = unet_files(folder, config, variant, file)
    load_weights(
        model, files, dtype=dtype, device=device, transform=transform, loaded=packer(model) if pack else None
    )
    return model.eval().requires_grad_(False)


def unet_files(folder: Path, config: UNetConfig, variant: str | None, file: Path | None = None):
    """The UNet's weight files and key transform: the folder's files as they are, or one single-file UNet whose
    SGM keys (`model.diffusion_model.…`) are mapped to diffusers' for this config."""
    if file is None:
        return weight_files(folder, variant), None
    if not Path(file).is_file():
        raise KolorsError(f"UNet file not found: {file}; pass a .safetensors file of a Kolors UNet")
    return [Path(file)], unet_keys_transform(config)


def load_vae(
    folder: Path, *, dtype: torch.dtype, device: torch.device | str, variant: str | None = None
) -> AutoencoderKL:
    """The VAE from `folder` (vae/), in `dtype` as given (the pipeline chooses float32 for an fp16 model whose
    config asks for force_upcast: see vae_dtype)."""
    model = build_on_meta(lambda: AutoencoderKL(load_config(VAEConfig, folder / "config.json")))
    load_weights(model, weight_files(folder, variant), dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


def vae_dtype(folder: Path, dtype: torch.dtype) -> torch.dtype:
    """The SDXL VAE overflows in fp16: like diffusers' force_upcast, it runs in float32 when the model is fp16."""
    config = load_config(VAEConfig, folder / "config.json")
    return torch.float32 if dtype == torch.float16 and config.force_upcast else dtype


def load_image_encoder(
    folder: Path, *, dtype: torch.dtype, device: torch.device | str, stream: bool = False
) -> tuple[clip_vision.CLIPVisionModelWithProjection, clip_vision.ImageProcessorConfig]:
    """An IP-Adapter's CLIP image encoder from `folder` (config.json and its weights; a whole CLIPModel's folder
    works too), with its preprocessing: the folder's preprocessor_config.json, else CLIP's at the encoder's size.
    `stream`: nothing loaded now, each layer read when it runs (low memory on CPU; the model's `weight_stream`)."""
    if not (folder / "config.json").is_file():
        raise KolorsError(
            f"image encoder folder {folder} has no config.json; pass the IP-Adapter repo's image_encoder/ folder "
            "(image_encoder_path=)"
        )
    config = clip_vision.load_clip_vision_config(folder / "config.json")
    model = build_on_meta(lambda: clip_vision.CLIPVisionModelWithProjection(config))
    if stream:
        checkpoint = Checkpoint(weight_files(folder), clip_vision.checkpoint_keys_transform)
        # Its meta placeholders in the dtype its layers will come in: the stage reads the dtype from them.
        model = model.to(dtype)
        model.weight_stream = stream_weights(model, checkpoint, dtype=dtype, device=torch.device(device))
    else:
        load_weights(
            model,
            weight_files(folder),
            dtype=dtype,
            device=device,
            transform=clip_vision.checkpoint_keys_transform,
        )
    processor = clip_vision.load_image_processor_config(folder, config.image_size)
    return model.eval().requires_grad_(False), processor
