"""kolors.models.unet against diffusers' UNet2DConditionModel: same weights (strict load), same outputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from kolors.config import ConfigError, from_dict, load_config
from kolors.models import layers, unet
from kolors.models.layers import FAST_CPU_DTYPES, pack_weights, packer
from kolors.models.unet import UNet2DConditionModel, UNetConfig, merge_leading_repeats
from tests.reference import REFERENCE, TE_HIDDEN, TINY_UNET, randomize_

FULL_CONFIG = REFERENCE / "unet" / "config.json"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """diffusers' tiny UNet (seeded, conv_out randomised as in tests.reference) and ours, loaded strictly
    from its state dict, with our config read from the config.json diffusers saves."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    torch.manual_seed(0)
    ref = DiffusersUNet(**TINY_UNET).eval()
    randomize_(ref.conv_out, 2)  # zero-initialised: every output would be 0 and every comparison pass
    path = tmp_path_factory.mktemp("unet")
    ref.save_config(path)
    ours = UNet2DConditionModel(load_config(UNetConfig, path / "config.json")).eval()
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours


def make_inputs(batch: int, h: int, w: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, h, w, generator=g),
        timestep=torch.tensor([999.0, 37.5, 500.0, 1.0][:batch]),  # distinct per batch element
        encoder_hidden_states=torch.randn(batch, 7, TE_HIDDEN, generator=g),
        text_embeds=torch.randn(batch, TE_HIDDEN, generator=g),
        time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1280, 16, 8, 768, 1280]] * 2)[:batch],
    )


@torch.no_grad()
def run_both(ref, ours, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    expected = ref(
        inputs["sample"],
        inputs["timestep"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        added_cond_kwargs=dict(text_embeds=inputs["text_embeds"], time_ids=inputs["time_ids"]),
    ).sample
    return expected, ours(**inputs)


# 8x12: non-square, divisible by 2**(levels-1). 10x14: odd sizes after one downsample, which diffusers
# handles by forwarding the skip sizes to the upsamplers.
@pytest.mark.parametrize("h,w", [(8, 12), (10, 14)])
def test_matches_diffusers_float32(models, h, w):
    ref, ours = models
    expected, actual = run_both(ref, ours, make_inputs(2, h, w))
    assert actual.shape == expected.shape == (2, 4, h, w)
    assert expected.abs().max() > 1.0  # a live output, not a zero-initialised one
    diff = (actual - expected).abs().max().item()
    print(f"float32 {h}x{w}: max abs diff {diff:.3g}, output max {expected.abs().max().item():.3g}")
    assert diff <= 1e-5


def test_scalar_timestep_broadcasts(models):
    ref, ours = models
    inputs = make_inputs(2, 8, 8) | dict(timestep=torch.tensor(421.0))
    expected, actual = run_both(ref, ours, inputs)
    assert (actual - expected).abs().max().item() <= 1e-5


def test_every_condition_moves_the_output(models):
    """The parity tests only mean something if each input matters well beyond their tolerance."""
    _, ours = models
    inputs = make_inputs(2, 8, 12)
    with torch.no_grad():
        base = ours(**inputs)
        for name in ("timestep", "encoder_hidden_states", "text_embeds", "time_ids"):
            changed = ours(**inputs | {name: inputs[name] + 1.0})
            assert (changed - base).abs().max().item() > 1e-2, name


def test_matches_diffusers_bfloat16(models):
    """On CPU kolors fuses bias, residual and GELU into its bf16 matmuls (one rounding where diffusers has
    two), so it is not bit-identical to diffusers in bf16: both are held to the float32 output instead,
    kolors' error no larger than diffusers' own (both paths: plain text states and the context cache)."""
    ref, ours = models
    ref_bf16, ours_bf16 = copy.deepcopy(ref).to(torch.bfloat16), copy.deepcopy(ours).to(torch.bfloat16)
    inputs = make_inputs(2, 8, 12) | dict(encoder_hidden_states=padded_states([10, 13]))
    truth, _ = run_both(ref, ours, inputs)
    inputs = {
        k: v if k == "timestep" else v.to(torch.bfloat16)  # the pipeline passes a float32 timestep
        for k, v in inputs.items()
    }
    expected, actual = run_both(ref_bf16, ours_bf16, inputs)
    with torch.no_grad():
        cached = ours_bf16(
            **inputs | dict(encoder_hidden_states=ours_bf16.prepare_context(inputs["encoder_hidden_states"]))
        )
    assert actual.dtype == expected.dtype == cached.dtype == torch.bfloat16
    scale = truth.abs().max().item()

    def rms(x: torch.Tensor) -> float:
        return (x.float() - truth).pow(2).mean().sqrt().item()

    print(
        f"bfloat16 rms error vs float32: diffusers {rms(expected):.3g}, kolors {rms(actual):.3g}, "
        f"cached {rms(cached):.3g} (output max {scale:.3g})"
    )
    assert rms(expected) < 1e-2 * scale  # a sane bf16 reference
    assert rms(actual) <= 1.25 * rms(expected)
    assert rms(cached) <= 1.25 * rms(expected)
    assert (actual.float() - expected.float()).abs().max().item() <= 2e-2 * scale


@pytest.mark.parametrize("queries, keys, matmuls", [(96, 7, True), (256, 256, True), (257, 256, False)])
def test_small_attention_matches_sdpa(monkeypatch, queries, keys, matmuls):
    """Up to SMALL_ATTENTION_LOGITS per head the CPU fast path attends with plain matmuls, beyond it with SDPA;
    switched on for float32 so that the matmul path's scale, bias and softmax are checked against SDPA at float32
    precision, a (B, 1, 1, L) merged-pad bias as the UNet passes it."""
    monkeypatch.setattr(layers, "FAST_CPU_DTYPES", {torch.float32})
    sdpa_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **kw: sdpa_calls.append(1) or sdpa(*a, **kw)
    )
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, queries, 64, generator=g)
    k, v = torch.randn(2, 3, keys, 64, generator=g), torch.randn(2, 3, keys, 64, generator=g)
    bias = torch.zeros(2, 1, 1, keys)
    bias[:, ..., 0] = math.log(254.0)
    actual = layers.attention(q, k, v, bias)
    assert bool(sdpa_calls) != matmuls
    expected = sdpa(q, k, v, attn_mask=bias)
    assert (actual - expected).abs().max().item() < 1e-5
    assert (layers.attention(q, k, v) - sdpa(q, k, v)).abs().max().item() < 1e-5


@pytest.mark.skipif(
    torch.float32 not in layers.PACKED_DTYPES, reason="float32 is packed on x86 CPUs with oneDNN"
)
def test_float32_packs_its_linears_only_and_matches_diffusers(models):
    """What the pipeline does in float32 on x86: the linears and GEGLU's halves packed for oneDNN, the
    convolutions left plain (packed for one input size they ran several times slower at another); diffusers'
    output within float32 rounding, at a size other than the packing hint, directly and through the context
    cache. A second pass over packed weights changes nothing."""
    ref, ours = models
    packed = copy.deepcopy(ours)
    pack_weights(packed)
    buffers = dict(packed.named_buffers())
    pack_weights(packed)
    assert all(buffers[k] is v for k, v in packed.named_buffers())
    assert all(m.weight.is_mkldnn for m in packed.modules() if isinstance(m, layers.Linear))
    assert all(m.packed_value is not None for m in packed.modules() if isinstance(m, unet.GEGLU))
    assert not any(m.weight.is_mkldnn for m in packed.modules() if isinstance(m, layers.Conv2d))
    inputs = make_inputs(3, 10, 14)
    expected, actual = run_both(ref, packed, inputs)
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= 1e-5 * scale
    with torch.no_grad():
        cached = packed(
            **inputs | dict(encoder_hidden_states=packed.prepare_context(inputs["encoder_hidden_states"]))
        )
    assert (cached - expected).abs().max().item() <= 1e-5 * scale


@pytest.mark.skipif(torch.bfloat16 not in FAST_CPU_DTYPES, reason="oneDNN's fused bf16 linear is unavailable")
def test_fused_linears_match_diffusers_in_float32(models, monkeypatch):
    """The CPU fast path (bias, residual, GEGLU inside oneDNN matmuls; channels-last), switched on for
    float32 so that its wiring is checked at float32 precision, not hidden in bf16 rounding."""
    ref, ours = models
    monkeypatch.setattr(layers, "FAST_CPU_DTYPES", {torch.float32})
    inputs = make_inputs(2, 8, 12)
    expected, actual = run_both(ref, ours, inputs)
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= 1e-5 * scale


@pytest.mark.skipif(torch.bfloat16 not in FAST_CPU_DTYPES, reason="oneDNN's fused bf16 linear is unavailable")
@pytest.mark.parametrize("h,w", [(8, 12), (10, 14)])
def test_packed_weights_match_diffusers_in_float32(models, monkeypatch, h, w):
    """pack_weights hands every convolution and matmul weight to oneDNN in its own layout, with the residual
    adds fused into the convolutions; checked at float32 precision like the fast path above, on sizes other
    than the packing hint and a batch of 3."""
    ref, ours = models
    monkeypatch.setattr(layers, "FAST_CPU_DTYPES", {torch.float32})
    packed = copy.deepcopy(ours)
    pack_weights(packed)
    assert all(m.weight.is_mkldnn for m in packed.modules() if isinstance(m, (layers.Conv2d, layers.Linear)))
    assert "conv_in.weight" not in packed.state_dict()  # opaque tensors stay out of the state_dict
    inputs = make_inputs(3, h, w)
    expected, actual = run_both(ref, packed, inputs)
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= 1e-5 * scale
    with torch.no_grad():  # and through the context cache, as the pipeline calls it
        cached = packed(
            **inputs | dict(encoder_hidden_states=packed.prepare_context(inputs["encoder_hidden_states"]))
        )
    assert (cached - expected).abs().max().item() <= 1e-5 * scale


@pytest.mark.skipif(torch.bfloat16 not in FAST_CPU_DTYPES, reason="oneDNN's fused bf16 linear is unavailable")
def test_packing_while_loading_equals_packing_after(models, monkeypatch, tmp_path):
    """The pipeline packs each weight as it is read (packer); the model is the one pack_weights makes."""
    from safetensors.torch import save_file

    from kolors.weights import build_on_meta, load_weights

    _, ours = models
    monkeypatch.setattr(layers, "FAST_CPU_DTYPES", {torch.float32})
    monkeypatch.setattr(unet, "PACK_TRIM_BYTES", 1)  # and give memory back after every weight
    file = tmp_path / "unet.safetensors"
    save_file(ours.state_dict(), file)
    packed_after = copy.deepcopy(ours)
    pack_weights(packed_after)
    fresh = build_on_meta(lambda: UNet2DConditionModel(ours.config))
    packed_while = load_weights(fresh, [file], dtype=torch.float32, device="cpu", loaded=packer(fresh))
    buffers = lambda m: {k: b.is_mkldnn for k, b in m.named_buffers() if b is not None}  # noqa: E731
    assert buffers(packed_while) == buffers(packed_after) and any(buffers(packed_while).values())
    assert packed_while.state_dict().keys() == packed_after.state_dict().keys()
    inputs = make_inputs(2, 8, 8)
    with torch.no_grad():
        assert torch.equal(packed_while(**inputs), packed_after(**inputs))


def test_config_reads_heads_as_diffusers_does():
    cfg = from_dict(UNetConfig, dict(TINY_UNET))
    assert cfg.heads == (1, 2, 4)  # attention_head_dim, read as head counts
    assert cfg.transformer_depth == (1, 1, 2)
    assert cfg.layers == (2, 2, 2)
    assert cfg.time_embed_dim == 4 * TINY_UNET["block_out_channels"][0]


@pytest.mark.parametrize(
    "change",
    [
        dict(use_linear_projection=False),
        dict(num_attention_heads=(1, 2, 4)),
        dict(addition_embed_type="text"),
        dict(encoder_hid_dim_type="image_proj"),
        dict(down_block_types=("DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D")),
        dict(mid_block_type=None),  # null in diffusers means no mid block
        dict(upcast_attention=True),
        dict(resnet_time_scale_shift="scale_shift"),
        dict(time_cond_proj_dim=32),
        dict(attention_head_dim=(1, 3, 4)),  # 64 channels do not split into 3 heads
        dict(transformer_layers_per_block=(1, 1)),
    ],
)
def test_unsupported_config_is_an_error(change):
    with pytest.raises(ConfigError):
        from_dict(UNetConfig, dict(TINY_UNET) | change)


def test_full_size_on_meta_device():
    if not FULL_CONFIG.is_file():
        pytest.skip(f"the Kolors reference folder is absent ({REFERENCE})")
    from diffusers import UNet2DConditionModel as DiffusersUNet

    cfg = load_config(UNetConfig, FULL_CONFIG)
    assert cfg.heads == (5, 10, 20)
    with torch.device("meta"):
        ours = UNet2DConditionModel(cfg)
        ref = DiffusersUNet.from_config(DiffusersUNet.load_config(FULL_CONFIG))
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert sum(p.numel() for p in ours.parameters()) == 2_579_458_820
    assert len(ours_sd) == 1682
    assert set(ours_sd) == set(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    attn = ours.down_blocks[2].attentions[0].transformer_blocks[9].attn2
    assert attn.heads == 20 and attn.to_k.in_features == 2048


# ------------------------------------------------------------------------------ context cache, merged pads


def padded_states(batch_pads: list[int], T: int = 16, seed: int = 3) -> torch.Tensor:
    """Text states (B, T, TE_HIDDEN) whose first P rows per prompt are one repeated row, as ChatGLM's left
    pads are; each prompt its own pad row, as each prompt's pads attend to its own text."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(len(batch_pads), T, TE_HIDDEN, generator=g)
    for b, p in enumerate(batch_pads):
        states[b, :p] = states[b, 0]
    return states


def test_merge_leading_repeats_keeps_the_attention():
    states = padded_states([10, 13, 1]).double()  # the third prompt has no pads
    rows, bias = merge_leading_repeats(states[:2])
    assert rows.shape == (2, 7, TE_HIDDEN)  # 16 - 10 real rows, plus one pad key
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([math.log(10)] + [0.0] * 6).double())
    # the second prompt (3 real rows) keeps 4 pad copies so that both have 7 keys: 4 x 13/4 = 13 pads
    torch.testing.assert_close(bias[1, 0, 0], torch.tensor([math.log(13 / 4)] * 4 + [0.0] * 3).double())
    torch.testing.assert_close(rows[1, 4:], states[1, 13:], rtol=0, atol=0)
    q = torch.randn(2, 2, 5, TE_HIDDEN, dtype=torch.float64)
    full = F.scaled_dot_product_attention(q, states[:2, None], states[:2, None])
    merged = F.scaled_dot_product_attention(q, rows[:, None], rows[:, None], attn_mask=bias.to(q.dtype))
    torch.testing.assert_close(merged, full, rtol=0, atol=1e-12)
    # a prompt without pads leaves nothing to merge for the batch: every prompt keeps all of its rows
    rows, bias = merge_leading_repeats(states)
    assert bias is None and rows is states


def test_merge_leaves_nan_states_alone():
    """NaN (an encoder overflowing in fp16) is never equal to itself: no run to merge, and no crash."""
    states = padded_states([10, 13])
    states[1] = float("nan")
    rows, bias = merge_leading_repeats(states)
    assert bias is None and rows is states


@pytest.mark.parametrize("pads", [[10, 13], [15, 2], [1, 1]])
def test_context_cache_matches_the_plain_path(models, pads):
    """One cache, reused at several timesteps, gives the outputs of diffusers' full computation (with 256
    text rows the merged keys save compute; here, 16 rows keep the test small)."""
    ref, ours = models
    inputs = make_inputs(2, 8, 12) | dict(encoder_hidden_states=padded_states(pads))
    with torch.no_grad():
        cache = ours.prepare_context(inputs["encoder_hidden_states"])
    assert cache.kv[0][0].shape[2] == 16 - min(pads) + 1
    assert len(cache.kv) == len(ours.transformer_blocks()) == 17
    for timestep in (999.0, 1.0):
        step = inputs | dict(timestep=torch.tensor([timestep, timestep]))
        expected, plain = run_both(ref, ours, step)
        with torch.no_grad():
            cached = ours(**step | dict(encoder_hidden_states=cache))
        scale = expected.abs().max().item()
        assert (plain - expected).abs().max().item() <= 1e-5
        # merged pads sum the softmax in another order: float32 rounding, relative to the output's size
        assert (cached - expected).abs().max().item() <= 1e-5 * scale


def test_pipeline_text_states_merge_to_one_pad_key(tiny_model_dir):
    """The text encoder's pad rows are identical to the bit, so the pipeline's cache really is short:
    "a photo of a cat" is 7 real tokens and 249 pads, the empty negative 2 and 254."""
    from kolors.pipeline import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    embeds = pipe.encode_prompt("a photo of a cat", negative_prompt="")
    states = torch.cat([embeds.negative_prompt_embeds, embeds.prompt_embeds])
    assert states.shape[1] == 256
    with torch.no_grad():
        cache = pipe.unet.prepare_context(states)
    assert cache.kv[0][0].shape[2] == 8
    torch.testing.assert_close(cache.bias[:, 0, 0, 0], torch.tensor([math.log(254 / 6), math.log(249)]))


def test_known_pad_counts_merge_without_reading_the_states(tiny_model_dir):
    """encode_prompt records each row's left pads (PromptEmbeds.pads), and prepare_context merges by them: the
    same keys and bias as finding the runs in the states, which the counts path never reads."""
    from kolors.pipeline import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    embeds = pipe.encode_prompt(["a photo of a cat", "一只猫"], negative_prompt="")
    assert embeds.pads[0] == 249 and embeds.negative_pads == (254, 254)
    states = torch.cat([embeds.negative_prompt_embeds, embeds.prompt_embeds])
    pads = [*embeds.negative_pads, *embeds.pads]
    with torch.no_grad():
        found, given = pipe.unet.prepare_context(states), pipe.unet.prepare_context(states, pads=pads)
    torch.testing.assert_close(given.bias, found.bias, rtol=0, atol=0)
    for (k1, v1), (k2, v2) in zip(found.kv, given.kv, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    # Counts, not contents: rows that are all different still merge where the counts say.
    rows, bias = merge_leading_repeats(torch.randn(2, 16, 4), pads=[10, 13])
    assert rows.shape[1] == 7 and bias[0, 0, 0, 0].item() == pytest.approx(math.log(10))


# ------------------------------------------------------------------------------ torch.compile


def compile_inputs(ours, dtype: torch.dtype, cached: bool) -> tuple[torch.nn.Module, tuple]:
    model = copy.deepcopy(ours).to(dtype)
    inputs = {
        k: v if k == "timestep" else v.to(dtype)
        for k, v in (make_inputs(2, 8, 12) | dict(encoder_hidden_states=padded_states([10, 13]))).items()
    }
    with torch.no_grad():
        context = model.prepare_context(inputs["encoder_hidden_states"]) if cached else None
    states = context if cached else inputs["encoder_hidden_states"]
    return model, (inputs["sample"], inputs["timestep"], states, inputs["text_embeds"], inputs["time_ids"])


@pytest.mark.parametrize("dtype, cached", [(torch.bfloat16, True), (torch.float32, False)])
def test_forward_is_one_graph_for_torch_compile(models, dtype, cached):
    """torch.compile traces a whole step as one graph, with the context cache (plain tensors in a tuple) or
    raw text states, on the CPU fast path or not: no graph break to cost a GPU its fusion."""
    model, args = compile_inputs(models[1], dtype, cached)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_forward_matches_eager(models):
    """Inductor's compiled step against eager (bf16: rounding differs between their fusions). Minutes of
    compilation on a small CPU, hence slow."""
    model, args = compile_inputs(models[1], torch.bfloat16, cached=True)
    compiled = copy.deepcopy(model)
    compiled.compile()
    with torch.no_grad():
        expected, actual = model(*args), compiled(*args)
    scale = expected.float().abs().max().item()
    assert (actual.float() - expected.float()).abs().max().item() <= 3e-2 * scale


def test_pipeline_compile_is_scoped_to_the_unet(tiny_model_dir):
    from kolors.pipeline import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu", compile=True)
    assert pipe.unet._compiled_call_impl is not None  # nn.Module.compile: same module, same state-dict keys
    assert getattr(pipe.text_encoder, "_compiled_call_impl", None) is None
    assert getattr(pipe.vae, "_compiled_call_impl", None) is None


def test_cli_compile_flag_reaches_from_pretrained(tiny_model_dir, tmp_path, monkeypatch):
    from kolors import cli
    from kolors.pipeline import KolorsPipeline

    seen = {}
    load = KolorsPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return load(cls, *args, **kwargs | dict(compile=False))  # the wiring, not minutes of compiling

    monkeypatch.setattr(KolorsPipeline, "from_pretrained", classmethod(spy))
    argv = ["generate", "a cat", "--model", str(tiny_model_dir), "--dtype", "float32", "--device", "cpu"]
    argv += ["--width", "64", "--height", "64", "--steps", "1", "--quiet", "-o", str(tmp_path / "a.png")]
    assert cli.main(argv + ["--compile"]) == 0
    assert seen["compile"] is True
    assert cli.main(argv) == 0
    assert seen["compile"] is False


@pytest.mark.slow
def test_compiled_pipeline_gives_the_same_image(tiny_model_dir):
    from kolors.pipeline import KolorsPipeline

    images = [
        KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu", compile=compile)(
            "a cat", height=64, width=64, num_inference_steps=2, seed=0, output_type="np"
        ).images
        for compile in (False, True)
    ]
    assert abs(images[0] - images[1]).max() <= 1e-3


def test_bench_unet_smoke(capsys):
    """bench/bench_unet.py end to end on a small config (its numbers mean nothing at this size)."""
    if not FULL_CONFIG.is_file():
        pytest.skip(f"the Kolors reference folder is absent ({REFERENCE})")
    from bench.bench_unet import main

    # The bench's bf16 default where this CPU runs bf16 natively; elsewhere (AVX2) its 4096^3 bf16 roof matmul
    # alone is minutes of emulation, so float32.
    dtype = "bfloat16" if torch.bfloat16 in FAST_CPU_DTYPES else "float32"
    before = torch.is_grad_enabled()
    with torch.enable_grad():  # the bench turns autograd off globally; restored on leaving
        main(
            ["--channels", "64,128,128", "--depth", "1,1,1", "--latent", "8", "--tokens", "32"]
            + ["--warmup", "0", "--repeats", "1", "--prompt", "a cat", "--dtype", dtype]
        )
    assert torch.is_grad_enabled() == before
    out = capsys.readouterr().out
    assert "ratio diffusers/kolors" in out and "FLOPs per step" in out
    assert "text keys 32 -> 5" in out  # "a cat": 4 real tokens, 28 pads merged into one key
