"""ChatGLM3 text encoder against diffusers' ChatGLMModel as KolorsPipeline.encode_prompt calls it."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from kolors.config import ConfigError, from_dict
from kolors.models.text_encoder import (
    UNUSED_KEYS,
    ChatGLMModel,
    TextEncoderConfig,
    checkpoint_keys_transform,
    pack_prompts,
)
from tests.reference import REFERENCE, TINY_TEXT_ENCODER

FULL_CONFIG = REFERENCE / "text_encoder" / "config.json"
PROMPTS = ["a photo of a cat", "", "a lighthouse on a cliff at dusk, oil painting, " * 40]
SEED_PROMPT = '一张瓢虫的照片，微距，变焦，高质量，电影，拿着一个牌子，写着"可图"'


def tokenize(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    return dict(
        pipe.tokenizer(prompts, padding="max_length", max_length=256, truncation=True, return_tensors="pt")
    )


def reference_encode(text_encoder, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly what KolorsPipeline.encode_prompt does with the encoder's output."""
    with torch.no_grad():
        output = text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
            output_hidden_states=True,
        )
    return output.hidden_states[-2].permute(1, 0, 2).clone(), output.hidden_states[-1][-1, :, :].clone()


def encode(model: ChatGLMModel, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])


def ours_from(reference) -> ChatGLMModel:
    config = from_dict(TextEncoderConfig, TINY_TEXT_ENCODER)
    with torch.device("meta"):
        model = ChatGLMModel(config)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    model.load_state_dict(checkpoint_keys_transform(state), strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def reference(reference_pipeline):
    return reference_pipeline.text_encoder.eval()


@pytest.fixture(scope="module")
def ours(reference):
    return ours_from(reference)


@pytest.fixture(scope="module")
def inputs(reference_pipeline):
    inputs = tokenize(reference_pipeline, PROMPTS)
    real = inputs["attention_mask"].sum(1).tolist()
    assert real[0] == 7 and real[1] == 2 and real[2] == 256, real  # short, empty, truncated long prompt
    return inputs


def test_matches_reference_float32(reference, ours, inputs):
    ref_embeds, ref_pooled = reference_encode(reference, inputs)
    embeds, pooled = encode(ours, inputs)
    assert embeds.shape == (3, 256, TINY_TEXT_ENCODER["hidden_size"]) and embeds.dtype == torch.float32
    assert pooled.shape == (3, TINY_TEXT_ENCODER["hidden_size"])
    assert (embeds - ref_embeds).abs().max() <= 1e-5
    assert (pooled - ref_pooled).abs().max() <= 1e-5


def test_matches_reference_without_padding(reference, ours, reference_pipeline):
    """A prompt filling all 256 tokens has no pad: the reference then skips its mask and runs causal SDPA."""
    inputs = tokenize(reference_pipeline, PROMPTS[2:])
    assert bool(inputs["attention_mask"].all())
    ref_embeds, ref_pooled = reference_encode(reference, inputs)
    embeds, pooled = encode(ours, inputs)
    assert (embeds - ref_embeds).abs().max() <= 1e-5
    assert (pooled - ref_pooled).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference_low_precision(reference, ours, inputs, dtype):
    """Both sides in fp16/bf16. The pad collapse rounds in other places than the reference (fewer rows, one
    pad key weighted by P), so the outputs may differ by a rounding step or two; what must hold is that ours
    is as close to the float32 result as the reference's own low-precision run is."""
    exact, _ = reference_encode(reference, inputs)
    ref_embeds, ref_pooled = reference_encode(copy.deepcopy(reference).to(dtype), inputs)
    embeds, pooled = encode(copy.deepcopy(ours).to(dtype), inputs)
    assert embeds.dtype == dtype and pooled.dtype == dtype
    step = torch.finfo(dtype).eps * ref_embeds.float().abs().max()  # one rounding step at the outputs' scale
    for got, want in ((embeds, ref_embeds), (pooled, ref_pooled)):
        assert (got.float() - want.float()).abs().max() <= 2 * step
    mask = inputs["attention_mask"].bool()
    for rows in (mask, ~mask):  # real and pad positions apart: pads are where the collapse acts
        ours_error = (embeds.float() - exact)[rows].abs().max()
        reference_error = (ref_embeds.float() - exact)[rows].abs().max()
        assert ours_error <= reference_error + step


def test_matches_reference_one_prompt_at_a_time(reference, ours, reference_pipeline):
    """A single prompt packs without the block-diagonal structure of a batch: padded, empty and unpadded."""
    for prompt in PROMPTS:
        inputs = tokenize(reference_pipeline, [prompt])
        ref_embeds, ref_pooled = reference_encode(reference, inputs)
        embeds, pooled = encode(ours, inputs)
        assert (embeds - ref_embeds).abs().max() <= 1e-5
        assert (pooled - ref_pooled).abs().max() <= 1e-5


def test_pack_prompts_collapses_pads(reference_pipeline):
    """The seed prompt (27 tokens) and an empty negative: 1 + 27 + 1 + 2 = 31 rows instead of 512."""
    inputs = tokenize(reference_pipeline, [SEED_PROMPT, ""])
    assert inputs["attention_mask"].sum(1).tolist() == [27, 2]
    packed = pack_prompts(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])
    assert packed.input_ids.shape == packed.position_ids.shape == (1, 31)
    assert packed.rows.shape == (2, 256)
    assert packed.rows[0, :229].eq(0).all() and packed.rows[0, 229:].tolist() == list(range(1, 28))
    assert packed.rows[1, :254].eq(28).all() and packed.rows[1, 254:].tolist() == [29, 30]
    assert torch.equal(packed.input_ids[0, packed.rows], inputs["input_ids"])
    assert torch.equal(packed.position_ids[0, packed.rows], inputs["position_ids"])
    bias = packed.bias
    assert bias.shape == (31, 31) and bias.dtype == torch.float32
    # The pad row: its own key stands for 229 pads, and it sees its prompt's real tokens, nothing else.
    assert bias[0, 0] == pytest.approx(math.log(229)) and bias[28, 28] == pytest.approx(math.log(254))
    assert bias[0, 1:28].eq(0).all() and bias[0, 28:].eq(-math.inf).all()
    # Real rows: causal over their own prompt's real tokens, never a pad row, never the other prompt.
    assert bias[1:28, 0].eq(-math.inf).all() and bias[1:28, 28:].eq(-math.inf).all()
    causal = torch.zeros(27, 27).masked_fill(torch.ones(27, 27, dtype=torch.bool).triu(1), -math.inf)
    assert torch.equal(bias[1:28, 1:28], causal)


def test_pack_prompts_without_padding_is_plain_causal(reference_pipeline):
    inputs = tokenize(reference_pipeline, PROMPTS[2:])
    packed = pack_prompts(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])
    assert packed.bias is None and packed.input_ids.shape == (1, 256)
    assert packed.rows[0].tolist() == list(range(256))


def test_pack_prompts_refuses_pads_that_differ(reference_pipeline):
    inputs = tokenize(reference_pipeline, PROMPTS[:1])
    inputs["position_ids"][0, 3] = 5  # a pad no longer identical to the others: it cannot be collapsed
    with pytest.raises(ValueError, match="pads must share"):
        pack_prompts(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])


def test_pad_rows_are_identical(ours, inputs):
    """Left-pad rows share token, position and attention (they see everything), so their states are equal."""
    embeds, _ = encode(ours, inputs)
    mask = inputs["attention_mask"].bool()
    for row in range(2):  # the two padded prompts
        pads = embeds[row][~mask[row]]
        assert pads.shape[0] > 200
        assert torch.equal(pads, pads[:1].expand_as(pads))
        # ... and differ from the real tokens' states, which attend causally to real tokens only.
        assert not torch.allclose(pads[0], embeds[row][mask[row]][0])


def test_padding_does_not_change_real_tokens(ours, reference_pipeline, inputs):
    """Real rows never attend to pads: the short prompt alone, unpadded, gives the same real-token states."""
    alone = dict(reference_pipeline.tokenizer(PROMPTS[:1], return_tensors="pt"))
    embeds_alone, pooled_alone = encode(ours, alone)
    embeds, pooled = encode(ours, inputs)
    assert (embeds[0, -7:] - embeds_alone[0]).abs().max() <= 1e-5
    assert (pooled[0] - pooled_alone[0]).abs().max() <= 1e-5


def test_checkpoint_keys_transform(reference):
    state = reference.state_dict()
    assert set(UNUSED_KEYS) <= set(state)
    transformed = checkpoint_keys_transform(state)
    assert set(transformed) == set(state) - set(UNUSED_KEYS)
    # The older Kwai-Kolors/Kolors checkpoint: same tensors under ChatGLMForConditionalGeneration's prefix.
    legacy = checkpoint_keys_transform({f"transformer.{k}": v for k, v in state.items()})
    assert legacy.keys() == transformed.keys()
    assert all(legacy[k] is transformed[k] for k in legacy)


def test_strict_loading_catches_missing_keys(reference):
    state = checkpoint_keys_transform(reference.state_dict())
    del state["rotary_pos_emb.inv_freq"]
    with torch.device("meta"):
        model = ChatGLMModel(from_dict(TextEncoderConfig, TINY_TEXT_ENCODER))
    with pytest.raises(RuntimeError, match="inv_freq"):
        model.load_state_dict(state, strict=True, assign=True)


@pytest.mark.parametrize(
    "change",
    [
        {"rmsnorm": False},
        {"multi_query_attention": False},
        {"pre_seq_len": 8},
        {"num_layers": 0},
        {"multi_query_group_num": 3},
    ],
)
def test_unsupported_config_is_an_error(change):
    with pytest.raises(ConfigError):
        from_dict(TextEncoderConfig, {**TINY_TEXT_ENCODER, **change})


def test_full_size_on_meta_device():
    """The real ChatGLM3-6B config: parameter count and state-dict keys against diffusers' model."""
    if not FULL_CONFIG.is_file():
        pytest.skip(f"the Kolors reference folder is absent ({REFERENCE})")
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig
    from diffusers.pipelines.kolors.text_encoder import ChatGLMModel as ReferenceModel

    config = TextEncoderConfig.from_json(FULL_CONFIG)
    with torch.device("meta"):
        model = ChatGLMModel(config)
        # device="meta" too: its skip_init would otherwise materialise 25 GB on the CPU.
        reference = ReferenceModel(ChatGLMConfig(**json.loads(FULL_CONFIG.read_text())), device="meta")
    lm_head = config.padded_vocab_size * config.hidden_size
    assert sum(p.numel() for p in model.parameters()) + lm_head == 6_243_584_000
    assert model.rotary_pos_emb.inv_freq.shape == (32,)
    reference_keys = set(reference.state_dict())
    assert len(reference_keys) == 200
    assert set(model.state_dict()) | set(UNUSED_KEYS) == reference_keys
    assert not set(model.state_dict()) & set(UNUSED_KEYS)
    for key, tensor in model.state_dict().items():
        assert tensor.shape == reference.state_dict()[key].shape, key
