"""The CLIP vision tower that IP-Adapter reads: transformers' CLIPVisionModelWithProjection and its image processor.

The adapters read the second-to-last hidden state (B, 1 + (image_size / patch_size)^2, hidden), so `hidden_states`
stops one layer early: the last encoder layer, the post-layernorm and the projection are loaded (the checkpoint has
them and loading is strict) but never run for an adapter. Module attributes carry transformers' names.

Preprocessing is transformers' PIL backend (CLIPImageProcessorPil) step for step, without transformers: shortest
side resized to `size` with PIL's bicubic filter on the uint8 image, center crop, rescale by 1/255 in float64 then
float32, normalise with the CLIP mean and std. One grey level or another resize filter moves the adapter's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from kolors.config import ConfigError, check_positive, from_dict, read_json

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: the defaults when a folder has no preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Keys some checkpoints carry that the vision tower does not use: a whole CLIPModel's text half (the FaceID repo's
# clip-vit-large-patch14-336 is one), and position ids saved as a buffer by older transformers.
UNUSED_PREFIXES = ("text_model.", "text_projection.", "logit_scale")
UNUSED_KEYS = ("vision_model.embeddings.position_ids",)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' CLIPVisionConfig that the tower reads (a whole CLIPConfig's `vision_config`
    works too: see `load_clip_vision_config`)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    projection_dim: int
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_positive(
            self,
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
            "projection_dim",
            "num_channels",
            "layer_norm_eps",
        )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # the patches and the class token


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def load_clip_vision_config(path: str | Path) -> CLIPVisionConfig:
    """An image encoder's config.json: a CLIPVisionConfig, or a whole CLIPConfig whose vision half is used."""
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("vision_config"), dict):
        data = {"projection_dim": data.get("projection_dim"), **data["vision_config"]}
    return from_dict(CLIPVisionConfig, data, source=str(path))


def checkpoint_keys_transform(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint keys -> this module's keys: drop a CLIPModel's text half and the old position-ids buffer."""
    return {k: v for k, v in state_dict.items() if not k.startswith(UNUSED_PREFIXES) and k not in UNUSED_KEYS}


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, pixels: Tensor) -> Tensor:
        B = pixels.shape[0]
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # (B, HW, D)
        x = torch.cat([self.class_embedding.expand(B, 1, -1), patches], dim=1)
        return x + self.position_embedding.weight


class SelfAttention(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        d, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.k_proj, self.v_proj, self.q_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)

        y = F.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        )
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: transformers' name
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPVisionModelWithProjection(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def hidden_states(self, pixel_values: Tensor, skip_last: int = 1) -> Tensor:
        """transformers' `hidden_states[-1 - skip_last]` for pixels (B, C, image_size, image_size): the
        pre-layernormed embeddings passed through all but the last `skip_last` encoder layers. The adapters read
        skip_last=1, the second-to-last (B, num_positions, hidden)."""
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        for layer in vm.encoder.layers[: len(vm.encoder.layers) - skip_last]:
            x = layer(x)
        return x

    def forward(self, pixel_values: Tensor) -> Tensor:
        """The projected image embedding (B, projection_dim): the class token's last state, post-layernormed."""
        x = self.hidden_states(pixel_values, skip_last=0)
        return self.visual_projection(self.vision_model.post_layernorm(x[:, 0]))


# ---------------------------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of preprocessor_config.json that CLIP's processor uses; `size` is the shortest side."""

    size: int
    crop_size: int
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self) -> None:
        check_positive(self, "size", "crop_size", "image_std")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError("image_mean and image_std need one value per RGB channel")


def load_image_processor_config(folder: str | Path, image_size: int) -> ImageProcessorConfig:
    """The folder's preprocessor_config.json (sizes as ints or transformers' dicts), else the CLIP defaults at the
    encoder's own `image_size`, as diffusers builds CLIPImageProcessor(size=image_size, crop_size=image_size)."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return ImageProcessorConfig(image_size, image_size)
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")

    def side(value, *names: str):
        if isinstance(value, dict):
            value = next((value[n] for n in names if n in value), None)
        return value if value is not None else image_size

    data = {
        **data,
        "size": side(data.get("size"), "shortest_edge", "height"),
        "crop_size": side(data.get("crop_size"), "height", "shortest_edge"),
    }
    return from_dict(ImageProcessorConfig, data, source=str(path))


def preprocess(images: list[Image.Image], cfg: ImageProcessorConfig) -> Tensor:
    """Pixel values (N, 3, crop, crop) float32 as transformers' CLIPImageProcessorPil makes them."""
    out = []
    for image in images:
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = cfg.size, int(cfg.size * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)  # PIL's (width, height)
        a = np.asarray(image.resize(size, resample=Image.BICUBIC)).transpose(2, 0, 1)  # (3, H, W) uint8
        a = _center_crop(a, cfg.crop_size)
        a = (a.astype(np.float64) * (1 / 255)).astype(np.float32)
        mean, std = np.array(cfg.image_mean, np.float32), np.array(cfg.image_std, np.float32)
        out.append((a - mean[:, None, None]) / std[:, None, None])
    return torch.from_numpy(np.stack(out))


def _center_crop(a: np.ndarray, crop: int) -> np.ndarray:
    """transformers' center_crop of a (C, H, W) array: zero padding first when the image is smaller."""
    _, H, W = a.shape
    if H < crop or W < crop:
        padded = np.zeros((a.shape[0], max(H, crop), max(W, crop)), a.dtype)
        top, left = -(-(padded.shape[1] - H) // 2), -(-(padded.shape[2] - W) // 2)  # ceil, as transformers
        padded[:, top : top + H, left : left + W] = a
        a, H, W = padded, *padded.shape[1:]
    top, left = (H - crop) // 2, (W - crop) // 2
    return a[:, top : top + crop, left : left + crop]
