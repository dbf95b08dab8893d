"""kolors' ChatGLM3 tokenizer against diffusers' ChatGLMTokenizer on the real tokenizer.model."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from kolors.models.tokenizer import ChatGLMTokenizer, TokenizedPrompts, TokenizerError
from tests.reference import require_reference

PROMPTS = {
    "english": "a photo of a cat",
    "chinese": "一张瓢虫的照片，微距，变焦，高质量，电影，拿着一个牌子，写着“可图”",
    "mixed": "一只戴着 sunglasses 的柴犬 sitting on a 红色 sofa, 4K, 高清",
    "emoji": "🐱🚀 a cat astronaut 宇航员 🌕✨",
    "empty": "",
    "space": " ",
    "whitespace": " \t \u3000  ",
    "special_looking": "<|user|> [gMASK] sop eop [MASK] <|assistant|> <unk> </s> <s>",
    "newlines": "first line\nsecond line\n\n\tthird\r\n",
    "fullwidth": "ＡＢＣ１２３，。！",
}
REFERENCE_KEYS = ("input_ids", "attention_mask", "position_ids")


@pytest.fixture(scope="module")
def tokenizers():
    """(ours, diffusers') built on the same real tokenizer.model."""
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer as ReferenceTokenizer

    model = require_reference() / "tokenizer" / "tokenizer.model"
    return ChatGLMTokenizer(model), ReferenceTokenizer(str(model))


def reference_call(reference, prompts: list[str], max_length: int = 256) -> dict[str, torch.Tensor]:
    """Exactly KolorsPipeline's call."""
    return reference(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )


def assert_same(ours: TokenizedPrompts, expected: dict[str, torch.Tensor]) -> None:
    for key in REFERENCE_KEYS:
        got = getattr(ours, key)
        assert got.dtype == torch.long, key
        assert torch.equal(got, expected[key]), f"{key} differs:\n{got}\n{expected[key]}"


def long_prompt(words: int) -> str:
    vocabulary = "a photo of a cat sitting on 一张 红色 sofa in the golden light, highly detailed".split()
    return " ".join(vocabulary[i % len(vocabulary)] for i in range(words))


@pytest.mark.parametrize("name", PROMPTS)
def test_single_prompt_matches_diffusers(tokenizers, name):
    ours, reference = tokenizers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these is long enough to warn
        got = ours(PROMPTS[name])
    assert got.input_ids.shape == (1, 256)
    assert got.num_truncated == (0,)
    assert_same(got, reference_call(reference, [PROMPTS[name]]))


@pytest.mark.parametrize("max_length", [256, 24])
def test_batch_of_different_lengths_matches_diffusers(tokenizers, max_length):
    ours, reference = tokenizers
    prompts = list(PROMPTS.values()) + [long_prompt(5), long_prompt(40)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # at 24 some prompts are cut: tested below
        got = ours(prompts, max_length=max_length)
    assert got.input_ids.shape == (len(prompts), max_length)
    assert_same(got, reference_call(reference, prompts, max_length))


def test_documented_cat_prompt(tokenizers):
    got = tokenizers[0]("a photo of a cat")
    ids, mask, pos = got.input_ids[0], got.attention_mask[0], got.position_ids[0]
    assert ids[:249].eq(0).all() and mask[:249].eq(0).all() and pos[:249].eq(0).all()
    assert ids[249:].tolist() == [64790, 64792, 260, 4562, 290, 260, 4577]
    assert mask[249:].eq(1).all()
    assert pos[249:].tolist() == list(range(7))
    assert tokenizers[0].encode("a photo of a cat") == [260, 4562, 290, 260, 4577]
    assert tokenizers[0]("").input_ids[0, -3:].tolist() == [0, 64790, 64792]
    assert tokenizers[0].vocab_size == tokenizers[1].vocab_size == 64798


def test_text_never_encodes_to_special_ids(tokenizers):
    ours = tokenizers[0]
    for token, token_id in ours.special_ids.items():
        assert token_id not in ours.encode(f"{token} x{token}y {token}"), token


@pytest.mark.parametrize("words", [300, 1000])
def test_overlong_prompt_keeps_its_start_and_warns(tokenizers, words):
    ours, reference = tokenizers
    prompt = long_prompt(words)
    text_ids = ours.encode(prompt)
    dropped = len(text_ids) - 254
    assert dropped > 0
    # diffusers' untruncated length (prefix included) confirms the count.
    assert len(reference(prompt)["input_ids"]) - 256 == dropped
    with pytest.warns(UserWarning, match=rf"prompt 1: {dropped}\b"):
        got = ours(["a cat", prompt])
    assert got.num_truncated == (0, dropped)
    assert got.input_ids[1].tolist() == [64790, 64792] + text_ids[:254]
    assert got.attention_mask[1].eq(1).all()
    assert got.position_ids[1].tolist() == list(range(256))
    assert_same(got, reference_call(reference, ["a cat", prompt]))


def test_truncation_boundary(tokenizers):
    ours, reference = tokenizers
    fits, over = " ".join(["cat"] * 254), " ".join(["cat"] * 255)
    assert len(ours.encode(fits)) == 254 and len(ours.encode(over)) == 255
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ours(fits)
    assert got.num_truncated == (0,) and got.attention_mask.eq(1).all()
    assert_same(got, reference_call(reference, [fits]))
    with pytest.warns(UserWarning, match=r"prompt 0: 1\b"):
        got = ours(over)
    assert got.num_truncated == (1,)
    assert_same(got, reference_call(reference, [over]))


def test_rejects_bad_arguments(tokenizers):
    ours = tokenizers[0]
    with pytest.raises(TypeError):
        ours(["a cat", None])
    with pytest.raises(ValueError, match="max_length"):
        ours("a cat", max_length=2)


def test_from_pretrained_on_saved_pipeline(tiny_model_dir, tokenizers):
    loaded = ChatGLMTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    prompts = list(PROMPTS.values())
    assert_same(loaded(prompts), reference_call(tokenizers[1], prompts))


def test_from_pretrained_falls_back_to_vocab_txt(tmp_path, tokenizers):
    shutil.copy(require_reference() / "tokenizer" / "tokenizer.model", tmp_path / "vocab.txt")
    loaded = ChatGLMTokenizer.from_pretrained(tmp_path)
    assert torch.equal(loaded(PROMPTS["mixed"]).input_ids, tokenizers[0](PROMPTS["mixed"]).input_ids)


def test_from_pretrained_errors(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model or vocab\.txt.*tokenizer_config\.json"):
        ChatGLMTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ChatGLMTokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "tokenizer.model").write_bytes(b"<html>not a model</html>")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        ChatGLMTokenizer.from_pretrained(tmp_path)


def test_returns_host_tensors_under_a_meta_default_device(tokenizers):
    with torch.device("meta"):
        got = tokenizers[0](["a cat", "a dog"])
    for tensor in (got.input_ids, got.attention_mask, got.position_ids):
        assert tensor.device.type == "cpu"
