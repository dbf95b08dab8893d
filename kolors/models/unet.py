"""Kolors' SDXL-style UNet: diffusers' UNet2DConditionModel, restricted to what Kolors' config uses.

Three kinds of conditioning reach the network: the timestep (sinusoidal, then an MLP), the pooled text
embedding with the six SDXL size/crop numbers (the `text_time` add-embedding, summed into the timestep
embedding) and the per-token text states, projected 4096 -> 2048 by `encoder_hid_proj` and read by
every cross-attention. Module attributes carry diffusers' names, so a diffusers checkpoint loads with a
strict `load_state_dict` and no mapping.

The text states are the same at every denoising step, so `prepare_context` computes every cross-attention's
keys and values once per generation (a `ContextCache`) and `forward` reads them. It also merges ChatGLM's left
padding: a prompt's pad rows are identical to the bit, so their keys and values are too, and P identical keys
in a softmax are one key with logit bias ln P. The seed prompt with an empty negative needs 28 keys, not 256.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kolors.config import ConfigError, check_groups, check_positive
from kolors.models.layers import (
    Conv2d,
    Linear,
    PlainLinear,
    attention,
    fast_cpu,
    mkldnn,
    pack_linear_weight,
)

# Constants of diffusers' building blocks that UNet2DConditionModel never passes down from its config.
TRANSFORMER_GROUP_NORM_EPS = 1e-6  # Transformer2DModel's input GroupNorm
TRANSFORMER_LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock's LayerNorms
FF_MULT = 4  # FeedForward's inner width is 4x the model width (GEGLU doubles it again for the gate)
MAX_PERIOD = 10000  # sinusoidal timestep embedding


@dataclass(frozen=True)
class UNetConfig:
    """The fields of diffusers' unet/config.json that the Kolors UNet reads. Defaults are diffusers'
    defaults; values diffusers accepts but this engine does not implement raise a ConfigError."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int | tuple[int, ...]
    down_block_types: tuple[str, ...]
    mid_block_type: str
    up_block_types: tuple[str, ...]
    # With num_attention_heads null, diffusers reads this as the number of heads per level (diffusers
    # issue 2011): Kolors' (5, 10, 20) means heads of width 640/10 = 1280/20 = 64.
    attention_head_dim: int | tuple[int, ...]
    cross_attention_dim: int
    norm_num_groups: int
    addition_embed_type: str
    addition_time_embed_dim: int
    projection_class_embeddings_input_dim: int
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 128  # latent size of the default image: 128 x 8 = 1024 pixels for Kolors
    transformer_layers_per_block: int | tuple[int, ...] = 1
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    encoder_hid_dim_type: str | None = None
    # None: no encoder_hid_proj, the text states go straight to cross-attention (diffusers' test UNets)
    encoder_hid_dim: int | None = None
    # Options this engine implements only at their Kolors (and diffusers default) value.
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    act_fn: str = "silu"
    time_embedding_type: str = "positional"
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    class_embeddings_concat: bool = False
    center_input_sample: bool = False
    only_cross_attention: bool | tuple[bool, ...] = False
    mid_block_only_cross_attention: bool | None = None
    dual_cross_attention: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    attention_type: str = "default"
    cross_attention_norm: str | None = None
    reverse_transformer_layers_per_block: tuple | None = None

    def __post_init__(self) -> None:
        check_positive(
            self,
            "block_out_channels",
            "layers_per_block",
            "attention_head_dim",
            "cross_attention_dim",
            "norm_num_groups",
            "addition_time_embed_dim",
            "projection_class_embeddings_input_dim",
            "encoder_hid_dim",
            "in_channels",
            "out_channels",
            "sample_size",
            "transformer_layers_per_block",
            "norm_eps",
        )
        check_groups(self, "block_out_channels", "norm_num_groups")
        levels = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != levels:
                raise ConfigError(
                    f"unet config: {name} has {len(getattr(self, name))} entries, expected {levels}"
                )
        for name in ("layers_per_block", "attention_head_dim", "transformer_layers_per_block"):
            value = getattr(self, name)
            if isinstance(value, tuple) and (
                len(value) != levels or not all(isinstance(v, int) for v in value)
            ):
                raise ConfigError(f"unet config: {name}={value} must be an int or {levels} ints")
        supported = {
            "down_block_types": lambda v: set(v) <= {"DownBlock2D", "CrossAttnDownBlock2D"},
            "up_block_types": lambda v: set(v) <= {"UpBlock2D", "CrossAttnUpBlock2D"},
            "mid_block_type": lambda v: v == "UNetMidBlock2DCrossAttn",
            "cross_attention_dim": lambda v: isinstance(v, int),
            "addition_embed_type": lambda v: v == "text_time",
            # diffusers infers text_proj when only encoder_hid_dim is given
            "encoder_hid_dim_type": lambda v: v in (None, "text_proj"),
            "num_attention_heads": lambda v: v is None,
            "use_linear_projection": lambda v: v is True,
            "act_fn": lambda v: v in ("silu", "swish"),
            "time_embedding_type": lambda v: v == "positional",
            "time_embedding_act_fn": lambda v: v is None,
            "timestep_post_act": lambda v: v is None,
            "time_cond_proj_dim": lambda v: v is None,
            "class_embed_type": lambda v: v is None,
            "num_class_embeds": lambda v: v is None,
            "class_embeddings_concat": lambda v: v is False,
            "center_input_sample": lambda v: v is False,
            "only_cross_attention": lambda v: not any(v) if isinstance(v, tuple) else v is False,
            "mid_block_only_cross_attention": lambda v: not v,
            "dual_cross_attention": lambda v: v is False,
            "upcast_attention": lambda v: v is False,
            "resnet_time_scale_shift": lambda v: v == "default",
            "resnet_skip_time_act": lambda v: v is False,
            "resnet_out_scale_factor": lambda v: v == 1,
            "mid_block_scale_factor": lambda v: v == 1,
            "downsample_padding": lambda v: v == 1,
            "attention_type": lambda v: v == "default",
            "cross_attention_norm": lambda v: v is None,
            "reverse_transformer_layers_per_block": lambda v: v is None,
            "conv_in_kernel": lambda v: v % 2 == 1,
            "conv_out_kernel": lambda v: v % 2 == 1,
        }
        for name, ok in supported.items():
            if not ok(getattr(self, name)):
                raise ConfigError(f"unet config: {name}={getattr(self, name)!r} is not supported by kolors")
        if self.encoder_hid_dim is None and self.encoder_hid_dim_type is not None:
            raise ConfigError(
                f"unet config: encoder_hid_dim_type={self.encoder_hid_dim_type!r} needs encoder_hid_dim"
            )
        for level, (channels, heads) in enumerate(zip(self.block_out_channels, self.heads, strict=True)):
            if channels % heads:
                raise ConfigError(
                    f"unet config: level {level} has {channels} channels, not divisible by {heads} heads"
                )

    def _per_level(self, value: int | tuple[int, ...]) -> tuple[int, ...]:
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per level (diffusers' reading of `attention_head_dim`)."""
        return self._per_level(self.attention_head_dim)

    @property
    def layers(self) -> tuple[int, ...]:
        """Resnets per down block; each up block has one more."""
        return self._per_level(self.layers_per_block)

    @property
    def transformer_depth(self) -> tuple[int, ...]:
        """BasicTransformerBlocks per Transformer2DModel at each level; the mid block uses the last."""
        return self._per_level(self.transformer_layers_per_block)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> Tensor:
    """Sinusoidal embedding (N,) -> (N, dim), always float32, as diffusers' get_timestep_embedding."""
    half = dim // 2
    exponent = -math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device)
    args = t[:, None].float() * torch.exp(exponent / (half - freq_shift))[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = PlainLinear(in_dim, dim)
        self.linear_2 = PlainLinear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = PlainLinear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h)), x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        # Upsampling to the skip's size equals nearest 2x when the size is even, and also restores odd
        # sizes that the stride-2 convs rounded up (diffusers' forward_upsample_size).
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention without q/k/v biases; self-attention when no keys and values are given."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context_dim or dim, dim, bias=False)
        self.to_v = Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([Linear(dim, dim)])  # diffusers' to_out.1 is a parameterless dropout

    def split_heads(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)

    def kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, nh, T, hs). For cross-attention they depend on the text alone."""
        return self.split_heads(self.to_k(context)), self.split_heads(self.to_v(context))

    def forward(
        self,
        x: Tensor,
        kv: tuple[Tensor, Tensor] | None = None,
        bias: Tensor | None = None,
        residual: Tensor | None = None,
        extra_kv: tuple[tuple[Tensor, Tensor], ...] = (),
    ) -> Tensor:
        """Self-attention over x, or attention to precomputed keys and values `kv` with an additive logit
        `bias` (B, 1, 1, L); `residual` is added to the output. Each pair of `extra_kv` (an image prompt's keys
        and scaled values) is attended on its own and added before the output projection, as diffusers'
        IPAdapterAttnProcessor2_0 does."""
        B, T, C = x.shape
        k, v = self.kv(x) if kv is None else kv
        q = self.split_heads(self.to_q(x))
        y = attention(q, k, v, bias)
        for k_extra, v_extra in extra_kv:
            y = y + attention(q, k_extra, v_extra)
        return self.to_out[0](y.transpose(1, 2).reshape(B, T, C), residual)


class GEGLU(nn.Module):
    pack_key = "proj.weight"

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = PlainLinear(dim, 2 * inner)  # the value's weights, then the gate's
        # pack() moves the two halves of proj.weight here, packed
        self.register_buffer("packed_value", None, persistent=False)
        self.register_buffer("packed_gate", None, persistent=False)

    def pack(self) -> None:
        inner, w = self.proj.out_features // 2, self.proj.weight
        self.packed_value, self.packed_gate = pack_linear_weight(w[:inner]), pack_linear_weight(w[inner:])
        del self.proj.weight

    def forward(self, x: Tensor) -> Tensor:
        packed = self.packed_value is not None
        if self.proj.lora is not None and packed:  # an adapter's term (see layers) joins before the GELU
            value, gate = (t.contiguous() for t in (self.proj.lora(x) + self.proj.bias).chunk(2, dim=-1))
            value = mkldnn._linear_pointwise.binary(x, value, self.packed_value, None, "add")
            gate = mkldnn._linear_pointwise.binary(x, gate, self.packed_gate, None, "add")
            return value * F.gelu(gate)
        if self.proj.lora is None and (packed or fast_cpu(x)):  # a matmul per half, GELU and product fused
            inner, b = self.proj.out_features // 2, self.proj.bias
            w = None if packed else self.proj.weight
            value, gate = (self.packed_value, self.packed_gate) if packed else (w[:inner], w[inner:])
            gate = mkldnn._linear_pointwise(x, gate, b[inner:], "gelu", [], "none")  # erf GELU
            return mkldnn._linear_pointwise.binary(x, gate, value, b[:inner], "mul")
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # net.1 is diffusers' dropout slot, kept so that the output layer is named net.2
        self.net = nn.ModuleList([GEGLU(dim, FF_MULT * dim), nn.Identity(), Linear(FF_MULT * dim, dim)])

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.net[2](self.net[0](x), residual)


class ContextCache(NamedTuple):
    """Every cross-attention's keys and values for one batch of text states, from `prepare_context`.
    Plain tensors in a tuple, so a compiled forward reads them without a graph break."""

    kv: tuple[tuple[Tensor, Tensor], ...]  # per BasicTransformerBlock in module order: (B, nh, L, hs) each
    bias: Tensor | None  # (B, 1, 1, L) logit bias of merged pad keys, None when nothing was merged
    # Image prompts (kolors.adapters.ip_adapter), per BasicTransformerBlock: each prompt's (keys, values times
    # its scale for the block), attended apart from the text. None: no image prompt, nothing more is computed.
    ip: tuple[tuple[tuple[Tensor, Tensor], ...], ...] | None = None


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.context_index = 0  # this block's entry in ContextCache.kv, numbered by the UNet
        self.norm1 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=TRANSFORMER_LAYER_NORM_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: ContextCache) -> Tensor:
        x = self.attn1(self.norm1(x), residual=x)
        ip = () if context.ip is None else context.ip[self.context_index]
        x = self.attn2(self.norm2(x), context.kv[self.context_index], context.bias, residual=x, extra_kv=ip)
        return self.ff(self.norm3(x), residual=x)


class Transformer2DModel(nn.Module):
    """GroupNorm, linear projection in, `depth` transformer blocks over the pixels, projection out, residual."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_GROUP_NORM_EPS)
        self.proj_in = Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)
        )
        self.proj_out = Linear(channels, channels)

    def forward(self, x: Tensor, context: ContextCache) -> Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        residual = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view when x is channels-last
        return self.proj_out(h, residual).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)


def _transformers(cfg: UNetConfig, channels: int, heads: int, depth: int, count: int) -> nn.ModuleList:
    return nn.ModuleList(
        Transformer2DModel(channels, heads, depth, cfg.cross_attention_dim, cfg.norm_num_groups)
        for _ in range(count)
    )


class DownBlock(nn.Module):
    """diffusers' DownBlock2D, or CrossAttnDownBlock2D when `cross_attention` (a transformer per resnet)."""

    def __init__(self, cfg: UNetConfig, level: int, in_ch: int, cross_attention: bool):
        super().__init__()
        out_ch, n = cfg.block_out_channels[level], cfg.layers[level]
        temb, groups, eps = cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb, groups, eps) for i in range(n)
        )
        self.attentions = (
            _transformers(cfg, out_ch, cfg.heads[level], cfg.transformer_depth[level], n)
            if cross_attention
            else None
        )
        last = level == len(cfg.block_out_channels) - 1
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(out_ch)])

    def forward(self, x: Tensor, temb: Tensor, context: ContextCache) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        ch, temb, groups, eps = (
            cfg.block_out_channels[-1],
            cfg.time_embed_dim,
            cfg.norm_num_groups,
            cfg.norm_eps,
        )
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, temb, groups, eps) for _ in range(2))
        self.attentions = _transformers(cfg, ch, cfg.heads[-1], cfg.transformer_depth[-1], 1)

    def forward(self, x: Tensor, temb: Tensor, context: ContextCache) -> Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """diffusers' UpBlock2D or CrossAttnUpBlock2D: each resnet first concatenates one skip (last in, first out)."""

    def __init__(self, cfg: UNetConfig, level: int, prev_ch: int, cross_attention: bool):
        super().__init__()
        chs = cfg.block_out_channels
        out_ch, n = chs[level], cfg.layers[level] + 1
        skip_ch = [out_ch] * (n - 1) + [chs[max(level - 1, 0)]]  # the last skip comes from the level above
        temb, groups, eps = cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_ch if i == 0 else out_ch) + skip_ch[i], out_ch, temb, groups, eps)
            for i in range(n)
        )
        self.attentions = (
            _transformers(cfg, out_ch, cfg.heads[level], cfg.transformer_depth[level], n)
            if cross_attention
            else None
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if level > 0 else None

    def forward(
        self,
        x: Tensor,
        skips: list[Tensor],
        temb: Tensor,
        context: ContextCache,
        size: tuple[int, int] | None,
    ) -> Tensor:
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips), strict=True)):
            x = resnet(torch.cat([x, skip], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


def merge_leading_repeats(states: Tensor, pads: list[int] | None = None) -> tuple[Tensor, Tensor | None]:
    """Rows (B, L, D) and logit bias (B, 1, 1, L) with the same attention as all T rows of `states` (B, T, D)
    as keys and values: each prompt's leading run of P rows identical to its first (left pads) is kept as
    m copies with bias ln(P / m) each, since exp(s + ln(P / m)) summed m times is P exp(s). m is 1 for the
    prompt with the most real rows and larger for the others, so every prompt has the same L keys and no
    key is masked out. (states, None) when some prompt has no run to merge, or a first row that is not equal
    to itself (NaN from an overflowing encoder: left as it is, as diffusers leaves it).

    `pads`, each prompt's left pad count from its tokens, gives the runs without reading the states back to the
    host: the pad rows are the run (a prompt without pads has a run of its first row alone)."""
    B, T, _ = states.shape
    if pads is not None:
        runs = [max(p, 1) for p in pads]
    else:
        same = (states == states[:, :1]).all(dim=-1)  # (B, T)
        runs = same.int().cumprod(dim=1).sum(dim=1).tolist()  # P per prompt; a host read
    L = T - min(runs) + 1  # keys of the prompt with the most real rows: its run becomes one key
    if L >= T:
        return states, None
    index, bias = [], []
    for p in runs:
        m = L - (T - p)  # copies of the pad row that fill this prompt up to L keys: 1 <= m <= p
        index.append([0] * m + list(range(p, T)))
        bias.append([math.log(p / m)] * m + [0.0] * (T - p))
    index = torch.tensor(index, device=states.device)  # (B, L)
    rows = states.gather(1, index[:, :, None].expand(B, L, states.shape[-1]))
    # CPU attention adds a float32 bias exactly to its float32 logits (ln 249 in bf16 is off by 0.014);
    # GPU kernels want the bias in the query's dtype.
    on_cpu = states.device.type == "cpu"
    bias_dtype = torch.promote_types(states.dtype, torch.float32) if on_cpu else states.dtype
    bias = torch.tensor(bias, dtype=bias_dtype, device=states.device)[:, None, None, :]
    return rows, bias


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        chs, temb = cfg.block_out_channels, cfg.time_embed_dim
        self.conv_in = Conv2d(cfg.in_channels, chs[0], cfg.conv_in_kernel, padding=cfg.conv_in_kernel // 2)
        self.time_embedding = TimestepEmbedding(chs[0], temb)
        # None: diffusers' test components, whose text states are already cross_attention_dim wide
        self.encoder_hid_proj = (
            PlainLinear(cfg.encoder_hid_dim, cfg.cross_attention_dim)
            if cfg.encoder_hid_dim is not None
            else None
        )
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
        self.down_blocks = nn.ModuleList(
            DownBlock(cfg, i, chs[max(i - 1, 0)], kind == "CrossAttnDownBlock2D")
            for i, kind in enumerate(cfg.down_block_types)
        )
        self.mid_block = MidBlock(cfg)
        levels = range(len(chs) - 1, -1, -1)  # up_blocks[0] is the deepest level
        self.up_blocks = nn.ModuleList(
            UpBlock(cfg, level, chs[min(level + 1, len(chs) - 1)], kind == "CrossAttnUpBlock2D")
            for level, kind in zip(levels, cfg.up_block_types, strict=True)
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = Conv2d(
            chs[0], cfg.out_channels, cfg.conv_out_kernel, padding=cfg.conv_out_kernel // 2
        )
        for i, block in enumerate(self.transformer_blocks()):
            block.context_index = i

    def transformer_blocks(self) -> list[BasicTransformerBlock]:
        """Every BasicTransformerBlock in module order: the order of ContextCache.kv."""
        return [m for m in self.modules() if isinstance(m, BasicTransformerBlock)]

    def prepare_context(
        self, encoder_hidden_states: Tensor, merge_pads: bool = True, pads: list[int] | None = None
    ) -> ContextCache:
        """Project the text states (B, T, encoder_hid_dim) and compute every cross-attention's keys and
        values, once for all denoising steps. With `merge_pads`, each prompt's leading run of rows identical
        to its first (ChatGLM's left pads) becomes one key with logit bias ln(run length): the same attention,
        fewer keys. `pads`, each row's left pad count from the tokenizer, says where the runs are; without it
        they are found by reading (B,) counts back to the host: one sync per call, none per step."""
        states, bias = (
            merge_leading_repeats(encoder_hidden_states, pads)
            if merge_pads
            else (encoder_hidden_states, None)
        )
        context = states if self.encoder_hid_proj is None else self.encoder_hid_proj(states)  # (B, L, cross)
        kv = tuple(block.attn2.kv(context) for block in self.transformer_blocks())
        return ContextCache(kv, bias)

    def embed_time(self, sample: Tensor, timestep: Tensor, text_embeds: Tensor, time_ids: Tensor) -> Tensor:
        """Timestep embedding plus the `text_time` add-embedding (B, time_embed_dim), in the model's dtype."""
        cfg = self.config
        t = timestep.to(sample.device).reshape(-1).expand(sample.shape[0])
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        # The sinusoids are float32; diffusers casts them to the sample's dtype before the MLP.
        emb = self.time_embedding(t_emb.to(sample.dtype))
        time_embeds = timestep_embedding(
            time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
        )
        time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)  # (B, 6 * addition_time_embed_dim)
        # cat promotes a half-precision text_embeds to float32 before the cast, as in diffusers
        add_embeds = torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
        return emb + self.add_embedding(add_embeds)

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor | ContextCache,
        text_embeds: Tensor,
        time_ids: Tensor,
        down_residuals: list[Tensor] | None = None,
        mid_residual: Tensor | None = None,
    ) -> Tensor:
        """Epsilon prediction (B, out_channels, h, w) for latents `sample` (B, in_channels, h, w) at
        `timestep` ((B,) or 0-dim); `encoder_hidden_states` are the text states (B, T, encoder_hid_dim)
        before `encoder_hid_proj`, or their `prepare_context` cache; `text_embeds` (B, encoder_hid_dim) is
        the pooled text, `time_ids` (B, 6). `down_residuals` (one per skip) and `mid_residual` are a
        ControlNet's, added to the skips and the mid output as diffusers' down_block_additional_residuals and
        mid_block_additional_residual are."""
        temb = self.embed_time(sample, timestep, text_embeds, time_ids)
        context = encoder_hidden_states
        if not isinstance(context, ContextCache):  # all T keys, exactly diffusers' computation
            context = self.prepare_context(context, merge_pads=False)
        if fast_cpu(sample):  # faster CPU convolutions, and the transformers' (B, HW, C) become views
            sample = sample.contiguous(memory_format=torch.channels_last)
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips += block_skips
        if down_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_residuals, strict=True)]
        x = self.mid_block(x, temb, context)
        if mid_residual is not None:
            x = x + mid_residual
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            x = block(x, block_skips, temb, context, size=skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(x))).contiguous()  # channels-last back to standard
