"""ChatGLM3 tokenizer on sentencepiece alone, as Kolors uses it.

Matches diffusers' `ChatGLMTokenizer` called the way KolorsPipeline calls it
(`padding="max_length", truncation=True`): each prompt becomes `[gMASK] sop` followed by its
sentencepiece ids, cut on the right to `max_length`, then padded on the LEFT with id 0. Real tokens
get positions 0..n-1 and mask 1; pads get position 0 and mask 0. Unlike diffusers, a cut prompt is
reported (a warning and `num_truncated`) instead of being shortened silently.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch

from kolors.errors import KolorsError

# ChatGLM3 appends these after the sentencepiece vocabulary, in this order; they are not pieces of the
# sentencepiece model, so no text ever encodes to them (typing "[gMASK]" gives ordinary pieces).
SPECIAL_TOKENS = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
PAD_ID = 0  # ChatGLM pads with the sentencepiece unk id, which is 0
MODEL_FILES = ("tokenizer.model", "vocab.txt")  # Kolors-diffusers ships the same file under both names


class TokenizerError(KolorsError):
    """A tokenizer file that is not a sentencepiece model."""


@dataclass(frozen=True)
class TokenizedPrompts:
    """A batch ready for the text encoder: torch.long tensors of shape (batch, max_length)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    num_truncated: tuple[int, ...]  # text tokens dropped from the end of each prompt (0 when none)


class ChatGLMTokenizer:
    def __init__(self, model_file: str | Path):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {model_file}")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{model_file} is not a sentencepiece model ({e}); re-download it") from None
        self.special_ids = {token: self.sp.vocab_size() + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.prefix = [self.special_ids["[gMASK]"], self.special_ids["sop"]]

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ChatGLMTokenizer:
        """Load from a model's `tokenizer/` folder (its `tokenizer.model`, else `vocab.txt`)."""
        directory = Path(directory)
        for name in MODEL_FILES:
            if (directory / name).is_file():
                return cls(directory / name)
        found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else None
        what = "the folder does not exist" if found is None else f"it holds {found or 'nothing'}"
        raise FileNotFoundError(f"no {' or '.join(MODEL_FILES)} in tokenizer folder {directory}: {what}")

    @property
    def vocab_size(self) -> int:
        """Ids the text encoder's embedding must cover: sentencepiece pieces plus the special tokens."""
        return self.sp.vocab_size() + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        """Sentencepiece ids of `text`, without the `[gMASK] sop` prefix."""
        return self.sp.encode(text)

    def __call__(self, prompts: str | list[str], max_length: int = 256) -> TokenizedPrompts:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a string or a list of strings, got {prompts!r}")
        if max_length <= len(self.prefix):
            raise ValueError(f"max_length must exceed the {len(self.prefix)} prefix tokens, got {max_length}")
        room = max_length - len(self.prefix)
        input_ids, attention_mask, position_ids, num_truncated = [], [], [], []
        for text_ids in self.sp.encode(prompts):
            # transformers truncates on the right and counts the prefix in max_length: the prompt's
            # start survives, its end is lost.
            num_truncated.append(max(0, len(text_ids) - room))
            ids = self.prefix + text_ids[:room]
            pads = max_length - len(ids)
            input_ids.append([PAD_ID] * pads + ids)
            attention_mask.append([0] * pads + [1] * len(ids))
            position_ids.append([0] * pads + list(range(len(ids))))
        if any(num_truncated):
            cut = ", ".join(f"prompt {i}: {n}" for i, n in enumerate(num_truncated) if n)
            warnings.warn(
                f"prompts longer than {room} tokens ({max_length} with the 2 prefix tokens) lose their end; "
                f"tokens dropped per prompt: {cut}",
                stacklevel=2,
            )
        return TokenizedPrompts(
            _host_tensor(input_ids, max_length),
            _host_tensor(attention_mask, max_length),
            _host_tensor(position_ids, max_length),
            tuple(num_truncated),
        )


def _host_tensor(rows: list[list[int]], width: int) -> torch.Tensor:
    # On the CPU whatever the default device (models may be built under torch.device("meta"));
    # the (0, width) shape keeps an empty batch two-dimensional.
    return torch.tensor(rows, dtype=torch.long, device="cpu").view(-1, width)
