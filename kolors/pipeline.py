"""Text-to-image and image-to-image: prompt encoding, the denoising loop with guidance, and decoding.

The reference is diffusers' KolorsPipeline / KolorsImg2ImgPipeline: for the same weights, inputs and
torch.Generator this pipeline gives the same images (checked in float32 by tests/test_pipeline.py). Differences
that change no image: prompts and negative prompts are encoded in one batched call, and latents are carried in
float32 between steps (diffusers carries them in the model dtype).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from kolors import masks, samplers
from kolors.adapters import controlnet as control
from kolors.adapters import face as face_analysis
from kolors.adapters import ip_adapter as ipa
from kolors.adapters.lora import LoraSet, lora_short_hash
from kolors.adapters.preprocess import preprocess
from kolors.components import (
    load_image_encoder,
    load_text_encoder,
    load_unet,
    load_vae,
    unet_files,
    vae_dtype,
)
from kolors.config import load_config, read_json
from kolors.errors import KolorsError
from kolors.memory import PromptCache, parse_memory, prompt_cache_size
from kolors.models.clip_vision import load_clip_vision_config
from kolors.models.clip_vision import preprocess as clip_preprocess
from kolors.models.controlnet import ControlNetModel
from kolors.models.layers import packs
from kolors.models.quant import parse_quant, quant_of
from kolors.models.text_encoder import ChatGLMModel, TextEncoderConfig
from kolors.models.tokenizer import ChatGLMTokenizer
from kolors.models.unet import UNet2DConditionModel, UNetConfig
from kolors.models.vae import AutoencoderKL, VAEConfig, latent_preview, sample_latent
from kolors.noise import randn
from kolors.request import (
    GenerationRequest,
    InvalidRequest,
    check_control,
    check_seed,
    check_size,
    check_values,
    lora_name,
    random_seed,
)
from kolors.weights import DEFAULT_REPO, Checkpoint, check_model_folder, on_device, resolve_model

OUTPUT_TYPES = ("pil", "np", "latent")
# For the faces, which reach the engine through this module.
outpaint_canvas = masks.outpaint_canvas


@dataclass(frozen=True)
class PromptEmbeds:
    """What the text encoder gives for a batch of prompts, reusable across calls (one row per prompt)."""

    prompt_embeds: torch.Tensor  # (B, T, H): second-to-last ChatGLM layer
    pooled: torch.Tensor  # (B, H): last layer at the last position
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    # Left pads per row (host ints), from the tokenizer: a row's pad states are identical, and the UNet merges
    # them into one key (kolors.models.unet.merge_leading_repeats) without reading the states back to find them.
    # None: unknown (embeddings made elsewhere), so the UNet looks for them.
    pads: tuple[int, ...] | None = None
    negative_pads: tuple[int, ...] | None = None

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]


@dataclass(frozen=True)
class _Region:
    """An inpainting call's picture and mask as prepared for the sampler, and what pasting back needs."""

    image: torch.Tensor  # (1, 3, H, W) in [-1, 1], the output size
    mask: torch.Tensor  # (1, 1, H, W), 1 = repaint
    soft_mask: Image.Image  # the (blurred) mask at the original image's size
    original: Image.Image
    crop: tuple[int, int, int, int] | None  # padding_mask_crop's box in the original


@dataclass(frozen=True)
class _ControlUnit:
    """One ControlNet of a call: its model, control image rows on the device, scale and window."""

    model: ControlNetModel
    image: torch.Tensor
    scale: float
    start: float
    end: float
    mode: str = "balanced"  # a key of kolors.request.CONTROL_MODES, or "guess" (diffusers' guess mode)


class StopSampling(Exception):
    """Raised from a step callback: stop denoising now and decode the last prediction (AUTOMATIC1111's
    interrupt, which answers the images made so far), where any other exception ends the call with no image."""


@dataclass
class KolorsPipelineOutput:
    images: list[Image.Image] | np.ndarray | torch.Tensor
    seeds: list[int] | None = None  # the seed behind each image when the call was seeded by `seed=`


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPUs (the weights' own precision), bf16 on a CPU with native bf16 (fp16 is slow there), else fp32."""
    if device.type in ("cuda", "mps"):
        return torch.float16
    bf16 = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return torch.bfloat16 if bf16 else torch.float32


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise KolorsError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise KolorsError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KolorsError("device cuda was asked for but this torch build sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise KolorsError("device mps was asked for but is not available here; use --device cpu")
    return device


class KolorsPipeline:
    """Kolors text-to-image and image-to-image, shaped like diffusers' KolorsPipeline."""

    def __init__(
        self,
        tokenizer: ChatGLMTokenizer,
        text_encoder: ChatGLMModel,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler_config: samplers.SchedulerConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        name: str = "Kolors",
        memory: str = "normal",
        prompt_cache: int | None = None,
        plain_weight: Callable[[str, str], torch.Tensor] | None = None,
    ):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.scheduler_config = scheduler_config
        self.device, self.dtype, self.name = device, dtype, name
        self.text_encoder_quant = quant_of(text_encoder)
        self.memory = parse_memory(memory)
        self.prompt_cache = PromptCache(prompt_cache_size(self.memory, prompt_cache))
        # Low memory on a GPU: the models loaded into host memory visit the device for their stage only (a
        # streamed text encoder, its weights on the meta device, brings its layers itself: kolors.weights.stream).
        parking = self.memory == "low" and device.type != "cpu"
        self._parked = [m for m in (text_encoder, unet, vae) if parking and _device_of(m).type == "cpu"]
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        # Image prompts (kolors.adapters.ip_adapter): IP-Adapter-Plus and FaceID-Plus, each with its CLIP encoder
        self.ip_adapter: ipa.ImagePromptAdapter | None = None
        self.faceid: ipa.ImagePromptAdapter | None = None
        # "ip_adapter" / "faceid" -> (folder, CLIP model, its preprocessing); one model when both share a folder
        self._encoders: dict[str, tuple] = {}
        self.face_models: Path | None = None
        self.progress_bar = True
        quant = self.text_encoder_quant
        self.loras = LoraSet(
            {"unet": unet, "text_encoder": text_encoder},
            unet_config=unet.config,
            dtype=dtype,
            device=device,
            text_encoder_note=quant
            and f"this text encoder is quantized ({quant}); load the model without text_encoder_quant for it",
            plain_weight=plain_weight,
            on_text_encoder_change=self.prompt_cache.clear,  # cached embeddings were made without it
        )
        self.controlnets: dict[str, ControlNetModel] = {}  # by name, in load order
        self._variant, self._pack = None, False  # how from_pretrained loaded the UNet: ControlNets load alike

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_REPO,
        *,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = "auto",
        variant: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        torch_dtype: torch.dtype | None = None,
        text_encoder_quant: str | None = None,
        memory: str = "normal",
        prompt_cache: int | None = None,
        compile: bool = False,
        unet: str | os.PathLike | None = None,
        controlnet: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        ip_adapter: str | os.PathLike | None = None,
        faceid: str | os.PathLike | None = None,
        face_models: str | os.PathLike | None = None,
    ) -> KolorsPipeline:
        """Load a Kolors-diffusers folder or hub repo (`torch_dtype` is accepted as diffusers spells it).
        `unet="file.safetensors"`: a community fine-tune's single-file UNet (diffusers or original SGM keys, any
        float dtype) in place of the model's own.
        `text_encoder_quant="int8"` or `"int4"`: weight-only quantized text encoder (kolors.models.quant), experimental.
        `compile=True`: torch.compile the UNet; its first step compiles (minutes), see the README for when it pays.
        `controlnet=`: a ControlNet folder or hub repo (or a list of them) loaded with the model (load_controlnet).
        `ip_adapter=`, `faceid=` (with `face_models=`): load_ip_adapter / load_faceid those adapters at once."""
        text_encoder_quant = parse_quant(text_encoder_quant)
        memory = parse_memory(memory)
        prompt_cache_size(memory, prompt_cache)  # a bad size fails before the load
        device = parse_device(device)
        dtype = parse_dtype(torch_dtype if torch_dtype is not None else dtype, device)
        root = resolve_model(
            model, variant=variant, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
        check_model_folder(root)

        # Configs first: a bad one fails before any weight is read.
        for component, cls_ in (
            ("text_encoder", TextEncoderConfig),
            ("unet", UNetConfig),
            ("vae", VAEConfig),
        ):
            load_config(cls_, root / component / "config.json")
        scheduler_config = _scheduler_config(root)

        # memory="low": the text encoder is streamed a layer at a time (unless quantized: that one stays, small),
        # and on a GPU the UNet and VAE load into host memory, visiting the device for their stage.
        low = memory == "low"
        text_encoder = load_text_encoder(
            root / "text_encoder",
            dtype=dtype,
            device=device,
            variant=variant,
            quant=text_encoder_quant,
            stream=low and text_encoder_quant is None,
        )
        host = torch.device("cpu") if low else device
        # Packed for oneDNN on the CPU fast path; under torch.compile Inductor packs its own.
        pack = packs(device, dtype) and not compile
        unet_file = None if unet is None else Path(unet).expanduser()
        unet_model = load_unet(
            root / "unet", dtype=dtype, device=host, variant=variant, pack=pack, file=unet_file
        )
        files, transform = unet_files(
            root / "unet", load_config(UNetConfig, root / "unet" / "config.json"), variant, unet_file
        )

        def plain_weight(component: str, key: str) -> torch.Tensor:
            """A UNet weight read again from its file: fusing a LoRA into a packed layer needs the plain one."""
            return next(Checkpoint(files, transform).read([key], dtype=dtype, device=host))[1]

        vae = load_vae(root / "vae", dtype=vae_dtype(root / "vae", dtype), device=host, variant=variant)
        if compile:  # torch.compile scoped to the UNet, the per-step callable; the first step compiles it
            unet_model.compile()

        tokenizer = ChatGLMTokenizer.from_pretrained(root / "tokenizer")
        name = _model_name(root, model)
        pipe = cls(
            tokenizer,
            text_encoder,
            unet_model,
            vae,
            scheduler_config,
            device=device,
            dtype=dtype,
            name=name,
            memory=memory,
            prompt_cache=prompt_cache,
            plain_weight=plain_weight,
        )
        pipe._variant, pipe._pack = variant, pack
        paths = [controlnet] if isinstance(controlnet, (str, os.PathLike)) else list(controlnet or [])
        for path in paths:
            pipe.load_controlnet(path)
        if ip_adapter is not None:
            pipe.load_ip_adapter(ip_adapter)
        if faceid is not None:
            pipe.load_faceid(faceid, face_models=face_models)
        return pipe

    @property
    def label(self) -> str:
        """The model as an image's parameters name it: its name, and the text encoder's quantization when it
        has one, since that changes the image (one field, no comma: A1111's `Model:` value)."""
        quant = self.text_encoder_quant
        return self.name if quant is None else f"{self.name} (text encoder {quant})"

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def native_size(self) -> int:
        """The side, in pixels, the model was trained at: the default width and height."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """A cheap look at scaled latents mid-generation (a step callback's `denoised`): the linear projection of
        the SDXL latent space to RGB, at latent resolution, no decoder. Reads the latents back to the host."""
        return [Image.fromarray(a) for a in latent_preview(latents).numpy()]

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress_bar = not disable

    @staticmethod
    def resolve(model: str | os.PathLike = DEFAULT_REPO, variant: str | None = None) -> Path:
        """The checked local folder of `model`: a folder as it is, a hub repo downloaded into the cache first
        (only the files `variant` needs). What `kolors download` runs; from_pretrained does the same."""
        root = resolve_model(model, variant=variant)
        check_model_folder(root)
        return root

    # ------------------------------------------------------------------------------------------------ LoRA
    # diffusers' names and behaviour (kolors.adapters.lora does the work): a loaded LoRA becomes the active one.

    def load_lora_weights(
        self, path_or_repo: str | os.PathLike, weight_name: str | None = None, adapter_name: str | None = None
    ) -> str:
        """Load a LoRA (diffusers/PEFT or kohya keys; a file, a folder or a hub repo) and make it the active one;
        returns its adapter name (`default_N` unless named). A file that does not fit changes nothing."""
        return self.loras.load(path_or_repo, weight_name, adapter_name)

    def set_adapters(
        self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None
    ) -> None:
        """The active LoRAs and their scales (1.0 each by default); the others stay loaded, unused."""
        self.loras.set_active(adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return [name for name, _ in self.loras.active]

    def get_list_adapters(self) -> list[str]:
        return list(self.loras.adapters)

    def set_loras(self, loras: Sequence[tuple[str | os.PathLike, float]]) -> list[str]:
        """A request's LoRA set, `[(adapter name or file, scale), ...]`, made the active one: files are loaded
        on first use (named by their path) and kept, so switching sets never reloads the base weights."""
        return self.loras.use(loras)

    def lora_hashes(self) -> list[tuple[str, str]]:
        """(name, A1111 short hash of its file) for each active LoRA: an image's `Lora hashes`."""
        return [(name, lora_short_hash(file)) for name, _, file in self.loras.describe()]

    def disable_lora(self) -> None:
        self.loras.set_enabled(False)

    def enable_lora(self) -> None:
        self.loras.set_enabled(True)

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        """Add the active LoRAs into the weights: no per-step cost. The original weights are kept."""
        self.loras.fuse(lora_scale)

    def unfuse_lora(self) -> None:
        """The weights as before fuse_lora, bit for bit (the originals were kept, not subtracted back)."""
        self.loras.unfuse()

    def unload_lora_weights(self) -> None:
        """Every LoRA gone: the base model again, bit for bit."""
        self.loras.unload()

    # ------------------------------------------------------------------------------------------------ ControlNet

    def load_controlnet(self, path_or_repo: str | os.PathLike, name: str | None = None) -> str:
        """Load a Kolors ControlNet (a folder or hub repo in diffusers' ControlNetModel layout) beside the UNet;
        returns its name (the folder's, unless given), by which a call's `controlnet=` picks it. One that is not
        for this model (an SDXL ControlNet) is refused before its weights are read."""
        name = name or control.controlnet_name(path_or_repo)
        low = self.memory == "low" and self.device.type != "cpu"
        model = control.load_controlnet(
            path_or_repo,
            self.unet.config,
            dtype=self.dtype,
            device="cpu" if low else self.device,
            variant=self._variant,
            pack=self._pack,
        )
        if name in self.controlnets and self.controlnets[name] in self._parked:
            self._parked.remove(self.controlnets[name])
        self.controlnets[name] = model
        if low:
            self._parked.append(model)  # visits the device with the UNet, for the denoising stage only
        return name

    def unload_controlnet(self, name: str | None = None) -> None:
        """Forget one loaded ControlNet (all of them without a name)."""
        for key in [name] if name is not None else list(self.controlnets):
            model = self.controlnets.pop(self._controlnet_names([key])[0])
            if model in self._parked:
                self._parked.remove(model)

    def _controlnet_names(self, names) -> list[str]:
        known = ", ".join(self.controlnets) or "none loaded; load one with load_controlnet"
        found = []
        for name in names:
            if name not in self.controlnets:
                # A1111 names a model "name [hash]"; the name alone is enough here.
                base = str(name).split(" [")[0]
                if base not in self.controlnets:
                    raise KolorsError(f"unknown ControlNet {name!r}; known: {known}")
                name = base
            found.append(name)
        return found

    def _prepare_control(
        self,
        control_image,
        controlnet,
        scale,
        start,
        end,
        height: int,
        width: int,
        prompts: int,
        n: int,
        cfg: bool,
        guess_mode: bool,
        control_mode="balanced",
    ) -> list[_ControlUnit]:
        """Each ControlNet of the call with its control image rows on the device ((batch, 3, H, W) in [0, 1],
        both guidance halves unless its mode acts on the conditional half alone), its scale, window and mode, as
        diffusers' prepare_image makes them."""
        if control_image is None:
            if controlnet is not None:
                raise KolorsError(
                    "controlnet= was given without control_image=; pass one image per ControlNet"
                )
            return []
        if not self.controlnets:
            raise KolorsError(
                "control_image was given but no ControlNet is loaded; load one with load_controlnet"
            )
        if controlnet is None:
            names = list(self.controlnets)
        else:
            names = self._controlnet_names([controlnet] if isinstance(controlnet, str) else list(controlnet))
        images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
        multi = len(names) > 1 or (controlnet is not None and not isinstance(controlnet, str))
        if not multi:
            images = [images if len(images) > 1 else images[0]]  # one ControlNet: a list is a batch of images
        if len(images) > len(names):
            raise KolorsError(
                f"{len(images)} control images for {len(names)} ControlNets ({', '.join(names)}); give one image "
                "per ControlNet, or load more with load_controlnet"
            )
        if len(images) < len(names):
            raise KolorsError(
                f"{len(images)} control image(s) for {len(names)} ControlNets ({', '.join(names)}); give one each, "
                "or pick the ControlNets with controlnet=[names]"
            )
        k = len(names)
        scales = control.per_unit(scale, k, "controlnet_conditioning_scale")
        starts = control.per_unit(start, k, "control_guidance_start")
        ends = control.per_unit(end, k, "control_guidance_end")
        modes = control.per_unit(control_mode, k, "control_mode")
        if guess_mode and any(m != "balanced" for m in modes):
            raise KolorsError(
                "guess_mode and control_mode are two weightings (diffusers' and sd-webui-controlnet's); use one"
            )
        for mode in modes:
            control.residual_scales(mode, 1.0, 1)  # an unknown mode, before any image is read
        modes = ["guess"] * k if guess_mode else modes
        units = []
        for name, image, s, a, b, mode in zip(names, images, scales, starts, ends, modes, strict=True):
            try:
                check_control(s, a, b)
            except KolorsError as e:
                raise KolorsError(f"ControlNet {name}: {e}") from None
            rows = self._load_image(image, height, width, normalize=False)
            if rows.shape[0] != 1 and rows.shape[0] != prompts:
                raise KolorsError(
                    f"{rows.shape[0]} control images for ControlNet {name} and {prompts} prompt(s); give one image "
                    "per ControlNet (a list per ControlNet only for a batch of prompts, one per prompt)"
                )
            rows = rows.repeat_interleave(prompts * n if rows.shape[0] == 1 else n, dim=0)
            rows = rows.to(self.device, self.dtype)
            rows = torch.cat([rows, rows]) if cfg and mode not in control.COND_ONLY_MODES else rows
            units.append(_ControlUnit(self.controlnets[name], rows, float(s), float(a), float(b), mode))
        return units

    # ------------------------------------------------------------------------------------------------ image prompts
    # diffusers' names for IP-Adapter (kolors.adapters.ip_adapter does the work); FaceID-Plus beside it.

    def load_ip_adapter(
        self,
        path_or_repo: str | os.PathLike,
        subfolder: str | None = None,
        weight_name: str | None = None,
        image_encoder_folder: str | None = "image_encoder",
        *,
        image_encoder_path: str | os.PathLike | None = None,
        revision: str | None = None,
    ) -> None:
        """Load a Kolors IP-Adapter-Plus (a .bin or .safetensors file, a folder or a hub repo such as
        Kwai-Kolors/Kolors-IP-Adapter-Plus) and its CLIP image encoder: `image_encoder_folder` inside the repo as
        diffusers takes it (None: keep the one loaded, or use ip_adapter_image_embeds), or `image_encoder_path=`.
        Scale 1.0 until set_ip_adapter_scale. A file that does not fit changes nothing."""
        file = ipa.find_adapter_file(path_or_repo, weight_name, subfolder, ipa.IP_ADAPTER_FILES, revision)
        self._load_image_prompt(
            "ip_adapter", file, path_or_repo, subfolder, image_encoder_folder, image_encoder_path, revision
        )

    def load_faceid(
        self,
        path_or_repo: str | os.PathLike,
        weight_name: str | None = None,
        image_encoder_folder: str | None = "clip-vit-large-patch14-336",
        *,
        image_encoder_path: str | os.PathLike | None = None,
        face_models: str | os.PathLike | None = None,
        revision: str | None = None,
    ) -> None:
        """Load Kolors-IP-Adapter-FaceID-Plus (ipa-faceid-plus.bin; a file, folder or hub repo) and its CLIP
        encoder. `face_models`: the folder of insightface's antelopev2 models, for face_image= without
        face_embeds= (needs the `faceid` extra). Scale 1.0 until set_faceid_scale (the official sample uses 0.8)."""
        file = ipa.find_adapter_file(path_or_repo, weight_name, None, ipa.FACEID_FILES, revision)
        models = None if face_models is None else face_analysis.check_face_models(face_models)
        self._load_image_prompt(
            "faceid", file, path_or_repo, None, image_encoder_folder, image_encoder_path, revision
        )
        self.face_models = models or self.face_models

    def _load_image_prompt(self, slot, file, path_or_repo, subfolder, folder, encoder_path, revision) -> None:
        encoder = self._encoders.get(slot)
        where = self._encoder_folder(file, path_or_repo, subfolder, folder, encoder_path, revision)
        if where is not None and (encoder is None or encoder[0] != where):
            other = [e for e in self._encoders.values() if e[0] == where]
            if other:
                encoder = other[0]
            else:
                if (
                    where / "config.json"
                ).is_file():  # a 224-px encoder is refused before its weights are read
                    config = load_clip_vision_config(where / "config.json")
                    ipa.check_image_encoder(config.image_size, config.hidden_size)
                host = (
                    torch.device("cpu") if self.memory == "low" and self.device.type != "cpu" else self.device
                )
                # Low memory on CPU: the encoder's layers are read for its stage only, as the text encoder's
                stream = self.memory == "low" and self.device.type == "cpu"
                model, processor = load_image_encoder(where, dtype=self.dtype, device=host, stream=stream)
                encoder = (where, model, processor)
        if encoder is not None:
            ipa.check_image_encoder(encoder[1].config.image_size, encoder[1].config.hidden_size)
        text_dim = None if self.unet.encoder_hid_proj is None else self.unet.encoder_hid_proj.in_features
        adapter = ipa.load_adapter(
            file,
            self.unet,
            kind="plus" if slot == "ip_adapter" else "faceid",
            image_dim=None if encoder is None else encoder[1].config.hidden_size,
            text_dim=text_dim,
            dtype=self.dtype,
            device=self.device,
        )
        setattr(self, slot, adapter)  # everything checked: now the pipeline changes
        if encoder is not None:
            self._encoders[slot] = encoder
            if self.memory == "low" and self.device.type != "cpu" and encoder[1] not in self._parked:
                self._parked.append(encoder[1])

    @staticmethod
    def _encoder_folder(file, path_or_repo, subfolder, folder, encoder_path, revision) -> Path | None:
        """Where the image encoder is: `encoder_path`, else `folder` inside the adapter's repo or folder (a bare
        name is taken inside `subfolder`, a path with a slash from the repo's root, as diffusers does)."""
        if encoder_path is not None:
            return Path(encoder_path).expanduser()
        if folder is None:
            return None
        inner = Path(subfolder or "", folder).as_posix() if "/" not in folder else folder
        local = Path(path_or_repo).expanduser()
        if local.is_dir():
            return local / inner
        if local.is_file():
            return local.parent / folder
        return ipa.download_folder(str(path_or_repo), inner, revision)

    @property
    def image_encoder(self):
        """The IP-Adapter's CLIP image encoder (diffusers' name), None when none is loaded."""
        encoder = self._encoders.get("ip_adapter")
        return None if encoder is None else encoder[1]

    def set_ip_adapter_scale(self, scale: float | dict) -> None:
        """The IP-Adapter's weight: one number, or per block as diffusers (InstantStyle), e.g.
        {"up": {"block_0": [0.0, 1.0, 0.0]}}: blocks not named get 0."""
        if self.ip_adapter is None:
            raise KolorsError("no IP-Adapter is loaded; call load_ip_adapter first")
        self.ip_adapter.set_scale(scale, self.unet)

    def set_faceid_scale(self, scale: float) -> None:
        """FaceID-Plus' weight (the official sample's face fidelity: 0.8)."""
        if self.faceid is None:
            raise KolorsError("no FaceID adapter is loaded; call load_faceid first")
        self.faceid.set_scale(scale, self.unet)

    def unload_ip_adapter(self) -> None:
        """The IP-Adapter and its image encoder gone: the base model as before (it never changed)."""
        self.ip_adapter = None
        self._drop_encoder("ip_adapter")

    def unload_faceid(self) -> None:
        self.faceid = None
        self._drop_encoder("faceid")

    def _drop_encoder(self, slot: str) -> None:
        encoder = self._encoders.pop(slot, None)
        if encoder is not None and all(e[1] is not encoder[1] for e in self._encoders.values()):
            self._parked = [m for m in self._parked if m is not encoder[1]]

    @torch.inference_mode()
    def encode_image(
        self,
        image,
        device: str | torch.device | None = None,
        num_images_per_prompt: int = 1,
        output_hidden_states: bool = True,
        *,
        slot: str = "ip_adapter",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP's second-to-last hidden states (N, tokens, hidden) of the reference image(s) and their
        unconditional counterpart, the encoder's states for zeroed normalised pixels: diffusers'
        `encode_image(image, device, 1, output_hidden_states=True)`, whose arguments it takes (on this pipeline's
        device; the pooled embeddings of output_hidden_states=False are for adapters Kolors has not).
        `image`: PIL images or paths (resized and cropped as CLIPImageProcessor), or pixel values already made."""
        if not output_hidden_states:
            raise KolorsError("Kolors' IP-Adapters read hidden states; call encode_image(image) as it is")
        if num_images_per_prompt != 1:
            hidden, uncond = self.encode_image(image, slot=slot)
            return hidden.repeat_interleave(num_images_per_prompt, 0), uncond.repeat_interleave(
                num_images_per_prompt, 0
            )
        encoder = self._encoders.get(slot)
        if encoder is None:
            raise KolorsError(
                "no image encoder is loaded; load_ip_adapter with its image_encoder/ (or image_encoder_path=)"
            )
        _, model, processor = encoder
        if isinstance(image, torch.Tensor):
            pixels = image
        else:
            images = list(image) if isinstance(image, (list, tuple)) else [image]
            images = [load_image(i) if isinstance(i, (str, os.PathLike)) else i for i in images]
            if not images or not all(isinstance(i, Image.Image) for i in images):
                raise KolorsError("a reference image must be a PIL image or a path to an image file")
            pixels = clip_preprocess(images, processor)
        with self._stage(model):
            pixels = pixels.to(self.device, next(model.parameters()).dtype)
            return model.hidden_states(pixels), model.hidden_states(torch.zeros_like(pixels))

    def _image_prompts(self, ip_adapter_image, ip_adapter_image_embeds, face_image, face_embeds, cfg: bool):
        """(adapter, cond tokens (1, N, W), uncond tokens (1, N, W)) for each image prompt of a call."""
        prompts = []
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            if self.ip_adapter is None:
                raise KolorsError(
                    "ip_adapter_image was given but no IP-Adapter is loaded; call load_ip_adapter first"
                )
            if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
                raise KolorsError("pass either ip_adapter_image or ip_adapter_image_embeds, not both")
            if ip_adapter_image is not None:
                hidden, uncond = self.encode_image(_one_adapter_images(ip_adapter_image))
            else:
                hidden, uncond = self._check_image_embeds(ip_adapter_image_embeds, cfg)
            adapter = self.ip_adapter
            dtype = next(adapter.proj.parameters()).dtype
            rows = adapter.proj(torch.cat([uncond, hidden]).to(self.device, dtype))  # (2N, 16, W)
            uncond_t, cond_t = rows.chunk(2)
            prompts.append(
                (adapter, cond_t.reshape(1, -1, rows.shape[-1]), uncond_t.reshape(1, -1, rows.shape[-1]))
            )
        if face_image is not None or face_embeds is not None:
            prompts.append(self._face_prompt(face_image, face_embeds))
        return prompts

    def _check_image_embeds(self, embeds, cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' ip_adapter_image_embeds for one adapter: [tensor (2, n, T, D)], uncond first, with guidance
        ((1, n, T, D) without); returns (cond (n, T, D), uncond (n, T, D))."""
        embeds = embeds[0] if isinstance(embeds, (list, tuple)) and len(embeds) == 1 else embeds
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 4 or embeds.shape[0] != (2 if cfg else 1):
            rows = "(2, images, tokens, width), uncond first" if cfg else "(1, images, tokens, width)"
            raise KolorsError(f"ip_adapter_image_embeds must be a list with one tensor {rows}")
        encoder = self.image_encoder
        if encoder is not None and embeds.shape[2] != encoder.config.num_positions:
            raise KolorsError(
                f"ip_adapter_image_embeds have {embeds.shape[2]} tokens but the image encoder gives "
                f"{encoder.config.num_positions}; make them with this pipeline's encode_image"
            )
        if cfg:
            return embeds[1], embeds[0]
        return embeds[0], torch.zeros_like(embeds[0])

    def _face_prompt(self, face_image, face_embeds):
        """FaceID-Plus' tokens for a face: the id embedding (given, or insightface's for the largest face) and
        CLIP's features of the square face crop at 336 px; uncond is the projection of zeros for both, as in the
        official pipeline."""
        if self.faceid is None:
            raise KolorsError("face_image was given but no FaceID adapter is loaded; call load_faceid first")
        if face_image is None:
            raise KolorsError("face_embeds needs face_image= too (the face crop, for its CLIP features)")
        image = load_image(face_image) if isinstance(face_image, (str, os.PathLike)) else face_image
        if not isinstance(image, Image.Image):
            raise KolorsError("face_image must be a PIL image or a path to an image file")
        if face_embeds is None:
            face_embeds, image = face_analysis.face_embedding_and_crop(image, self.face_models)
        face_embeds = face_analysis.check_face_embeds(face_embeds)
        crop = image.convert("RGB").resize((ipa.KOLORS_CLIP_IMAGE_SIZE,) * 2, resample=Image.BICUBIC)
        hidden, _ = self.encode_image([crop], slot="faceid")
        proj = self.faceid.proj
        dtype = next(proj.parameters()).dtype
        ids = torch.from_numpy(face_embeds).reshape(1, -1).to(self.device, dtype)
        hidden = hidden.to(self.device, dtype)
        cond = proj(ids, hidden)
        uncond = proj(torch.zeros_like(ids), torch.zeros_like(hidden))
        return self.faceid, cond, uncond

    def _image_kv(self, prompts, rows: int, cfg: bool):
        """ContextCache.ip for `rows` images per branch: each prompt's keys and values, computed once for the
        cond and uncond tokens and repeated over the batch (uncond rows first, as the text's)."""
        per_block = None
        for adapter, cond, uncond in prompts:
            tokens = torch.cat([uncond, cond]) if cfg else cond
            kv = adapter.kv(self.unet, tokens.to(self.device, self.dtype))
            kv = [None if p is None else tuple(t.repeat_interleave(rows, 0) for t in p) for p in kv]
            per_block = [()] * len(kv) if per_block is None else per_block
            per_block = [
                have + ((p,) if p is not None else ()) for have, p in zip(per_block, kv, strict=True)
            ]
        if per_block is None or not any(per_block):
            return None
        return tuple(per_block)

    # ------------------------------------------------------------------------------------------------ prompts

    @torch.inference_mode()
    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = "",
        *,
        max_length: int = 256,
    ) -> PromptEmbeds:
        """ChatGLM3 embeddings of the prompts and their negatives (an empty negative is encoded, not zeroed,
        as the model's force_zeros_for_empty_prompt=false says). negative_prompt=None skips the negatives.
        Results are kept in `prompt_cache` (least recently used): treat them as read-only."""
        prompts = _as_prompt_list(prompt, "prompt")
        negatives = (
            None
            if negative_prompt is None
            else _as_prompt_list(negative_prompt, "negative_prompt", len(prompts))
        )
        negs = None if negatives is None else tuple(negatives)
        key = (tuple(prompts), negs, max_length, self.name, self.dtype)
        cached = self.prompt_cache.get(key)
        if cached is not None:
            return cached
        rows = prompts + (negatives or [])
        tokens = self.tokenizer(rows, max_length=max_length)
        with self._stage(self.text_encoder):
            embeds, pooled = self.text_encoder(
                tokens.input_ids.to(self.device),
                tokens.attention_mask.to(self.device),
                tokens.position_ids.to(self.device),
            )
        n = len(prompts)
        pads = tuple((tokens.attention_mask.shape[1] - tokens.attention_mask.sum(dim=1)).tolist())  # host
        if negatives is None:
            result = PromptEmbeds(embeds, pooled, pads=pads)
        else:
            result = PromptEmbeds(embeds[:n], pooled[:n], embeds[n:], pooled[n:], pads[:n], pads[n:])
        self.prompt_cache.put(key, result)
        return result

    def encode_texts(self, prompts: Sequence[str], negatives: Sequence[str] | None = None) -> PromptEmbeds:
        """As encode_prompt, for many prompts that share texts (a batch, whose negatives are mostly the same):
        each text is looked up in the prompt cache on its own and the missing ones are encoded in one call. The
        encoder sees each row on its own (padded to the same length), so this changes no image beyond float
        rounding."""
        texts = list(dict.fromkeys([*prompts, *(negatives or [])]))
        rows = {t: self.prompt_cache.get(("text", t, self.name, self.dtype)) for t in texts}
        missing = [t for t, row in rows.items() if row is None]
        if missing:
            e = self.encode_prompt(missing, negative_prompt=None)
            for i, t in enumerate(missing):  # copies: a row must not keep the whole call's tensor alive
                rows[t] = (e.prompt_embeds[i : i + 1].clone(), e.pooled[i : i + 1].clone(), e.pads[i])
                self.prompt_cache.put(("text", t, self.name, self.dtype), rows[t])

        def stack(ts: Sequence[str]) -> tuple:
            embeds, pooled, pads = zip(*(rows[t] for t in ts), strict=True)
            return torch.cat(embeds), torch.cat(pooled), pads

        (embeds, pooled, pads), negative = stack(prompts), negatives and stack(negatives)
        if not negative:
            return PromptEmbeds(embeds, pooled, pads=pads)
        return PromptEmbeds(embeds, pooled, negative[0], negative[1], pads, negative[2])

    def _stage(self, module: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Where `module` runs for one stage: on the device as it is, or moved there from host memory and
        parked again after (memory="low" on a GPU); a streamed module (memory="low" on CPU: the image encoder,
        whose stage calls more than its forward) lets go of its last layer after the stage."""
        if module in self._parked:
            return on_device(module, self.device)
        stages = contextlib.ExitStack()
        stream = getattr(module, "weight_stream", None)
        if stream is not None:
            stages.callback(stream.release)
        return stages

    # ------------------------------------------------------------------------------------------------ generation

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        sampler: str | None = None,
        schedule: str | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | Sequence[int] | None = None,
        num_images_per_prompt: int = 1,
        image: Image.Image | str | os.PathLike | np.ndarray | torch.Tensor | list | None = None,
        strength: float | None = None,
        output_type: str = "pil",
        prompt_embeds: PromptEmbeds | None = None,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        cross_attention_kwargs: dict | None = None,
        mask_image: Image.Image | str | os.PathLike | np.ndarray | None = None,
        padding_mask_crop: int | None = None,
        mask_blur: float = 0,
        masked_content: str = "original",
        paste_back: bool = False,
        control_image=None,
        controlnet: str | Sequence[str] | None = None,
        controlnet_conditioning_scale: float | Sequence[float] = 0.8,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        guess_mode: bool = False,
        control_mode: str | Sequence[str] = "balanced",
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        face_image=None,
        face_embeds: np.ndarray | None = None,
    ) -> KolorsPipelineOutput:
        """Generate images. `seed=` (an int, or one int per image) is a CPU generator, so a seed gives the same
        image on any device. `sampler=None` is the model folder's own scheduler (Kolors': euler), `schedule=`
        its sigmas ("karras", "exponential"; None: the sampler's default), `eta` DDIM's noise (0 to 1).
        `callback(step, num_steps, latents, denoised)` runs after each step (both in k-diffusion's space, x0 +
        sigma * noise); raising from it stops the generation. `cross_attention_kwargs={"scale": s}`: the
        UNet's LoRA scales times s for this call, as diffusers.

        Inpainting, as diffusers' StableDiffusionXLInpaintPipeline: `mask_image` (white = repaint, black = keep,
        binarised at 50%) over `image`, `strength` 0.9999 by default (0.3 for image-to-image). A 9-channel UNet
        (Kolors-Inpainting) sees the mask and the masked image; a 4-channel one gets the known region put back
        after each step. `padding_mask_crop=N` inpaints the box around the mask (padded by N pixels) at the full
        output size and pastes it back into the original. `mask_blur` blurs the mask first (pixels),
        `masked_content` is A1111's ("original", "fill", "latent noise", "latent nothing"), and `paste_back`
        composites the original over the result outside the blurred mask (off, as diffusers).

        ControlNet (load one first, load_controlnet or from_pretrained(controlnet=)): `control_image` is one
        image per ControlNet in use (a list for several; for one ControlNet, a list is one image per prompt),
        resized to the output size, which it sets when neither an init image nor height/width do. `controlnet`
        names the ControlNets to use (default: every loaded one, in load order); `controlnet_conditioning_scale`,
        `control_guidance_start` and `_end` (fractions of the steps) are one value or one per ControlNet, as in
        diffusers; `guess_mode` runs the ControlNets on the conditional half alone with scales rising from 0.1 to
        1 over the skips. A step i of n uses a ControlNet unless i / n < start or (i + 1) / n > end, i being the
        step whose sigma the sampler evaluates (for heun, the window is by that step, both evaluations alike).
        `control_mode` (one, or one per ControlNet) is sd-webui-controlnet's: "balanced" (the scale on every
        residual), "prompt" (its "My prompt is more important": the scale times 0.825 ** 12 at the first skip
        up to 0.825 ** 3 at the mid output) or "control" ("ControlNet is more important": those weights on the
        conditional half alone); not with guess_mode, which is diffusers' own weighting.

        `ip_adapter_image`: the reference image for the loaded IP-Adapter (several for it as [[a, b]], as
        diffusers), or `ip_adapter_image_embeds` from encode_image. `face_image` (and optionally `face_embeds`, the
        512-d insightface embedding, which makes face_image the face crop itself): the face for FaceID-Plus."""
        extra = set(cross_attention_kwargs or {}) - {"scale"}
        if extra:
            raise KolorsError(f"cross_attention_kwargs takes only 'scale', not {', '.join(sorted(extra))}")
        with self.loras.scaled((cross_attention_kwargs or {}).get("scale")):
            return self._call(
                prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, sampler, schedule,
                eta, generator, seed, num_images_per_prompt, image, strength, output_type, prompt_embeds, callback,
                mask_image, padding_mask_crop, mask_blur, masked_content, paste_back,
                (control_image, controlnet, controlnet_conditioning_scale, control_guidance_start,
                 control_guidance_end, guess_mode, control_mode),
                image_prompts=(ip_adapter_image, ip_adapter_image_embeds, face_image, face_embeds),
            )  # fmt: skip

    def _call(
        self,
        prompt,
        negative_prompt,
        height,
        width,
        num_inference_steps,
        guidance_scale,
        sampler,
        schedule,
        eta,
        generator,
        seed,
        num_images_per_prompt,
        image,
        strength,
        output_type,
        prompt_embeds,
        callback,
        mask_image=None,
        padding_mask_crop=None,
        mask_blur=0,
        masked_content="original",
        paste_back=False,
        control_args=(None, None, 0.8, 0.0, 1.0, False, "balanced"),
        image_prompts=(None, None, None, None),
    ) -> KolorsPipelineOutput:
        cfg = guidance_scale > 1.0
        inpainting = mask_image is not None
        if strength is None:  # diffusers' defaults: its inpaint pipeline's, and Kolors image-to-image's
            strength = 0.9999 if inpainting else 0.3
        in_channels = self.unet.config.in_channels
        if inpainting and image is None:
            raise KolorsError("mask_image was given without image=; inpainting needs the image to paint into")
        if in_channels != self.latent_channels and not inpainting:
            raise KolorsError(
                f"this UNet takes {in_channels} input channels: an inpainting model; pass image= and mask_image="
            )
        check_values(
            steps=num_inference_steps,
            guidance=guidance_scale,
            sampler=sampler,
            schedule=schedule,
            strength=strength,
            num_images=num_images_per_prompt,
        )
        if inpainting:
            masks.check_options(padding_mask_crop, mask_blur, masked_content)
            if (padding_mask_crop is not None or paste_back) and output_type != "pil":
                raise KolorsError("padding_mask_crop and paste_back give PIL images; use output_type='pil'")
        if output_type not in OUTPUT_TYPES:
            raise KolorsError(
                f"unknown output_type {output_type!r}; choose one of: {', '.join(OUTPUT_TYPES)}"
            )
        plan = samplers.schedule(self.scheduler_config, sampler, num_inference_steps, schedule)
        _check_eta(eta, plan.sampler)
        if plan.sampler == "lcm" and (
            guidance_scale > samplers.LCM_WARN_GUIDANCE or num_inference_steps > samplers.LCM_WARN_STEPS
        ):
            warnings.warn(
                f"lcm is meant for LCM-distilled models, with guidance <= {samplers.LCM_WARN_GUIDANCE:g} and "
                f"<= {samplers.LCM_WARN_STEPS} steps (here guidance {guidance_scale:g}, {num_inference_steps} steps)",
                UserWarning,
                stacklevel=2,
            )
        if prompt_embeds is None:
            if prompt is None:
                raise KolorsError("no prompt given; pass prompt='...' (or prompt_embeds from encode_prompt)")
            # diffusers encodes "" for a missing negative prompt (force_zeros_for_empty_prompt is false for Kolors)
            negative = ("" if negative_prompt is None else negative_prompt) if cfg else None
            prompt_embeds = self.encode_prompt(prompt, negative)
        elif cfg and prompt_embeds.negative_prompt_embeds is None:
            raise KolorsError(
                "prompt_embeds has no negative embeddings but guidance_scale > 1; encode them too"
            )
        batch = prompt_embeds.batch_size * num_images_per_prompt
        default_size = self.native_size
        # diffusers' image-to-image conditions on the requested size (default 1024x1024) even when the image,
        # which sets the output size, has another: kept, so the same call gives the same image.
        size_ids = (height or default_size, width or default_size)
        control_image, guess_mode = control_args[0], control_args[5]
        if image is None and control_image is not None and height is None and width is None:
            # diffusers' ControlNet pipelines take the size of the (first) control image
            first = control_image[0] if isinstance(control_image, (list, tuple)) else control_image
            first = first[0] if isinstance(first, (list, tuple)) else first
            first = load_image(first) if isinstance(first, (str, os.PathLike)) else first
            h, w = (first.height, first.width) if isinstance(first, Image.Image) else _array_size(first)
            f = self.vae_scale_factor
            size_ids = (h - h % f, w - w % f)
        if image is None:
            height, width = size_ids
            check_size(width, height, multiple=max(8, self.vae_scale_factor))
        elif height is not None or width is not None:  # a size the init image is resized to
            check_size(width or default_size, height or default_size, multiple=max(8, self.vae_scale_factor))
        if inpainting:  # (an image is there: checked above)
            region = self._inpaint_region(
                image, mask_image, height, width, padding_mask_crop, mask_blur, masked_content == "fill"
            )
            init = region.image
            height, width = init.shape[-2:]
            size_ids = (height, width)  # diffusers' SDXL inpainting conditions on the size it makes
        elif image is not None:
            init = self._load_image(image, height, width)
            height, width = init.shape[-2:]
        units = self._prepare_control(
            *control_args[:5],
            height,
            width,
            prompt_embeds.batch_size,
            num_images_per_prompt,
            cfg,
            guess_mode,
            control_args[6],
        )
        if units:  # diffusers' ControlNet pipelines condition on the output size, image-to-image too
            size_ids = (height, width)
        generator, seeds = _generators(generator, seed, batch)
        image_prompts = self._image_prompts(*image_prompts, cfg)

        if image is not None:
            plan = plan.tail(samplers.img2img_start(plan, strength))
        latent_shape = (
            batch,
            self.latent_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        keep, extra_channels = None, None
        if image is None:
            noise = randn(latent_shape, generator, self.device, self.dtype)
            x = noise.float() * plan.init_noise_sigma
        elif inpainting:
            x, keep, extra_channels, x0, mask = self._inpaint_start(
                region, init, batch, generator, plan, strength, masked_content, latent_shape
            )
        else:
            with self._stage(self.vae):
                x0 = self._encode_image(init, batch, generator)
            if plan.steps == 0:  # strength too small for any step: the image itself, re-encoded
                x = x0.float()
            else:
                noise = randn(x0.shape, generator, self.device, self.dtype)
                x = samplers.add_noise(x0.float(), noise.float(), plan.sigmas[0])

        steps = plan.steps
        bar = tqdm(total=steps, disable=not self.progress_bar or steps == 0, desc="kolors", leave=False)

        # The prediction of the last finished step, for StopSampling: the clean image as far as it got (x0 is the
        # same in every sampler's space, so it needs no rescaling).
        latest = [x]

        def on_step(i: int, n: int, latents: torch.Tensor, denoised: torch.Tensor) -> None:
            bar.update()
            latest[0] = denoised
            if callback is not None:
                callback(i, n, latents, denoised)

        extra = {"eta": eta} if plan.sampler == "ddim" else {}
        try:
            with self._stage(self.unet), contextlib.ExitStack() as stack:
                for unit in units:
                    stack.enter_context(self._stage(unit.model))
                denoise = self._denoiser(
                    prompt_embeds,
                    num_images_per_prompt,
                    guidance_scale,
                    plan.sigmas,
                    plan.timesteps,
                    size_ids,
                    extra_channels,
                    units,
                    image_prompts=image_prompts,
                )
                if steps:
                    noise = self._step_noise(generator, plan.sampler)
                    x = samplers.sample(plan, denoise, x, callback=on_step, noise=noise, keep=keep, **extra)
                    if plan.final_scale != 1.0:  # back to the VP sample diffusers decodes (DDIM's last sigma)
                        x = x * plan.final_scale
                    if keep is not None:  # the last step's blend: the known region as it was, no noise
                        x = (1 - mask) * x0 + mask * x
        except StopSampling:
            x = latest[0]
        finally:
            bar.close()
        with self._stage(self.vae):
            images = self._decode(x, output_type)
        if inpainting and (padding_mask_crop is not None or paste_back):
            images = [masks.paste_back(region.soft_mask, region.original, im, region.crop) for im in images]
        return KolorsPipelineOutput(images=images, seeds=seeds)

    def generate(
        self,
        request: GenerationRequest,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> list[tuple[Image.Image, int]]:
        """Make what `request` asks for: (image, seed) pairs, image i seeded by seed + i so each one reproduces
        on its own (a request without a seed draws one). An init image sets the output size."""
        return generate(self, request, callback)

    def _denoiser(
        self,
        embeds: PromptEmbeds,
        n: int,
        guidance_scale: float,
        sigmas,
        timesteps,
        size: tuple[int, int],
        extra_channels: torch.Tensor | None = None,
        units: Sequence[_ControlUnit] = (),
        image_prompts=(),
    ):
        """The epsilon UNet as a denoiser x0(x, sigma) with classifier-free guidance: cond and uncond in one
        batched call, as diffusers does (uncond first). `extra_channels` (B, C, h, w) are appended to the scaled
        input (an inpainting UNet's mask and masked-image latents). A sigma is fed as diffusers' UNet timestep for it: that of
        the schedule's grid point, found on the host (a cursor makes a repeated sigma, DDIM's "trailing" -1 whose
        sigma is also the first one's, the next occurrence).

        Each ControlNet runs before the UNet at the steps its window keeps, on the same rows (the conditional
        ones alone in guess mode and A1111's "ControlNet is more important", the others getting no residual), and
        the UNet adds the residuals' sum; at the other steps it does not run at all (diffusers runs it with scale
        0, which adds exact zeros)."""
        cfg = guidance_scale > 1.0

        def rows(cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
            # n images per prompt, each prompt's rows together; with guidance all uncond rows come first.
            batch = cond.repeat_interleave(n, 0)
            batch = torch.cat([uncond.repeat_interleave(n, 0), batch]) if cfg else batch
            return batch.to(self.device, self.dtype)

        context = rows(embeds.prompt_embeds, embeds.negative_prompt_embeds)
        pooled = rows(embeds.pooled, embeds.negative_pooled)
        pads = None
        if embeds.pads is not None and (not cfg or embeds.negative_pads is not None):
            pads = [p for p in embeds.pads for _ in range(n)]  # in the rows' order
            pads = [p for p in embeds.negative_pads for _ in range(n)] + pads if cfg else pads
        # Cross-attention keys and values depend on the text alone: computed here once, pads merged.
        states = context
        context = self.unet.prepare_context(states, pads=pads)
        # With guidance, a ControlNet in a conditional-only mode sees the conditional rows alone (the second half).
        rows_from = [pooled.shape[0] // 2 if cfg and u.mode in control.COND_ONLY_MODES else 0 for u in units]
        control_contexts = [
            u.model.prepare_context(states[h:], pads=pads[h:] if pads is not None else None)
            for u, h in zip(units, rows_from, strict=True)
        ]
        hints = [u.model.prepare_hint(u.image) for u in units]  # the control images embedded, once too
        # Each ControlNet's residual weights, the same at every step its window keeps (keep is 0 or 1).
        unit_scales = [
            u.scale
            if u.mode == "guess"
            else control.residual_scales(u.mode, u.scale, len(u.model.controlnet_down_blocks) + 1)
            for u in units
        ]
        steps = len(timesteps)
        keeps = [control.keep_window(u.start, u.end, steps) for u in units]
        if image_prompts:  # the image prompts' keys and values beside the text's, once too
            context = context._replace(ip=self._image_kv(image_prompts, embeds.batch_size * n, cfg))
        # diffusers' size conditioning: original size, crop top-left (0, 0), target size.
        time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=self.dtype, device=self.device)
        time_ids = time_ids.repeat(pooled.shape[0], 1)
        t_device = torch.tensor(
            timesteps, dtype=torch.float32, device=self.device
        )  # one copy, no per-step sync
        grid = _SigmaGrid(sigmas[: len(timesteps)])
        if extra_channels is not None:
            extra_channels = extra_channels.to(self.device, self.dtype)
            extra_channels = torch.cat([extra_channels, extra_channels]) if cfg else extra_channels

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            i = grid.index(sigma)
            x_in = (x / math.sqrt(sigma**2 + 1)).to(self.dtype)
            x_in = torch.cat([x_in, x_in]) if cfg else x_in
            # An inpainting UNet's extra channels are its own: a ControlNet sees the latents alone, as in diffusers.
            unet_in = x_in if extra_channels is None else torch.cat([x_in, extra_channels], dim=1)
            t = t_device[i].expand(x_in.shape[0])
            down, mid = None, None
            for unit, unit_context, hint, keep, h, scales in zip(
                units, control_contexts, hints, keeps, rows_from, unit_scales, strict=True
            ):
                if unit.scale * keep[i] == 0.0:
                    continue
                guess = unit.mode == "guess"
                d, m = unit.model(
                    x_in[h:], t[h:], unit_context, pooled[h:], time_ids[h:], hint, scales, guess
                )
                if h:  # the unconditional rows get nothing (diffusers adds zeros, A1111 multiplies by zero)
                    d, m = (
                        [torch.cat([torch.zeros_like(r), r]) for r in d],
                        torch.cat([torch.zeros_like(m), m]),
                    )
                # Each ControlNet's residuals are its own fresh tensors: the first one's hold the sum.
                down = d if down is None else [a.add_(b) for a, b in zip(down, d, strict=True)]
                mid = m if mid is None else mid.add_(m)
            eps = self.unet(unet_in, t, context, pooled, time_ids, down, mid).float()
            if cfg:
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            return x - sigma * eps

        return denoise

    def _step_noise(self, generator, sampler: str) -> Callable[[Sequence[int]], torch.Tensor]:
        """The per-step noise of a stochastic sampler: drawn from the call's generator(s) in the shape and dtype
        diffusers draws it (one draw per image for a list of generators), returned as float32 on the device. A
        CPU generator's draw goes to a GPU through pinned memory without waiting for the device."""
        dtype = torch.float32 if sampler in samplers.NOISE_IN_FLOAT32 else self.dtype
        first = generator[0] if isinstance(generator, list) else generator
        staged = self.device.type == "cuda" and first is not None and first.device.type == "cpu"

        def noise(shape: Sequence[int]) -> torch.Tensor:
            if staged:
                z = randn(shape, generator, "cpu", dtype).pin_memory()
                return z.to(self.device, non_blocking=True).float()
            return randn(shape, generator, self.device, dtype).float()

        return noise

    def _load_image(
        self, image, height: int | None, width: int | None, normalize: bool = True
    ) -> torch.Tensor:
        """The init image(s) as a (N, 3, H, W) float32 tensor in [-1, 1] ([0, 1] without `normalize`: a control
        image, as diffusers' control image processor leaves it), H and W multiples of the VAE's scale,
        as diffusers' VaeImageProcessor makes it: PIL images (or paths to them) resized with Lanczos; numpy arrays
        (HWC or NHWC) and torch tensors (CHW or NCHW) of floats in [0, 1] (already in [-1, 1] when negative values
        show it) resized nearest; a list of any of them is a batch."""
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise KolorsError("image is an empty list; pass an image, or a list of them for a batch")
        images = [load_image(i) if isinstance(i, (str, os.PathLike)) else i for i in images]
        f = self.vae_scale_factor
        if all(isinstance(i, Image.Image) for i in images):
            w, h = width or images[0].width, height or images[0].height
            w, h = w - w % f, h - h % f
            _check_image_size(images[0].width, images[0].height, w, h, f)
            arrays = []
            for im in images:
                im = im.convert("RGB")
                im = im if (w, h) == im.size else im.resize((w, h), resample=Image.LANCZOS)
                arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
            batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
            return batch * 2.0 - 1.0 if normalize else batch
        if all(isinstance(i, np.ndarray) for i in images):
            batch = np.concatenate(images) if images[0].ndim == 4 else np.stack(images)
            if batch.ndim != 4 or batch.shape[-1] != 3:
                raise KolorsError(
                    f"a numpy image must be HWC or NHWC with 3 channels, not shape {batch.shape}"
                )
            batch = torch.from_numpy(batch.astype(np.float32)).permute(0, 3, 1, 2)
        elif all(isinstance(i, torch.Tensor) for i in images):
            batch = torch.cat(images) if images[0].ndim == 4 else torch.stack(images)
            if batch.ndim != 4 or batch.shape[1] != 3:
                raise KolorsError(
                    f"a tensor image must be CHW or NCHW with 3 channels, not shape {tuple(batch.shape)}"
                )
            batch = batch.detach().float().cpu()
        else:
            kinds = ", ".join(sorted({type(i).__name__ for i in images}))
            raise KolorsError(
                f"image must be a PIL image, a path, a numpy array or a torch tensor (or a list of one kind), not {kinds}"
            )
        h, w = height or batch.shape[2], width or batch.shape[3]
        h, w = h - h % f, w - w % f
        _check_image_size(batch.shape[3], batch.shape[2], w, h, f)
        if (h, w) != tuple(batch.shape[2:]):
            batch = torch.nn.functional.interpolate(batch, size=(h, w))
        if not normalize:
            return batch
        return batch if batch.min() < 0 else batch * 2.0 - 1.0  # [0, 1] to [-1, 1]; negatives: already there

    def _encode_image(
        self, image: torch.Tensor, batch: int, generator, repeat_first: bool = True
    ) -> torch.Tensor:
        """Scaled VAE latents of the init images, sampled as diffusers' prepare_latents does: with a list of
        generators the images are repeated to the batch and row i drawn from generator i, else one draw for the
        images, repeated over the batch. `repeat_first=False`: as its inpaint pipeline does, row i of the images
        as given drawn from generator i, then repeated."""
        if batch % image.shape[0]:
            raise KolorsError(
                f"{image.shape[0]} init images do not divide into {batch} images; give one or {batch}"
            )
        vae_dtype = next(self.vae.parameters()).dtype
        image = image.to(self.device, vae_dtype)
        if isinstance(generator, list) and len(generator) > 1:
            image = image.repeat(batch // image.shape[0], 1, 1, 1) if repeat_first else image
            rows = [
                sample_latent(*self.vae.encode(image[i : i + 1]), generator[i]) for i in range(image.shape[0])
            ]
            latents = torch.cat(rows)
        else:
            latents = sample_latent(*self.vae.encode(image), generator)
        latents = (self.vae.config.scaling_factor * latents).to(self.dtype)
        return latents.repeat(batch // latents.shape[0], 1, 1, 1)

    def _inpaint_region(self, image, mask_image, height, width, pad, blur, fill: bool = False) -> _Region:
        """The image and mask as the sampler sees them, prepared as diffusers' inpaint pipeline does: the mask
        blurred by `blur` pixels first (at the image's size), then both cut to the crop around the mask when
        `pad` is given ("fill" resize) or resized to the output size (Lanczos), the mask made grayscale and
        binarised at 50%. `fill`: the masked area painted from its surroundings first (A1111's "fill")."""
        if isinstance(image, (list, tuple)) and len(image) == 1:
            image = image[0]
        original = load_image(image) if isinstance(image, (str, os.PathLike)) else image
        if not isinstance(original, Image.Image):
            raise KolorsError(
                f"inpainting takes one PIL image or a path to one as image=, not {type(original).__name__}"
            )
        mask = load_image(mask_image) if isinstance(mask_image, (str, os.PathLike)) else mask_image
        mask = masks.as_mask(mask) if not isinstance(mask, Image.Image) else mask
        if mask.size != original.size:  # a mask painted at another resolution covers the same picture
            mask = mask.resize(original.size, resample=Image.LANCZOS)
        mask = masks.blur_mask(mask, blur)
        masks.check_mask(mask.convert("L"))
        f = self.vae_scale_factor
        w, h = width or original.width, height or original.height
        w, h = w - w % f, h - h % f
        _check_image_size(original.width, original.height, w, h, f)
        crop = None
        if pad is None:
            picture = original if original.size == (w, h) else original.resize((w, h), resample=Image.LANCZOS)
            painted = mask if mask.size == (w, h) else mask.resize((w, h), resample=Image.LANCZOS)
        else:
            if pad > max(original.size):
                raise KolorsError(
                    f"padding_mask_crop {pad} is larger than the image ({original.width}x{original.height}); "
                    f"give at most {max(original.size)} pixels"
                )
            crop = masks.crop_region(mask, w, h, pad)
            picture = masks.resize_fill(original.crop(crop), w, h)
            painted = masks.resize_fill(mask.crop(crop), w, h)
        binary = torch.from_numpy(np.asarray(painted.convert("L"), dtype=np.float32) / 255.0)[None, None]
        binary = (binary >= 0.5).float()
        picture = masks.fill_masked(picture.convert("RGB"), painted) if fill else picture
        return _Region(self._load_image(picture, None, None), binary, mask, original.convert("RGB"), crop)

    def _inpaint_start(self, region, init, batch, generator, plan, strength, masked_content, latent_shape):
        """The starting latents and how the loop keeps to the mask, drawing from the generator(s) in diffusers'
        order: the image's latents (a 4-channel UNet, or strength < 1), the noise, the masked image's latents
        (drawn even for a 4-channel UNet, which does not use them, so that later draws match).
        Returns (x, keep, extra_channels, x0, latent mask)."""
        four = self.unet.config.in_channels == self.latent_channels
        full = strength == 1.0  # diffusers starts from pure noise then, not from the noised image
        h, w = latent_shape[-2:]
        mask = torch.nn.functional.interpolate(region.mask, size=(h, w)).to(self.device)
        mask = mask.repeat(batch // mask.shape[0], 1, 1, 1)
        masked = init * (region.mask < 0.5)
        with self._stage(self.vae):
            x0 = self._encode_image(init, batch, generator, repeat_first=False) if four or not full else None
            noise = randn(latent_shape, generator, self.device, self.dtype)
            if four:
                self._skip_encode_draw(masked, generator, latent_shape)
                masked_latents = None
            else:
                masked_latents = self._encode_image(masked, batch, generator, repeat_first=False)
        if x0 is not None:
            x0 = x0.float()
            if masked_content == "latent noise":  # A1111's: the masked area's latents replaced by fresh noise
                x0 = (1 - mask) * x0 + mask * randn(latent_shape, generator, self.device, self.dtype).float()
            elif masked_content == "latent nothing":
                x0 = (1 - mask) * x0
        noise = noise.float()
        if plan.steps == 0:
            x = x0 if x0 is not None else noise * plan.init_noise_sigma
        elif full:
            x = noise * plan.init_noise_sigma
        else:
            x = samplers.add_noise(x0, noise, plan.sigmas[0])
        if not four:
            return x, None, torch.cat([mask.to(self.dtype), masked_latents], dim=1), x0, mask

        known = 1 - mask  # once per generation, not per step

        def keep(x: torch.Tensor, sigma: float) -> torch.Tensor:
            return known * samplers.add_noise(x0, noise, sigma) + mask * x

        return x, keep, None, x0, mask

    def _skip_encode_draw(self, images: torch.Tensor, generator, latent_shape) -> None:
        """Draw from the generator(s) what sampling the VAE latents of `images` would draw, without encoding."""
        dtype = next(self.vae.parameters()).dtype
        shape = (1, *latent_shape[1:])
        if isinstance(generator, list) and len(generator) > 1:
            for i in range(images.shape[0]):
                randn(shape, generator[i], "cpu", dtype)
        else:
            randn((images.shape[0], *latent_shape[1:]), generator, self.device, dtype)

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents.to(self.dtype)
        vae_dtype = next(self.vae.parameters()).dtype
        image = self.vae.decode((latents / self.vae.config.scaling_factor).to(vae_dtype))
        image = (image.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return image
        return [Image.fromarray(a) for a in (image * 255).round().astype("uint8")]


def generate(
    pipe: KolorsPipeline,
    request: GenerationRequest,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
) -> list[tuple[Image.Image, int]]:
    """KolorsPipeline.generate, for anything that is called like a pipeline (the server's workers wrap theirs)."""
    request = request.validate().with_seed()
    if request.loras or pipe.get_active_adapters():
        pipe.set_loras(request.loras)  # this request's LoRAs and none other; the base weights stay loaded
    image_prompts = image_prompt_call(pipe, request)
    out = pipe(
        request.prompt,
        negative_prompt=request.negative_prompt,
        height=None if request.image else request.height,
        width=None if request.image else request.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        sampler=request.sampler,
        schedule=request.schedule,
        seed=request.seeds,
        num_images_per_prompt=request.num_images,
        image=request.image,
        strength=request.strength,
        callback=callback,
        **inpainting(request),
        **control_call(pipe, request),
        **image_prompts,
    )
    return list(zip(out.images, out.seeds, strict=True))


def image_prompt_call(pipe: KolorsPipeline, request: GenerationRequest) -> dict:
    """The image-prompt keywords of a pipeline call for `request` (its reference image, its face), each adapter's
    scale set to the request's; a prompt for an adapter the pipeline has not loaded is an InvalidRequest."""
    image_prompts = {}
    if request.ip_image is not None:
        if getattr(pipe, "ip_adapter", None) is None:
            raise InvalidRequest(
                "ip_image", "a reference image was given but this pipeline has no IP-Adapter loaded"
            )
        pipe.set_ip_adapter_scale(request.ip_scale)
        image_prompts["ip_adapter_image"] = request.ip_image
    if request.face_image is not None:
        if getattr(pipe, "faceid", None) is None:
            raise InvalidRequest(
                "face_image", "a face image was given but this pipeline has no FaceID adapter loaded"
            )
        pipe.set_faceid_scale(request.face_scale)
        image_prompts["face_image"] = request.face_image
        if request.face_embeds is not None:
            image_prompts["face_embeds"] = np.asarray(request.face_embeds, dtype=np.float32)
    return image_prompts


def inpainting(request: GenerationRequest) -> dict:
    """The pipeline's inpainting arguments for `request` (none without a mask)."""
    if request.mask is None:
        return {}
    return dict(
        mask_image=masks.invert_mask(request.mask) if request.mask_invert else request.mask,
        padding_mask_crop=request.inpaint_padding,
        mask_blur=request.mask_blur,
        masked_content=request.masked_content,
        paste_back=request.paste_back,
    )


def control_call(pipe: KolorsPipeline, request: GenerationRequest) -> dict:
    """The ControlNet keywords of a pipeline call for `request`'s units: each unit's model loaded if it is a
    folder or repo not loaded yet (the CLI's; a server lets through only the names it loaded), its image
    preprocessed, each image sized as the init image or the request."""
    if not request.controlnets:
        return {}
    names = []
    for unit in request.controlnets:
        loaded = unit.model in pipe.controlnets or unit.model.split(" [")[0] in pipe.controlnets
        names.append(unit.model if loaded else pipe.load_controlnet(unit.model))
    images = []
    for unit in request.controlnets:
        image = load_image(unit.image) if isinstance(unit.image, str) else unit.image
        images.append(
            image if unit.preprocess == "none" else preprocess(unit.preprocess, image, **dict(unit.options))
        )
    return dict(
        control_image=images,
        controlnet=names,
        controlnet_conditioning_scale=[u.scale for u in request.controlnets],
        control_guidance_start=[u.start for u in request.controlnets],
        control_guidance_end=[u.end for u in request.controlnets],
        control_mode=[u.control_mode for u in request.controlnets],
        guess_mode=request.control_guess_mode,
    )


def lora_hashes(pipe: KolorsPipeline, request: GenerationRequest) -> GenerationRequest:
    """`request` with the A1111 short hash of each of its LoRAs (read from the files the pipeline loaded), and the
    names of the image-prompt adapters it used: what its images' parameters record."""
    names = []
    for kind, slot, image in (("ip", "ip_adapter", request.ip_image), ("face", "faceid", request.face_image)):
        adapter = getattr(pipe, slot, None)
        if image is not None and adapter is not None:
            names.append((kind, adapter.file.stem))
    if names:
        request = dataclasses.replace(request, image_adapters=tuple(names))
    if not request.loras:
        return request
    hashes = tuple((lora_name(name), digest) for name, digest in pipe.lora_hashes())
    return dataclasses.replace(request, lora_hashes=hashes)


# -------------------------------------------------------------------------------------------------- checks


def _check_eta(eta: float, sampler: str) -> None:
    if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise KolorsError(f"eta must be between 0 and 1, not {eta!r}")
    if eta and sampler != "ddim":
        raise KolorsError(f"eta is DDIM's noise; sampler {sampler} takes none (use sampler='ddim' or eta=0)")


class _SigmaGrid:
    """Index of a sigma in the schedule's grid, on the host. Samplers evaluate in order, so the search starts
    at the last point found: a sigma that occurs twice maps to its next occurrence."""

    def __init__(self, sigmas: Sequence[float]):
        self.sigmas, self.cursor = tuple(sigmas), 0

    def index(self, sigma: float) -> int:
        for i in range(self.cursor, len(self.sigmas)):
            if self.sigmas[i] == sigma:
                self.cursor = i
                return i
        if sigma in self.sigmas:  # a sampler that goes back: the first occurrence
            self.cursor = self.sigmas.index(sigma)
            return self.cursor
        raise KolorsError(
            f"sigma {sigma!r} is not on the schedule; a sampler may evaluate only its grid points"
        )


def _scheduler_config(root: Path) -> samplers.SchedulerConfig:
    """scheduler_config.json, with the class diffusers loads it into: model_index.json's (the pipeline's
    from_pretrained uses that one), else the file's own `_class_name`."""
    data = read_json(root / "scheduler" / "scheduler_config.json")
    index = root / "model_index.json"
    entry = read_json(index).get("scheduler") if index.is_file() else None
    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
        data = {**data, "_class_name": entry[1]}
    return samplers.SchedulerConfig.from_json(data, source=str(root / "scheduler" / "scheduler_config.json"))


def _array_size(image) -> tuple[int, int]:
    """(height, width) of a numpy (HWC, NHWC) or torch (CHW, NCHW) image."""
    if isinstance(image, np.ndarray):
        return image.shape[-3], image.shape[-2]
    if isinstance(image, torch.Tensor):
        return image.shape[-2], image.shape[-1]
    raise KolorsError(
        f"control_image must be a PIL image, a path, a numpy array or a torch tensor, not {type(image).__name__}"
    )


def _check_image_size(width: int, height: int, w: int, h: int, f: int) -> None:
    if w < f or h < f:
        raise KolorsError(f"image of {width}x{height} is too small; it needs at least {f}x{f} pixels")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, or a clear error."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise KolorsError(f"image file not found: {path}") from None
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise KolorsError(f"cannot decode image {path}: {e}; pass a PNG, JPEG or WebP file") from None


def _one_adapter_images(images) -> list:
    """The reference images of the one IP-Adapter, as diffusers takes them: an image, [image] or [[a, b]]."""
    if not isinstance(images, (list, tuple)):
        return [images]
    if len(images) == 1:
        inner = images[0]
        return list(inner) if isinstance(inner, (list, tuple)) else [inner]
    if all(not isinstance(i, (list, tuple)) for i in images):
        raise KolorsError(
            f"ip_adapter_image has {len(images)} entries for the one IP-Adapter loaded; pass several reference "
            "images for it as a nested list [[a, b]], as diffusers"
        )
    raise KolorsError("ip_adapter_image: one IP-Adapter is loaded; pass [[a, b]] (one list for it)")


def _as_prompt_list(prompt, name: str, n: int | None = None) -> list[str]:
    if isinstance(prompt, str):
        return [prompt] * (n or 1)
    if isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        if n is not None and len(prompt) != n:
            raise KolorsError(
                f"{name} has {len(prompt)} entries but there are {n} prompts; give one each or one string"
            )
        return list(prompt)
    raise KolorsError(f"{name} must be a string or a non-empty list of strings, not {type(prompt).__name__}")


def _generators(generator, seed, batch: int):
    """The generator(s) for a call and the seed(s) that made them. `seed=` is one CPU generator for the whole
    batch, as a diffusers generator is, or a list with one seed per image; without either a random seed is drawn
    so that every image can be reproduced."""
    if generator is not None and seed is not None:
        raise KolorsError("pass either generator= or seed=, not both")
    if generator is not None:
        if isinstance(generator, list) and len(generator) != batch:
            raise KolorsError(
                f"{len(generator)} generators given for {batch} images; give one per image or one"
            )
        return generator, None
    if seed is None:
        seed = random_seed()
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise KolorsError(f"{len(seed)} seeds given for {batch} images; give one per image or one")
        for s in seed:
            check_seed(s)
        return [torch.Generator("cpu").manual_seed(s) for s in seed], list(seed)
    check_seed(seed)
    return torch.Generator("cpu").manual_seed(seed), [seed] * batch


def _model_name(root: Path, model) -> str:
    index = root / "model_index.json"
    name = str(model).rstrip("/").split("/")[-1]
    if index.is_file():
        read_json(index)  # a corrupt model_index.json is worth an early, clear error
    return name or root.name


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device
