"""kolors: a lean PyTorch engine for the Kolors text-to-image model.

The public names are imported on first use, so that `import kolors.samplers` (or any light module) does not
load the whole engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "KolorsError",
    "KolorsPipeline",
    "KolorsPipelineOutput",
    "PromptEmbeds",
    "blur_mask",
    "grow_mask",
    "invert_mask",
    "outpaint_canvas",
    "preprocess",
]
_WHERE = {
    "blur_mask": "kolors.masks",
    "grow_mask": "kolors.masks",
    "invert_mask": "kolors.masks",
    "outpaint_canvas": "kolors.masks",
    "KolorsError": "kolors.errors",
    "KolorsPipeline": "kolors.pipeline",
    "KolorsPipelineOutput": "kolors.pipeline",
    "PromptEmbeds": "kolors.pipeline",
    "preprocess": "kolors.adapters.preprocess",
}

if TYPE_CHECKING:
    from kolors.adapters.preprocess import preprocess
    from kolors.errors import KolorsError
    from kolors.masks import blur_mask, grow_mask, invert_mask, outpaint_canvas
    from kolors.pipeline import KolorsPipeline, KolorsPipelineOutput, PromptEmbeds


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'kolors' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
