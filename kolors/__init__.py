"""kolors: a lean PyTorch engine for the Kolors text-to-image model."""

from kolors.errors import KolorsError
from kolors.pipeline import KolorsPipeline, KolorsPipelineOutput, PromptEmbeds

__all__ = ["KolorsError", "KolorsPipeline", "KolorsPipelineOutput", "PromptEmbeds"]
