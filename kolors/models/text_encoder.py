"""ChatGLM3 text encoder, only what Kolors uses: the hidden states of its last two layers.

Matches diffusers' `pipelines.kolors.text_encoder.ChatGLMModel` as `KolorsPipeline.encode_prompt` calls it:
`prompt_embeds` is the output of the second-to-last layer, `pooled` the last layer's output at the last position;
neither passes through the final RMSNorm. No generation, KV cache, prefix encoder or quantization.

The layers run on packed rows (1, rows, hidden): each prompt's real tokens plus one row standing for all its
pads (see pack_prompts), an exact shortcut the reference does not take. The outputs are (batch, tokens, hidden);
the reference's hidden states are (tokens, batch, hidden), which changes nothing numerically. Module attributes
are named as the checkpoint keys, except the unused LM head (see UNUSED_KEYS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kolors.config import ConfigError, check_positive, load_config
from kolors.models.layers import PlainLinear

# The LM head (vocab x hidden, 0.5 GB in fp16) is in every checkpoint but Kolors never reads logits.
UNUSED_KEYS = ("output_layer.weight",)
# The older Kwai-Kolors/Kolors checkpoint nests the same keys under ChatGLMForConditionalGeneration's prefix.
LEGACY_PREFIX = "transformer."
ROPE_BASE = 10000.0


def checkpoint_keys_transform(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint keys -> this module's keys: strip the legacy `transformer.` prefix and drop UNUSED_KEYS."""
    out = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix(LEGACY_PREFIX)
        if key not in UNUSED_KEYS:
            out[key] = tensor
    return out


@dataclass(frozen=True)
class TextEncoderConfig:
    num_layers: int
    padded_vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    kv_channels: int
    num_attention_heads: int
    multi_query_group_num: int
    layernorm_epsilon: float = 1e-5
    add_qkv_bias: bool = False
    add_bias_linear: bool = False
    post_layer_norm: bool = True
    # Read only to refuse variants this module does not implement (see __post_init__).
    multi_query_attention: bool = False
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    fp32_residual_connection: bool = False
    pre_seq_len: int | None = None
    quantization_bit: int = 0

    def __post_init__(self) -> None:
        check_positive(
            self,
            "num_layers",
            "padded_vocab_size",
            "hidden_size",
            "ffn_hidden_size",
            "kv_channels",
            "num_attention_heads",
            "multi_query_group_num",
            "layernorm_epsilon",
        )
        unsupported = {
            "multi_query_attention": not self.multi_query_attention,
            "rmsnorm": not self.rmsnorm,
            "apply_residual_connection_post_layernorm": self.apply_residual_connection_post_layernorm,
            "fp32_residual_connection": self.fp32_residual_connection,
            "pre_seq_len": self.pre_seq_len is not None,
            "quantization_bit": self.quantization_bit != 0,
        }
        bad = [f"{name}={getattr(self, name)!r}" for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise ConfigError(
                f"unsupported ChatGLM text encoder config ({', '.join(bad)}): only ChatGLM3 as Kolors uses it "
                "(multi-query attention, RMSNorm, pre-norm residuals, no prefix tuning, no quantization)"
            )
        groups = self.multi_query_group_num
        if self.num_layers < 1 or groups < 1 or self.num_attention_heads % groups:
            raise ConfigError(
                f"num_layers={self.num_layers} must be >= 1 and num_attention_heads={self.num_attention_heads} "
                f"a multiple of multi_query_group_num={groups} >= 1"
            )

    @classmethod
    def from_json(cls, path: str | Path) -> TextEncoderConfig:
        """Read text_encoder/config.json (or the folder holding it)."""
        path = Path(path)
        return load_config(cls, path / "config.json" if path.is_dir() else path)

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def rope_dim(self) -> int:
        """RoPE rotates the first half of each head only."""
        return self.kv_channels // 2

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.multi_query_group_num * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # The reference multiplies in fp32 (x and the weight promoted by the fp32 rsqrt) and rounds once.
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)


def rope_cache(position_ids: Tensor, rope_dim: int, dtype: torch.dtype) -> Tensor:
    """(B, T) positions -> (B, T, rope_dim // 2, 2) cos/sin, computed in fp32 from scratch as the reference does
    (it ignores the values of the inv_freq buffer), then rounded to fp16/bf16 for low-precision models."""
    theta = 1.0 / (
        ROPE_BASE ** (torch.arange(0, rope_dim, 2, dtype=torch.float, device=position_ids.device) / rope_dim)
    )
    angles = position_ids.float()[..., None] * theta  # (B, T, rope_dim // 2)
    cache = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return cache.to(dtype) if dtype in (torch.float16, torch.bfloat16) else cache


def apply_rope(x: Tensor, cache: Tensor) -> Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the first half of each head; x: (B, T, heads, hd)."""
    B, T, n, _ = x.shape
    rot = cache.shape[-2] * 2
    x, x_pass = x[..., :rot], x[..., rot:]
    xs = x.reshape(B, T, n, rot // 2, 2)
    c = cache.view(B, T, 1, rot // 2, 2)
    # Same expression as the reference so fp16/bf16 round at the same steps.
    out = torch.stack(
        [
            xs[..., 0] * c[..., 0] - xs[..., 1] * c[..., 1],
            xs[..., 1] * c[..., 0] + xs[..., 0] * c[..., 1],
        ],
        -1,
    ).flatten(3)
    return torch.cat((out, x_pass), dim=-1)


@dataclass(frozen=True)
class PackedPrompts:
    """A batch of padded prompts as one sequence of distinct rows (see pack_prompts)."""

    input_ids: Tensor  # (1, N)
    position_ids: Tensor  # (1, N)
    bias: Tensor | None  # (N, N) float32 attention bias, -inf = may not attend; None = plain causal
    rows: Tensor  # (B, T): the packed row that gives each input position its hidden state


def pack_prompts(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> PackedPrompts:
    """Pad collapse, exact: compute each prompt's real tokens and a single pad row, not T rows.

    ChatGLM's mask (get_masks) lets a real row attend causally to real tokens only, and a pad row attend to
    every position. A prompt's pads share token and position too, so every pad row has the same hidden state
    in every layer, and no real row ever reads it. One pad row stands for all P: in its attention the P
    identical pad keys are one key with logit bias ln P (a softmax over P copies of a logit equals one copy
    plus ln P), and its output is broadcast back to the P pad positions. The seed prompt (27 tokens) and an
    empty negative become 31 rows instead of 512.

    All prompts go into one sequence with a block-diagonal bias, so no row is filler. Attention then grows
    with the square of the total rows, which stays small next to the linear layers for the few prompts a
    generation encodes."""
    B, T = input_ids.shape
    real = attention_mask.bool().cpu()
    ids, pos = input_ids.cpu(), position_ids.cpu()
    packed_ids, packed_pos, blocks = [], [], []
    rows = torch.empty(B, T, dtype=torch.long, device="cpu")  # host work: a few small tensors
    start = 0  # the prompt's first packed row
    for b in range(B):
        pads = ~real[b]
        n_pad, n_real = int(pads.sum()), int(real[b].sum())
        if n_pad:
            pad_ids, pad_pos = ids[b][pads], pos[b][pads]
            if not (bool((pad_ids == pad_ids[0]).all()) and bool((pad_pos == pad_pos[0]).all())):
                raise ValueError(f"prompt {b}: pads must share one token id and one position to be collapsed")
            packed_ids.append(pad_ids[:1])
            packed_pos.append(pad_pos[:1])
            rows[b][pads] = start
        first_real = start + int(n_pad > 0)
        packed_ids.append(ids[b][real[b]])
        packed_pos.append(pos[b][real[b]])
        rows[b][real[b]] = torch.arange(first_real, first_real + n_real, device="cpu")
        blocks.append(_prompt_bias(n_pad, n_real))
        start = first_real + n_real

    bias = None
    if B > 1 or not bool(real.all()):  # else one unpadded prompt: the reference's is_causal path
        bias = torch.full((start, start), -math.inf, device="cpu")
        offset = 0
        for block in blocks:
            n = block.shape[0]
            bias[offset : offset + n, offset : offset + n] = block
            offset += n
        bias = bias.to(input_ids.device)
    packed_ids, packed_pos = torch.cat(packed_ids)[None], torch.cat(packed_pos)[None]
    device = input_ids.device
    return PackedPrompts(packed_ids.to(device), packed_pos.to(device), bias, rows.to(device))


def _prompt_bias(n_pad: int, n_real: int) -> Tensor:
    """Attention bias among one prompt's packed rows: [the pad row if it has pads, then its real tokens]."""
    causal = torch.full((n_real, n_real), -math.inf, device="cpu").triu(1)
    if not n_pad:
        return causal
    bias = torch.zeros(n_real + 1, n_real + 1, device="cpu")
    bias[0, 0] = math.log(n_pad)  # the pad row: all P identical pad keys as one, and every real key
    bias[1:, 0] = -math.inf  # real rows never see a pad
    bias[1:, 1:] = causal
    return bias


class SelfAttention(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        qkv_bias = config.add_qkv_bias or config.add_bias_linear
        self.query_key_value = PlainLinear(config.hidden_size, config.qkv_size, bias=qkv_bias)
        self.dense = PlainLinear(config.q_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: Tensor, bias: Tensor | None, rope: Tensor) -> Tensor:
        cfg = self.config
        B, T, _ = x.shape
        q, k, v = self.query_key_value(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = apply_rope(q.view(B, T, cfg.num_attention_heads, cfg.head_dim), rope)
        k = apply_rope(k.view(B, T, cfg.multi_query_group_num, cfg.head_dim), rope)
        v = v.view(B, T, cfg.multi_query_group_num, cfg.head_dim)
        # Each KV group serves a contiguous run of query heads.
        repeat = cfg.num_attention_heads // cfg.multi_query_group_num
        k = k.repeat_interleave(repeat, dim=2)
        v = v.repeat_interleave(repeat, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        # The reference's SDPA path uses the default 1/sqrt(hd) scale; apply_query_key_layer_scaling and
        # attention_softmax_in_fp32 only act in its pre-PyTorch-2 path, so they change nothing here.
        # The bias stays float32 in fp16/bf16 models: bf16 would round ln P by up to 0.016 (a 1.6% weight).
        # The CPU kernels take it as it is. A GPU kernel given a float32 bias with fp16 queries gave NaN hidden
        # states (BENCHMARKS.md, GPU), so off the CPU these few packed rows attend in float32 (in bf16 too: exact).
        if bias is not None and bias.dtype != q.dtype and q.device.type != "cpu":
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None)
        return self.dense(y.transpose(1, 2).reshape(B, T, cfg.q_size))


class MLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        bias = config.add_bias_linear
        self.dense_h_to_4h = PlainLinear(config.hidden_size, 2 * config.ffn_hidden_size, bias=bias)
        self.dense_4h_to_h = PlainLinear(config.ffn_hidden_size, config.hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)  # SwiGLU
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, bias: Tensor | None, rope: Tensor) -> Tensor:
        x = x + self.self_attention(self.input_layernorm(x), bias, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class GLMTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        if config.post_layer_norm:
            # Kolors never uses it, but it is in the checkpoint and strict loading checks it.
            self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)


class Embedding(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)


class RotaryEmbedding(nn.Module):
    def __init__(self, rope_dim: int):
        super().__init__()
        # Only kept so strict loading checks the checkpoint's tensor; rope_cache recomputes the values.
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, rope_dim, 2, dtype=torch.float) / rope_dim))
        self.register_buffer("inv_freq", inv_freq)


class ChatGLMModel(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config.rope_dim)
        self.encoder = GLMTransformer(config)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(B, T) token ids, padding mask (1 real, 0 pad) and positions -> prompt_embeds (B, T, hidden), the
        second-to-last layer's output, and pooled (B, hidden), the last layer's output at the last position.
        Computed on the packed rows of pack_prompts and broadcast back to all T positions."""
        packed = pack_prompts(input_ids, attention_mask, position_ids)
        x = self.embedding.word_embeddings(packed.input_ids)  # (1, N, hidden)
        rope = rope_cache(packed.position_ids, self.config.rope_dim, x.dtype)
        *layers, last = self.encoder.layers
        for layer in layers:
            x = layer(x, packed.bias, rope)
        prompt_embeds = x[0][packed.rows]  # (B, T, hidden)
        pooled = last(x, packed.bias, rope)[0][packed.rows[:, -1]]
        return prompt_embeds, pooled
