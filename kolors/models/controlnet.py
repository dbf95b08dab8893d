"""ControlNet for Kolors: diffusers' ControlNetModel, the UNet's encoder half with a small image encoder in front.

A control image (B, 3, H, W) in [0, 1] is embedded to the latent resolution by `controlnet_cond_embedding` and
added to `conv_in`'s output; the down and mid blocks then run exactly as the UNet's (the same modules from
kolors.models.unet), and every skip and the mid output go through a zero-initialised 1x1 convolution
(`controlnet_down_blocks`, `controlnet_mid_block`). Those outputs, times the conditioning scale, are residuals
that the UNet adds to its own skips and mid output (UNet2DConditionModel.forward's `down_residuals`,
`mid_residual`): the one seam between the two.

Kolors' ControlNets carry their own `encoder_hid_proj` (4096 -> 2048) and apply it to the text states before
their cross-attention. diffusers' core ControlNetModel builds that layer but never calls it (the official
Kolors pipeline patches its forward); here `prepare_context` applies it, and computes every cross-attention's
keys and values once per generation, as the UNet does. The control image's embedding depends on the image alone
too, so `prepare_hint` computes it once per generation (diffusers runs those full-resolution convolutions at
every step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kolors.config import ConfigError, check_positive
from kolors.models.layers import Conv2d, PlainLinear, fast_cpu
from kolors.models.unet import (
    ContextCache,
    DownBlock,
    MidBlock,
    TimestepEmbedding,
    UNet2DConditionModel,
    UNetConfig,
)


@dataclass(frozen=True)
class ControlNetConfig:
    """The fields of diffusers' ControlNetModel config.json. Defaults are diffusers'; the options this engine
    implements only at one value are checked by the UNetConfig its blocks are built from (`blocks`)."""

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    cross_attention_dim: int
    attention_head_dim: int | tuple[int, ...] = 8
    layers_per_block: int = 2
    in_channels: int = 4
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    transformer_layers_per_block: int | tuple[int, ...] = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    only_cross_attention: bool | tuple[bool, ...] = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    act_fn: str = "silu"

    def __post_init__(self) -> None:
        check_positive(self, "conditioning_channels", "conditioning_embedding_out_channels")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ConfigError(
                "controlnet config: controlnet_conditioning_channel_order="
                f"{self.controlnet_conditioning_channel_order!r} must be 'rgb' or 'bgr'"
            )
        if self.projection_class_embeddings_input_dim is None:
            raise ConfigError(
                "controlnet config lacks projection_class_embeddings_input_dim (an SDXL-style field)"
            )
        if self.global_pool_conditions:
            raise ConfigError("controlnet config: global_pool_conditions=true is not supported by kolors")
        if self.addition_embed_type != "text_time" or self.addition_time_embed_dim is None:
            raise ConfigError(
                "controlnet config: addition_embed_type must be 'text_time' with addition_time_embed_dim "
                f"(an SDXL-style ControlNet), not {self.addition_embed_type!r}"
            )
        _ = self.blocks  # the shared blocks' checks, with this file's name in the message

    @property
    def blocks(self) -> UNetConfig:
        """The UNet config the down and mid blocks are built from: the same fields, the up half mirrored."""
        up = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}
        fields = {f.name for f in dataclasses.fields(UNetConfig)}
        shared = {k: v for k, v in dataclasses.asdict(self).items() if k in fields}
        try:
            return UNetConfig(
                **shared,
                up_block_types=tuple(up.get(t, t) for t in reversed(self.down_block_types)),
            )
        except ConfigError as e:
            raise ConfigError(str(e).replace("unet config:", "controlnet config:")) from None
        except TypeError as e:  # a required UNet field this config left null
            raise ConfigError(f"controlnet config: {e}") from None


class ControlHint(NamedTuple):
    """A control image through `controlnet_cond_embedding` (B, C, H / 8, W / 8), from `prepare_hint`."""

    embedding: Tensor


class ControlNetConditioningEmbedding(nn.Module):
    """Control image (B, 3, H, W) -> (B, C, H / 8, W / 8): convolutions with SiLU, three of them stride 2."""

    def __init__(self, out_ch: int, in_ch: int, channels: tuple[int, ...]):
        super().__init__()
        self.conv_in = Conv2d(in_ch, channels[0], 3, padding=1)
        blocks = []
        for a, b in zip(channels[:-1], channels[1:], strict=True):
            blocks += [Conv2d(a, a, 3, padding=1), Conv2d(a, b, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = Conv2d(channels[-1], out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNetModel(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        cfg = config.blocks
        chs, temb = cfg.block_out_channels, cfg.time_embed_dim
        self.conv_in = Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], temb)
        self.encoder_hid_proj = (
            PlainLinear(cfg.encoder_hid_dim, cfg.cross_attention_dim)
            if cfg.encoder_hid_dim is not None
            else None
        )
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            chs[0], config.conditioning_channels, config.conditioning_embedding_out_channels
        )
        self.down_blocks = nn.ModuleList(
            DownBlock(cfg, i, chs[max(i - 1, 0)], kind == "CrossAttnDownBlock2D")
            for i, kind in enumerate(cfg.down_block_types)
        )
        # One 1x1 convolution per skip the UNet keeps: conv_in's output, each resnet's, each downsampler's.
        skip_channels = [chs[0]]
        for level, block in enumerate(self.down_blocks):
            skip_channels += [chs[level]] * (len(block.resnets) + (block.downsamplers is not None))
        self.controlnet_down_blocks = nn.ModuleList(Conv2d(c, c, 1) for c in skip_channels)
        self.mid_block = MidBlock(cfg)
        self.controlnet_mid_block = Conv2d(chs[-1], chs[-1], 1)
        for i, block in enumerate(self.transformer_blocks()):
            block.context_index = i

    # The UNet's conditioning code, unchanged: it reads `config` (block_out_channels, flip_sin_to_cos,
    # freq_shift, addition_time_embed_dim), time_embedding, add_embedding, encoder_hid_proj and the transformer
    # blocks, which this model names as the UNet does. prepare_context applies this model's own encoder_hid_proj.
    transformer_blocks = UNet2DConditionModel.transformer_blocks
    prepare_context = UNet2DConditionModel.prepare_context
    embed_time = UNet2DConditionModel.embed_time

    def prepare_hint(self, cond: Tensor) -> ControlHint:
        """The control image (B, 3, H, W) in [0, 1] embedded to the latent resolution, once per generation: it
        does not change between steps, and at 512x512 pixels its convolutions cost about a second of CPU."""
        if self.config.controlnet_conditioning_channel_order == "bgr":
            cond = cond.flip(1)
        cond = cond.to(self.conv_in.bias.dtype)
        if fast_cpu(cond):  # channels-last, as the latents it is added to
            cond = cond.contiguous(memory_format=torch.channels_last)
        return ControlHint(self.controlnet_cond_embedding(cond))

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor | ContextCache,
        text_embeds: Tensor,
        time_ids: Tensor,
        cond: Tensor | ControlHint,
        scale: float | Sequence[float] = 1.0,
        guess_mode: bool = False,
    ) -> tuple[list[Tensor], Tensor]:
        """Residuals for the UNet's skips (one per skip, conv_in's first) and for its mid output, each times
        `scale` (or its own of a list, the mid's last), for latents `sample` and control image `cond` (B, 3, H, W)
        in [0, 1] or its `prepare_hint`; the other inputs as the UNet's forward takes them. `guess_mode` scales
        the residuals from 0.1 (first skip) to 1 (mid) times `scale`, log-spaced, as diffusers does."""
        temb = self.embed_time(sample, timestep, text_embeds, time_ids)
        context = encoder_hidden_states
        if not isinstance(context, ContextCache):  # all T keys, diffusers' computation (with the projection)
            context = self.prepare_context(context, merge_pads=False)
        hint = cond if isinstance(cond, ControlHint) else self.prepare_hint(cond)
        if fast_cpu(sample):  # as the UNet: channels-last activations, and a fused add of two alike
            sample = sample.contiguous(memory_format=torch.channels_last)
        x = self.conv_in(sample, hint.embedding)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips += block_skips
        x = self.mid_block(x, temb, context)
        # The zero convolutions' outputs are fresh tensors: scaled in place, no second copy of every residual.
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)
        if guess_mode:
            scales = (
                torch.logspace(-1, 0, len(down) + 1, device=sample.device) * scale
            )  # float32, as diffusers
            return [d.mul_(s) for d, s in zip(down, scales, strict=False)], mid.mul_(scales[-1])
        if not isinstance(scale, (int, float)):
            *down_scales, mid_scale = scale
            return [d.mul_(s) for d, s in zip(down, down_scales, strict=True)], mid.mul_(mid_scale)
        if scale == 1.0:  # times 1 is the identity, bit for bit
            return down, mid
        return [d.mul_(scale) for d in down], mid.mul_(scale)
