"""Trainable LoRA: PEFT's LoRA (`LoraConfig(init_lora_weights="gaussian")`) on a model's layers, through the same
seam that loaded LoRAs use (kolors.models.layers: a layer's `lora` attribute gives the term added to its output).

The pairs are float32 parameters whatever the model's dtype (the frozen weights may be bf16 or fp16): the term
computes in float32 and is cast to the layer's dtype where it joins the output. The file written is the one
kolors.adapters.lora and diffusers' `load_lora_weights` read: `<component>.<module>.lora_A.weight` /
`lora_B.weight` with diffusers' adapter metadata (rank, alpha, targets), or kohya's `lora_unet_…` keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kolors.adapters.lora import METADATA_KEY
from kolors.errors import KolorsError

# The official Kolors DreamBooth-LoRA script's targets: every attention projection of the UNet.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for a list of target_modules: the module's name is a target or ends with '.' + a target."""
    return any(name == t or name.endswith("." + t) for t in targets)


class TrainTerm:
    """scale * up(down(x)) in float32, cast to x's dtype: PEFT's `lora_B(lora_A(x)) * scaling`."""

    def __init__(self, down: Tensor, up: Tensor, scale: float, conv: dict | None):
        self.down, self.up, self.scale, self.conv = down, up, scale, conv

    def __call__(self, x: Tensor) -> Tensor:
        h = x.to(self.down.dtype)
        if self.conv is None:
            y = F.linear(F.linear(h, self.down), self.up)
        else:
            y = F.conv2d(F.conv2d(h, self.down, None, **self.conv), self.up)
        return (y * self.scale).to(x.dtype)


class TrainableLora(nn.Module):
    """Trainable down (r, in[, kh, kw]) and up (out, r[, 1, 1]) pairs on the layers of `model` that `targets`
    name (PEFT's suffix rule), scale alpha / r. `attach()` sets the layers' terms, `detach()` takes them off:
    the model's own weights are never touched."""

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[str] = UNET_TARGETS,
        *,
        rank: int,
        alpha: float,
        component: str = "unet",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise KolorsError(f"LoRA rank must be a whole number >= 1, not {rank!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
            raise KolorsError(f"LoRA alpha must be a number > 0, not {alpha!r}")
        self.component, self.rank, self.alpha, self.targets = component, rank, float(alpha), tuple(targets)
        self.names = [
            name
            for name, m in model.named_modules()
            if matches(name, self.targets) and isinstance(m, (nn.Linear, nn.Conv2d)) and hasattr(m, "lora")
        ]
        if not self.names:
            raise KolorsError(
                f"no layer of the {component} matches the LoRA targets {', '.join(self.targets)}; "
                "give module names such as to_q, to_k, to_v, to_out.0, conv1, ff.net.2"
            )
        self._layers = [model.get_submodule(n) for n in self.names]  # a plain list: not submodules
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for layer in self._layers:
            device = layer.weight.device
            if isinstance(layer, nn.Conv2d):
                down = (rank, layer.in_channels, *layer.kernel_size)
                up = (layer.out_channels, rank, 1, 1)
            else:
                down, up = (rank, layer.in_features), (layer.out_features, rank)
            self.down.append(nn.Parameter(torch.empty(down, device=device)))
            self.up.append(nn.Parameter(torch.zeros(up, device=device)))
        self.reset_parameters(generator)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's "gaussian" init: down ~ N(0, 1/r), up = 0, so training starts from the base model."""
        with torch.no_grad():
            for down, up in zip(self.down, self.up, strict=True):
                noise = torch.randn(down.shape, generator=generator, device=generator and generator.device)
                down.copy_(noise / self.rank)
                up.zero_()

    def attach(self) -> None:
        for layer, down, up in zip(self._layers, self.down, self.up, strict=True):
            conv = None
            if isinstance(layer, nn.Conv2d):
                conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
            layer.lora = TrainTerm(down, up, self.scale, conv)

    def detach(self) -> None:
        for layer in self._layers:
            layer.lora = None

    # ------------------------------------------------------------------------------------------------ files

    def peft_state(self) -> dict[str, Tensor]:
        """`<component>.<module>.lora_A.weight` / `lora_B.weight`, float32: diffusers' LoRA keys."""
        state = {}
        for name, down, up in zip(self.names, self.down, self.up, strict=True):
            state[f"{self.component}.{name}.lora_A.weight"] = down.detach().float().cpu().contiguous()
            state[f"{self.component}.{name}.lora_B.weight"] = up.detach().float().cpu().contiguous()
        return state

    def adapter_config(self) -> dict:
        """This component's LoraConfig as diffusers' save_lora_weights packs it into the file's header
        (`unet.r`, `unet.lora_alpha`, …): diffusers' loader passes it to LoraConfig(**…), kolors' reads the alpha."""
        config = {"r": self.rank, "lora_alpha": self.alpha, "target_modules": sorted(set(self.targets))}
        return {f"{self.component}.{k}": v for k, v in config.items()}

    def kohya_state(self) -> dict[str, Tensor]:
        """kohya's keys for the same pairs: `lora_unet_<module, _ for .>.lora_down/lora_up.weight` and `.alpha`."""
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[self.component]
        state = {}
        for name, down, up in zip(self.names, self.down, self.up, strict=True):
            stem = prefix + name.replace(".", "_")
            state[f"{stem}.lora_down.weight"] = down.detach().float().cpu().contiguous()
            state[f"{stem}.lora_up.weight"] = up.detach().float().cpu().contiguous()
            state[f"{stem}.alpha"] = torch.tensor(self.alpha)
        return state

    def load_peft_state(self, state: dict[str, Tensor]) -> None:
        """The pairs from `peft_state()`'s keys (a checkpoint of this same LoRA); every key must be there."""
        want = self.peft_state()
        if set(state) != set(want):
            odd = sorted(set(state) ^ set(want))[:1]
            raise KolorsError(f"the saved LoRA does not fit these targets and this model ('{odd[0]}')")
        with torch.no_grad():
            for name, down, up in zip(self.names, self.down, self.up, strict=True):
                down.copy_(state[f"{self.component}.{name}.lora_A.weight"])
                up.copy_(state[f"{self.component}.{name}.lora_B.weight"])


def lora_file(loras: Sequence[TrainableLora]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the safetensors header of one diffusers LoRA file holding every component's pairs."""
    state, config = {}, {}
    for lora in loras:
        state |= lora.peft_state()
        config |= lora.adapter_config()
    return state, {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def peft_module_name(key: str) -> str:
    """The module of a PEFT parameter name (`….to_q.lora_A.default.weight` -> `….to_q`), for tests and tools."""
    return re.sub(r"\.lora_[AB](\.[^.]+)?\.weight$", "", key)
