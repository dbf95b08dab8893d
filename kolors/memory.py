"""Memory policy: the `memory=` modes and the cache of prompt embeddings.

memory="low" runs a generation as encode, then denoise, then decode, with only the stage's model where it
computes: the text encoder streamed a layer at a time (kolors.weights.stream), and on a GPU the UNet and VAE
parked in host memory between their stages. The prompt cache keeps recent embeddings so that many seeds of one
prompt encode it once; it is on in normal mode and off in low-memory mode.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from kolors.errors import KolorsError

MEMORY_MODES = ("normal", "low")
DEFAULT_PROMPT_CACHE = 32  # entries; a prompt and its negative are 4 MB in bf16 at full size


def parse_memory(memory: str) -> str:
    if memory not in MEMORY_MODES:
        raise KolorsError(f"unknown memory mode {memory!r}; use 'normal' or 'low'")
    return memory


def prompt_cache_size(memory: str, prompt_cache: int | None) -> int:
    """The cache size asked for, or the default: on in normal mode, off in low-memory mode."""
    if prompt_cache is None:
        return DEFAULT_PROMPT_CACHE if memory == "normal" else 0
    if not isinstance(prompt_cache, int) or isinstance(prompt_cache, bool) or prompt_cache < 0:
        raise KolorsError(
            f"prompt_cache must be a number of entries >= 0 (0 turns it off), not {prompt_cache!r}"
        )
    return prompt_cache


class PromptCache:
    """Least recently used prompt embeddings, so many seeds of one prompt encode it once. Size 0 is off."""

    def __init__(self, size: int):
        self.size = size
        self.hits = self.misses = 0
        self._entries: OrderedDict[Hashable, object] = OrderedDict()

    def get(self, key: Hashable):
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        return None

    def put(self, key: Hashable, value) -> None:
        if self.size <= 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
