"""ControlNets: finding and loading one for a loaded UNet, checking that it fits, and the per-step window.

The seam is the UNet's: a ControlNet (kolors.models.controlnet) returns residuals that UNet2DConditionModel.forward
adds to its skips and mid output (`down_residuals`, `mid_residual`). Nothing in the UNet changes when one is
loaded; the pipeline calls it before the UNet at each step where its window is open.

A ControlNet is a folder (or hub repo) with diffusers' ControlNetModel layout: config.json and
diffusion_pytorch_model[.fp16].safetensors. Kolors' own (Kwai-Kolors/Kolors-ControlNet-Canny, -Depth, -Pose) carry
an `encoder_hid_proj` for ChatGLM's 4096-wide states; an SDXL ControlNet has none and other widths, and is refused
with the reason rather than run into a shape error.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kolors.config import load_config
from kolors.errors import KolorsError
from kolors.models.controlnet import ControlNetConfig, ControlNetModel
from kolors.models.layers import packer
from kolors.models.unet import UNetConfig
from kolors.request import CONTROL_MODES
from kolors.weights import build_on_meta, load_weights, weight_files

# sd-webui-controlnet's "soft injection" ("My prompt is more important", "ControlNet is more important"): residual
# i of an SD 1.5 ControlNet's 13 (the mid last) is weighted 0.825 ** (12 - i); SDXL's 10 take the first 10 of those,
# so its first skip gets 0.825 ** 12 = 0.10 and its mid output 0.825 ** 3 = 0.56 of the weight (its hook.py).
SOFT_DECAY = 0.825
SOFT_RESIDUALS = 13
# The modes whose ControlNet acts on the conditional half alone (the other half gets no residual): A1111's
# "ControlNet is more important" (its cfg_injection) and diffusers' guess mode.
COND_ONLY_MODES = ("control", "guess")
KOLORS_CONTROLNETS = (
    "Kwai-Kolors/Kolors-ControlNet-Canny",
    "Kwai-Kolors/Kolors-ControlNet-Depth",
    "Kwai-Kolors/Kolors-ControlNet-Pose",
)
# Fields that must equal the UNet's for the residuals to have its skips' shapes and the inputs to be the UNet's.
MATCHING_FIELDS = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "cross_attention_dim",
    "encoder_hid_dim",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)


def find_controlnet(path_or_repo: str | os.PathLike, *, local_files_only: bool | None = None) -> Path:
    """The local folder of a ControlNet: a folder as it is, a hub repo id downloaded into the huggingface_hub
    cache first (only its config and weights); HF_HUB_OFFLINE=1 or `local_files_only` use the cache alone."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise KolorsError(
            f"ControlNet not found: {name}; pass a folder with config.json and its weights, or a hub repo id "
            f"such as {KOLORS_CONTROLNETS[0]}"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                name,
                allow_patterns=["config.json", "diffusion_pytorch_model*"],
                local_files_only=bool(local_files_only),
                library_name="kolors",
            )
        )
    except LocalEntryNotFoundError:
        raise KolorsError(
            f"cannot reach the model hub and ControlNet '{name}' is not in the cache; download it once online, "
            "or pass its local folder"
        ) from None
    except HfHubHTTPError as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KolorsError(
            f"could not download ControlNet '{name}' from the model hub: {first_line}"
        ) from None


def check_fits(config: ControlNetConfig, unet: UNetConfig, source: str) -> None:
    """A ControlNet made for this UNet: its own text projection (Kolors'), and the UNet's widths."""
    if config.encoder_hid_dim is None:
        raise KolorsError(
            f"ControlNet {source} has no encoder_hid_proj: it is for SDXL (CLIP text), not Kolors (ChatGLM); use a "
            f"Kolors ControlNet such as {', '.join(KOLORS_CONTROLNETS)}"
        )
    for field in MATCHING_FIELDS:
        ours, theirs = getattr(config, field), getattr(unet, field)
        if field == "layers_per_block":
            ours, theirs = config.blocks.layers, unet.layers
        if ours != theirs:
            raise KolorsError(
                f"ControlNet {source} is for another base model: its {field} is {ours}, the UNet's {theirs}; "
                f"use a Kolors ControlNet such as {KOLORS_CONTROLNETS[0]}"
            )


def load_controlnet(
    path_or_repo: str | os.PathLike,
    unet: UNetConfig,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    variant: str | None = None,
    pack: bool = False,
    local_files_only: bool | None = None,
) -> ControlNetModel:
    """A ControlNet for `unet`, checked against it before any weight is read, then strictly loaded (the
    `variant` files when it has them, else its plain or fp16 ones)."""
    folder = find_controlnet(path_or_repo, local_files_only=local_files_only)
    config = load_config(ControlNetConfig, folder / "config.json")
    check_fits(config, unet, str(path_or_repo))
    model = build_on_meta(lambda: ControlNetModel(config))
    try:
        files = weight_files(folder, variant)
    except KolorsError:  # the base model's variant (fp16) that a ControlNet repo may not have: its own files
        files = weight_files(folder, None)
    load_weights(
        model,
        files,
        dtype=dtype,
        device=device,
        loaded=packer(model) if pack else None,
    )
    return model.eval().requires_grad_(False)


def controlnet_name(path_or_repo: str | os.PathLike) -> str:
    """The name a loaded ControlNet goes by: its folder's or repo's last part."""
    return str(path_or_repo).rstrip("/\\").replace("\\", "/").split("/")[-1] or str(path_or_repo)


def per_unit(value, n: int, name: str) -> list:
    """One value per ControlNet from a single value or a list of n (diffusers broadcasts a single one)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise KolorsError(f"{name} has {len(value)} values for {n} ControlNets; give one each or one")
        return list(value)
    return [value] * n


def keep_window(start: float, end: float, steps: int) -> list[float]:
    """1.0 at the steps where a ControlNet acts, else 0.0: diffusers' `controlnet_keep`, by step index i of
    `steps` (it acts unless i / steps < start or (i + 1) / steps > end)."""
    return [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]


def residual_scales(mode: str, scale: float, residuals: int) -> float | list[float]:
    """The weight of each of a ControlNet's `residuals` (the skips', then the mid output's) in control mode `mode`
    (CONTROL_MODES): `scale` for all in "balanced", sd-webui-controlnet's decaying soft weights otherwise."""
    if mode not in CONTROL_MODES:
        raise KolorsError(f"unknown control mode {mode!r}; choose one of: {', '.join(CONTROL_MODES)}")
    if mode == "balanced":
        return scale
    return [scale * SOFT_DECAY ** float(SOFT_RESIDUALS - 1 - i) for i in range(residuals)]
