"""Finding and downloading Kolors models: a local folder in the Kolors-diffusers layout (model_index.json and one
sub-folder per component) or a hub repo id, downloaded through huggingface_hub into its standard cache, only the
files the chosen variant needs; and the weight files of one component, by variant."""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence
from pathlib import Path

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

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [
        "model_index.json",
        "*/config.json",
        "scheduler/*.json",
        "tokenizer/*.model",
        "tokenizer/*.txt",
        "tokenizer/*.json",
    ]
    listing = None if local_files_only or constants.HF_HUB_OFFLINE else _repo_files(name, revision)
    if (
        listing is not None
    ):  # exactly the files weight_files will pick, nothing of the other variants or formats
        patterns += _needed_weight_files(listing, variant)
    else:  # offline: the cache decides; any file of the wanted variants
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


def _repo_files(name: str, revision: str | None) -> list[str] | None:
    """The repo's file list, or None when it cannot be had (snapshot_download then reports why)."""
    from huggingface_hub import HfApi

    try:
        return HfApi(library_name="kolors").list_repo_files(name, revision=revision)
    except Exception:
        return None


def _needed_weight_files(repo_files: list[str], variant: str | None) -> list[str]:
    """allow_patterns for the weight files each component needs, chosen from the repo's listing."""
    names: dict[str, set[str]] = {}
    for path in repo_files:
        component, _, name = path.partition("/")
        names.setdefault(component, set()).add(name)
    return [
        f"{component}/{name}"
        for component in ("text_encoder", "unet", "vae")
        for name in _pick_weights(names.get(component, set()), variant) or []
    ]


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


def find_weight_file(
    path_or_repo: str | os.PathLike,
    *,
    what: str,
    defaults: Sequence[str],
    suffixes: Collection[str],
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
) -> Path:
    """One weight file (a LoRA's, an adapter's) from a file path; a folder (its `weight_name`, else the first of
    `defaults` in it, else its one file with one of `suffixes`); or a hub repo id, the file (`weight_name`, else
    the first default) downloaded into the huggingface_hub cache. `what` names the kind in every error."""
    path = Path(path_or_repo).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise KolorsError(f"{what} folder {folder} not found; check subfolder=")
        if weight_name is not None:
            if not (folder / weight_name).is_file():
                raise KolorsError(f"{what} file {folder / weight_name} not found; check weight_name=")
            return folder / weight_name
        found = [folder / n for n in defaults if (folder / n).is_file()][:1]  # the first default there
        found = found or sorted(p for p in folder.iterdir() if p.suffix in suffixes)
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "no weight file"
            raise KolorsError(f"{what} folder {folder} has {names}; pass weight_name= to pick the file")
        return found[0]
    name = str(path_or_repo)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        kinds = " or ".join(sorted({Path(d).suffix for d in defaults}))
        raise KolorsError(f"{what} file not found: {name}; pass a {kinds} file, a folder or a hub repo id")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        file = weight_name or defaults[0]
        return Path(
            hf_hub_download(name, file, subfolder=subfolder or None, revision=revision, library_name="kolors")
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KolorsError(f"could not get {what} '{name}' from the model hub: {first_line}") from None


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
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    picked = _pick_weights(set(found), variant)
    if picked and picked[0].endswith(".json"):
        return _files_from_index(folder / picked[0])
    if picked:
        return [folder / picked[0]]
    wanted = f"the '{variant}' variant" if variant else "plain or fp16 weights"
    raise KolorsError(
        f"no weight files for {wanted} in {folder} (found: {', '.join(found) or 'nothing'}); "
        "pass variant= to match the files, or download the model again"
    )


def _pick_weights(names: set[str], variant: str | None) -> list[str] | None:
    """The weight files of one component among `names`: [index, shard glob] or [single file], preferring plain
    over fp16 (variant=None), safetensors over pickles, and the stems diffusers, then transformers save."""
    for v in [variant] if variant is not None else [None, "fp16"]:
        suffix = f".{v}" if v else ""
        for stem in WEIGHT_STEMS:
            for ext in ("safetensors", "bin"):
                if f"{stem}.{ext}.index{suffix}.json" in names:
                    return [f"{stem}.{ext}.index{suffix}.json", f"{stem}{suffix}-*-of-*.{ext}"]
                if f"{stem}{suffix}.{ext}" in names:
                    return [f"{stem}{suffix}.{ext}"]
    return None


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
