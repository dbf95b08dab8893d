"""Finding, downloading and reading Kolors checkpoints.

A model is a folder in the Kolors-diffusers layout (model_index.json and one sub-folder per component) or a hub
repo id, downloaded through huggingface_hub into its standard cache, only the files the chosen variant needs.
Weights are read tensor by tensor into a model built on the meta device: each tensor is converted to the target
dtype and device as it is read, so the full model never exists twice in memory. Loading is strict: a missing,
unexpected or mis-shaped tensor is an error that names the file, the key and the shapes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from kolors.errors import KolorsError

DEFAULT_REPO = "Kwai-Kolors/Kolors-diffusers"
COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "unet", "vae")
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
TOKENIZER_FILES = ("tokenizer.model", "vocab.txt")


# ---------------------------------------------------------------------------------------------------- finding


def resolve_model(
    model: str | os.PathLike = DEFAULT_REPO,
    *,
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """A local folder as it is, else the hub repo's snapshot in the huggingface_hub cache (downloaded if needed).

    HF_HUB_OFFLINE=1 (or local_files_only) uses the cache only. `variant=None` takes the plain weights if the
    repo has them, else the fp16 variant: the real Kolors-diffusers repo ships only fp16 files."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise KolorsError(f"model folder not found: {name}; pass a Kolors-diffusers folder or a hub repo id")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [
        "model_index.json",
        "*/config.json",
        "scheduler/*.json",
        "tokenizer/*.model",
        "tokenizer/*.txt",
        "tokenizer/*.json",
    ]
    variants = [variant] if variant is not None else [None, "fp16"]
    patterns += [pattern for v in variants for pattern in _weight_patterns(v)]
    try:
        snapshot = Path(
            snapshot_download(
                name,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=patterns,
                local_files_only=bool(local_files_only),
                library_name="kolors",
            )
        )
    except LocalEntryNotFoundError:
        raise KolorsError(
            f"cannot reach the model hub and '{name}' is not in the cache; download it once online, or pass a "
            "local Kolors-diffusers folder as the model path"
        ) from None
    except HfHubHTTPError as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KolorsError(f"could not download '{name}' from the model hub: {first_line}") from None
    return snapshot


def _weight_patterns(variant: str | None) -> list[str]:
    """Glob patterns of the weight files of one variant, in the names diffusers and transformers save."""
    v = f".{variant}" if variant else ""
    return [
        f"*/*{v}.safetensors",
        f"*/*{v}-*-of-*.safetensors",
        f"*/*.safetensors.index{v}.json",
        f"*/*{v}.bin",
        f"*/*{v}-*-of-*.bin",
        f"*/*.bin.index{v}.json",
    ]


def check_model_folder(root: Path) -> None:
    """Every component folder with its config (and the tokenizer's model file) present, or one error listing
    what is missing and what was found."""
    needed = {
        "scheduler": ["scheduler_config.json"],
        "text_encoder": ["config.json"],
        "tokenizer": [],
        "unet": ["config.json"],
        "vae": ["config.json"],
    }
    missing = []
    for component, files in needed.items():
        folder = root / component
        if not folder.is_dir():
            missing.append(f"{component}/")
            continue
        missing += [f"{component}/{f}" for f in files if not (folder / f).is_file()]
        if component == "tokenizer" and not any((folder / f).is_file() for f in TOKENIZER_FILES):
            missing.append("tokenizer/tokenizer.model")
    if missing:
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir()) if root.is_dir() else []
        raise KolorsError(
            f"model folder {root} is incomplete: missing {', '.join(missing)}; found {', '.join(found) or 'nothing'}"
            " (expected the Kolors-diffusers layout)"
        )


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The weight files of one component: single or sharded safetensors (via the index json), else pickled
    .bin files. `variant=None` prefers plain files and falls back to the fp16 variant."""
    variants = [variant] if variant is not None else [None, "fp16"]
    for v in variants:
        suffix = f".{v}" if v else ""
        for stem in WEIGHT_STEMS:
            for ext in ("safetensors", "bin"):
                index = folder / f"{stem}.{ext}.index{suffix}.json"
                if index.is_file():
                    return _files_from_index(index)
                single = folder / f"{stem}{suffix}.{ext}"
                if single.is_file():
                    return [single]
    wanted = f"the '{variant}' variant" if variant else "plain or fp16 weights"
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise KolorsError(
        f"no weight files for {wanted} in {folder} (found: {', '.join(found) or 'nothing'}); "
        "pass variant= to match the files, or download the model again"
    )


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        raise KolorsError(f"weight index {index} is corrupt; download the model again") from None
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise KolorsError(f"weight shards listed in {index.name} are missing: {', '.join(missing)}")
    return files


# ---------------------------------------------------------------------------------------------------- reading


def read_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of one weight file, one tensor at a time. Pickled files are read only with
    weights_only=True (no code runs) and memory-mapped."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
    except KolorsError:
        raise
    except Exception as e:  # safetensors and torch.load raise many types for a truncated or corrupt file
        raise KolorsError(
            f"weight file {file} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "delete it and download the model again"
        ) from None


def load_weights(
    model: nn.Module,
    files: list[Path],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    keep_dtype: Callable[[str], bool] = lambda key: False,
) -> nn.Module:
    """Strictly load `files` into `model` (built on the meta device), converting each tensor to `dtype` and
    `device` as it is read. `transform` is the component's one visible key transform (a prefix, an unused
    tensor); `keep_dtype(key)` keeps a tensor in float32 when the model computes it in full precision."""
    expected = model.state_dict(keep_vars=True)
    state: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}
    for file in files:
        for raw_key, raw in read_tensors(file):
            # One tensor at a time: the original is freed as soon as its converted copy exists.
            for key, tensor in (transform({raw_key: raw}) if transform else {raw_key: raw}).items():
                source[key] = file
                state[key] = _convert(key, tensor, expected, file, dtype, device, keep_dtype)

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    where = files[0].parent
    if missing:
        raise KolorsError(
            f"weights in {where} lack {len(missing)} tensor(s) the config needs, e.g. '{missing[0]}'; "
            "the config and the weights are from different models"
        )
    if unexpected:
        key = unexpected[0]
        raise KolorsError(
            f"weight file {source.get(key, where)} has {len(unexpected)} tensor(s) the config does not know, e.g. "
            f"'{key}'; the config and the weights are from different models"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _convert(key, tensor, expected, file, dtype, device, keep_dtype) -> torch.Tensor:
    """Check the shape against the meta model and move the tensor to its dtype and device."""
    if key not in expected:
        return tensor
    if tensor.shape != expected[key].shape:
        raise KolorsError(
            f"weight '{key}' in {file} has shape {tuple(tensor.shape)} but the config makes "
            f"{tuple(expected[key].shape)}; the config and the weights are from different models"
        )
    if not tensor.is_floating_point():
        return tensor.to(device=device)
    return tensor.to(device=device, dtype=torch.float32 if keep_dtype(key) else dtype)


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module without allocating or initialising its weights: they come from the checkpoint."""
    with torch.device("meta"):
        return factory()
