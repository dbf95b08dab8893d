"""ChatGLM3 text encoder against diffusers' ChatGLMModel as KolorsPipeline.encode_prompt calls it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kolors.config import ConfigError, from_dict
from kolors.text_encoder import (
    UNUSED_KEYS,
    ChatGLMModel,
    TextEncoderConfig,
    checkpoint_keys_transform,
)
from tests.reference import REFERENCE, TINY_TEXT_ENCODER

FULL_CONFIG = REFERENCE / "text_encoder" / "config.json"
PROMPTS = ["a photo of a cat", "", "a lighthouse on a cliff at dusk, oil painting, " * 40]


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
    """Both sides in fp16/bf16 (seen: bit-identical on CPU). The bound is one rounding step at the outputs'
    scale: rounding the RMSNorm product once more in low precision already exceeds it."""
    ref_embeds, ref_pooled = reference_encode(copy.deepcopy(reference).to(dtype), inputs)
    embeds, pooled = encode(copy.deepcopy(ours).to(dtype), inputs)
    assert embeds.dtype == dtype and pooled.dtype == dtype
    for got, want in ((embeds, ref_embeds), (pooled, ref_pooled)):
        want = want.float()
        tolerance = torch.finfo(dtype).eps * want.abs().max()
        assert (got.float() - want).abs().max() <= tolerance


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
