"""Tiny random Kolors models built and saved by diffusers itself: the reference every test compares to.

diffusers and transformers are test-only dependencies. The tiny models use the real ChatGLM3 tokenizer
from ../shared/kolors-reference (tests that need it skip when it is absent) and configs shaped like the
real ones (three UNet levels, text_time add-embedding, text_proj, MQA with 2 KV groups, original RoPE).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

REFERENCE = Path(
    os.environ.get("KOLORS_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "kolors-reference")
)
TOKENIZER_MODEL = REFERENCE / "tokenizer" / "tokenizer.model"


def require_reference() -> Path:
    if not TOKENIZER_MODEL.is_file():
        pytest.skip(f"the Kolors reference folder is absent ({REFERENCE}); set KOLORS_REFERENCE to it")
    return REFERENCE


TE_HIDDEN = 64

TINY_TEXT_ENCODER = dict(
    num_layers=3,
    padded_vocab_size=65024,  # must cover the real tokenizer's ids (up to 64797)
    hidden_size=TE_HIDDEN,
    ffn_hidden_size=96,
    kv_channels=16,
    num_attention_heads=4,
    multi_query_attention=True,
    multi_query_group_num=2,
    add_qkv_bias=True,
    add_bias_linear=False,
    original_rope=True,
    rmsnorm=True,
    post_layer_norm=True,
    layernorm_epsilon=1e-5,
    seq_length=256,
    apply_query_key_layer_scaling=True,
    attention_softmax_in_fp32=True,
)

TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    attention_head_dim=(1, 2, 4),  # Kolors' config: read by diffusers as head counts per level
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=32,
    norm_num_groups=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TE_HIDDEN + 6 * 8,
    encoder_hid_dim=TE_HIDDEN,
    encoder_hid_dim_type="text_proj",
    flip_sin_to_cos=True,
    freq_shift=0,
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.13025,
)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter real random values: diffusers' ChatGLMModel leaves them uninitialised
    (garbage or NaN) under transformers 5. Norm weights stay near one so activations stay sane."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5)


def build_reference_pipeline(seed: int = 0):
    """A tiny diffusers KolorsPipeline with random weights (float32, CPU)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, KolorsPipeline, UNet2DConditionModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    ref = require_reference()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = ChatGLMModel(ChatGLMConfig(**TINY_TEXT_ENCODER, torch_dtype="float32"))
    randomize_(text_encoder, seed + 1)
    # The UNet's zero-initialised output conv would make every image equal; give it weights too.
    randomize_(unet.conv_out, seed + 2)
    text_encoder.rotary_pos_emb.inv_freq.copy_(
        1.0
        / (
            10000
            ** (
                torch.arange(0, text_encoder.rotary_pos_emb.inv_freq.numel() * 2, 2).float()
                / (text_encoder.rotary_pos_emb.inv_freq.numel() * 2)
            )
        )
    )
    tokenizer = ChatGLMTokenizer(str(ref / "tokenizer" / "tokenizer.model"))
    scheduler = EulerDiscreteScheduler.from_pretrained(ref / "scheduler")
    pipe = KolorsPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_reference_pipeline(pipe, path: Path, variant: str | None = None) -> Path:
    """Save with diffusers' own save_pretrained: the real on-disk layout. The fp16 variant gets a sharded
    text encoder, as the real Kolors-diffusers repository has."""
    if variant == "fp16":
        # A copy: casting the shared reference to fp16 and back would round its weights and break every
        # parity test that runs after this fixture.
        copy.deepcopy(pipe).to(torch.float16).save_pretrained(path, variant="fp16", max_shard_size="2MB")
    else:
        pipe.save_pretrained(path)
    return path
