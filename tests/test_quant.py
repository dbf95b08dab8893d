"""Weight-only int8/int4 text encoder: layer math, sizes, bounded deviation, and the pipeline and CLI options.

Deviation bounds are for the tiny random model: indicative only, like every number on random weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from kolors import KolorsPipeline
from kolors.cli import main
from kolors.errors import KolorsError
from kolors.models.layers import PlainLinear
from kolors.models.quant import (
    Int4Linear,
    Int8Linear,
    load_quantized,
    nbytes,
    parse_quant,
    quantize_text_encoder,
)
from kolors.models.text_encoder import ChatGLMModel, TextEncoderConfig, checkpoint_keys_transform
from kolors.request import read_parameters
from kolors.weights import Checkpoint, weight_files
from tests.test_text_encoder import PROMPTS, encode, ours_from, tokenize

LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def random_linear(n_out: int, n_in: int, dtype=torch.float32, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, n_in**-0.5)
    return linear.to(dtype).requires_grad_(False)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.fixture(scope="module")
def ours(reference_pipeline):
    return ours_from(reference_pipeline.text_encoder.eval())


@pytest.fixture(scope="module")
def inputs(reference_pipeline):
    return tokenize(reference_pipeline, PROMPTS)


# ------------------------------------------------------------------------------------------------ layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear(dtype):
    linear = random_linear(48, 64, dtype)
    original = linear.weight.clone()
    q = Int8Linear.from_linear(linear)
    assert torch.equal(linear.weight, original)  # a float32 weight is not quantized in place
    assert q.weight.dtype == torch.int8 and q.weight.shape == (48, 64)
    assert q.scale.dtype == dtype and q.scale.shape == (48,)
    # Round to nearest: each weight within half a step of its channel's scale.
    error = (q.dequantize(torch.float32) - linear.weight.float()).abs()
    assert (error <= q.scale.float()[:, None] / 2 * 1.01).all()
    x = torch.randn(2, 5, 64).to(dtype)
    y = q(x)
    assert y.shape == (2, 5, 48) and y.dtype == dtype
    # PyTorch's CPU kernel computes what the dequantize path (other devices) does.
    dequantized = torch.nn.functional.linear(x, q.dequantize(dtype), linear.bias)
    assert (y.float() - dequantized.float()).abs().max() <= 4 * torch.finfo(dtype).eps * y.abs().max()
    assert cosine(y, linear(x)) > 0.9999


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_cpu_kernel_matches_plain_layout(dtype):
    linear = random_linear(48, 96, dtype)  # 96 inputs: groups of 32
    original = linear.weight.clone()
    packed, plain = Int4Linear.from_linear(linear), Int4Linear.from_linear(linear, cpu_kernel=False)
    assert torch.equal(linear.weight, original)
    assert packed.cpu_packed and not plain.cpu_packed and packed.group_size == plain.group_size == 32
    assert packed.weight.dtype == plain.weight.dtype == torch.uint8 and plain.weight.shape == (48, 48)
    assert packed.scales_and_zeros.shape == (3, 48, 2) and packed.scales_and_zeros.dtype == dtype
    # Each weight within half a step of its group's scale.
    scale = plain.scales_and_zeros[..., 0].T.float().repeat_interleave(32, dim=1)  # (48, 96)
    error = (plain.dequantize(torch.float32) - linear.weight.float()).abs()
    assert (error <= scale / 2 * 1.01).all()
    x = torch.randn(7, 96).to(dtype)
    y_packed, y_plain = packed(x), plain(x)
    assert y_packed.dtype == dtype
    assert (y_packed.float() - y_plain.float()).abs().max() <= 4 * torch.finfo(
        dtype
    ).eps * y_plain.abs().max()
    assert cosine(y_plain, linear(x)) > 0.99


def test_int4_group_size_and_layout_choices():
    assert Int4Linear.from_linear(random_linear(32, 256)).group_size == 128
    assert Int4Linear.from_linear(random_linear(32, 64)).group_size == 64
    # The CPU kernel needs a multiple of 16 outputs; other shapes keep the plain layout and still work.
    odd = Int4Linear.from_linear(random_linear(24, 64))
    assert not odd.cpu_packed and odd(torch.randn(3, 64)).shape == (3, 24)
    with pytest.raises(ValueError, match="divisible by 32"):
        Int4Linear.from_linear(random_linear(32, 48))


def test_int4_cpu_packed_refuses_another_device():
    q = Int4Linear.from_linear(random_linear(32, 64))
    with pytest.raises(RuntimeError, match="quantize the text encoder on the device"):
        q(torch.empty(3, 64, device="meta"))


# ------------------------------------------------------------------------------------------------ encoder


@pytest.mark.parametrize(
    ("quant", "layer", "storage", "min_cosine"),
    [("int8", Int8Linear, torch.int8, 0.999), ("int4", Int4Linear, torch.uint8, 0.95)],
)
def test_quantized_encoder(ours, inputs, quant, layer, storage, min_cosine):
    exact_embeds, exact_pooled = encode(ours, inputs)
    linears = [m for name, m in ours.named_modules() if name.rsplit(".", 1)[-1] in LINEARS]
    linear_bytes = sum(nbytes(m) for m in linears)
    other_bytes = nbytes(ours) - linear_bytes

    model = quantize_text_encoder(copy.deepcopy(ours), quant)
    swapped = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in LINEARS]
    assert len(swapped) == 4 * ours.config.num_layers
    assert all(isinstance(m, layer) and m.weight.dtype == storage for m in swapped)
    # Embedding and norms keep the model dtype.
    assert model.embedding.word_embeddings.weight.dtype == torch.float32
    assert model.encoder.layers[0].input_layernorm.weight.dtype == torch.float32
    # fp32 -> int8: a quarter, plus scales and biases; int4: an eighth plus group scales and zeros.
    quant_bytes = sum(nbytes(m) for m in swapped)
    assert quant_bytes <= linear_bytes * (0.3 if quant == "int8" else 0.2)
    assert nbytes(model) == other_bytes + quant_bytes

    embeds, pooled = encode(model, inputs)
    assert embeds.dtype == torch.float32 and embeds.shape == exact_embeds.shape
    assert cosine(embeds, exact_embeds) > min_cosine and cosine(pooled, exact_pooled) > min_cosine
    assert (
        0
        < (embeds - exact_embeds).abs().max()
        <= (0.05 if quant == "int8" else 0.5) * exact_embeds.abs().max()
    )


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_load_quantized_equals_load_then_quantize(tiny_model_dir_fp16, quant):
    """Quantizing while loading (the fp16 variant: a sharded checkpoint) gives the same tensors as loading
    everything first, and leaves nothing on the meta device."""
    folder = tiny_model_dir_fp16 / "text_encoder"
    checkpoint = Checkpoint(weight_files(folder, "fp16"), checkpoint_keys_transform)
    with torch.device("meta"):
        whole, streamed = (ChatGLMModel(TextEncoderConfig.from_json(folder)) for _ in range(2))
    quantize_text_encoder(checkpoint.load(whole, dtype=torch.bfloat16, device="cpu"), quant)
    load_quantized(streamed, checkpoint, quant, dtype=torch.bfloat16, device="cpu")
    want, got = whole.state_dict(), streamed.state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].device.type == "cpu" and torch.equal(got[k], want[k]) for k in want)
    assert repr(streamed) == repr(whole)


def test_quantize_none_is_a_no_op(ours):
    assert quantize_text_encoder(ours, None) is ours
    assert type(ours.encoder.layers[0].mlp.dense_h_to_4h) is PlainLinear  # unquantized (the LoRA seam)


def test_bad_quant_value_names_the_choices():
    assert parse_quant(None) is None and parse_quant("int4") == "int4"
    with pytest.raises(KolorsError, match="int8, int4"):
        parse_quant("int3")


# ------------------------------------------------------------------------------------------------ pipeline


@pytest.fixture(scope="module")
def exact_image(tiny_model_dir):
    pipe = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red fox", num_inference_steps=3, seed=1, output_type="np").images


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_pipeline_runs_with_quantized_text_encoder(tiny_model_dir, exact_image, quant):
    pipe = KolorsPipeline.from_pretrained(
        tiny_model_dir, dtype=torch.float32, device="cpu", text_encoder_quant=quant
    )
    pipe.set_progress_bar_config(disable=True)
    layer = Int8Linear if quant == "int8" else Int4Linear
    assert isinstance(pipe.text_encoder.encoder.layers[0].self_attention.query_key_value, layer)
    assert pipe.text_encoder_quant == quant and pipe.label == f"{pipe.name} (text encoder {quant})"
    image = pipe("a red fox", num_inference_steps=3, seed=1, output_type="np").images
    assert image.shape == exact_image.shape and np.isfinite(image).all()
    assert 0 < np.abs(image - exact_image).max() < 0.5


def test_pipeline_refuses_a_bad_quant_value_before_loading(tmp_path):
    with pytest.raises(KolorsError, match="choose one of: int8, int4"):
        KolorsPipeline.from_pretrained(tmp_path / "absent", text_encoder_quant="fp8")


def test_cli_option(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "fox.png"
    args = ["generate", "a red fox", "--model", str(tiny_model_dir), "--steps", "2", "--width", "64"]
    args += ["--height", "64", "--dtype", "float32", "--device", "cpu", "--quiet", "--output", str(out)]
    assert main([*args, "--text-encoder-quant", "int8"]) == 0 and out.is_file()
    # The image's parameters name the quantization, which changes the image.
    assert read_parameters(out).endswith(f", Model: {tiny_model_dir.name} (text encoder int8)")
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--text-encoder-quant", "int3"])
    assert exit_info.value.code == 2 and "int8" in capsys.readouterr().err
