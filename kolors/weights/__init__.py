"""Weights: finding and downloading models (hub), reading and checking checkpoints (checkpoint), and weights
resident only while they run (stream). Models never import this package: the pipeline loads them through it."""

from kolors.weights.checkpoint import Checkpoint, build_on_meta, load_weights, set_tensor
from kolors.weights.hub import DEFAULT_REPO, check_model_folder, resolve_model, weight_files
from kolors.weights.stream import WeightStream, on_device, stream_weights, streaming_units

__all__ = [
    "DEFAULT_REPO",
    "Checkpoint",
    "WeightStream",
    "build_on_meta",
    "check_model_folder",
    "load_weights",
    "on_device",
    "resolve_model",
    "set_tensor",
    "stream_weights",
    "streaming_units",
    "weight_files",
]
