"""LoRA: low-rank adapters for the UNet and the text encoder, loaded, mixed, switched, fused and taken back.

A LoRA file gives, for some linear or convolution layers, a pair down (r, in[, kh, kw]) and up (out, r[, 1, 1]) and a
scale alpha / r; the layer then computes W x + b + s (up @ down) x. Files come in a few key formats, each turned into
one form by one small function (`peft_layers`, `diffusers_layers`, `kohya_layers`): `{"unet.<module path>": pair}`,
with the module paths of kolors' models (diffusers' names).

The one seam (kolors.models.layers): each targeted layer's `lora` attribute is set to a `LowRankTerm` holding the
active adapters' pairs concatenated (up scaled per adapter), so any number of LoRAs cost one pair of small matmuls per
layer, and switching sets rebuilds these few tensors only: the base weights are never touched. `fuse` adds the term
into the weights instead (no per-step cost) and keeps the original tensors, so `unfuse` and `unload` restore them
bit for bit. Everything is checked before anything changes: a file that does not fit leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kolors.errors import KolorsError
from kolors.models.layers import packable
from kolors.models.sgm import sgm_blocks, sgm_to_diffusers
from kolors.models.unet import UNetConfig
from kolors.weights.checkpoint import one_thread
from kolors.weights.hub import find_weight_file

COMPONENTS = ("unet", "text_encoder")
LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
STACKS_PER_LAYER = 4  # stacked pairs of adapter combinations kept per layer for switching back
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig per component in the safetensors header


@dataclass(frozen=True)
class LoraPair:
    """One layer's low-rank pair: the layer gains scale * up @ down."""

    down: Tensor  # (r, in) or (r, in, kh, kw)
    up: Tensor  # (out, r) or (out, r, 1, 1)
    scale: float  # alpha / r, 1.0 without an alpha


@dataclass(frozen=True)
class Adapter:
    name: str
    file: Path
    layers: dict[str, LoraPair]  # "unet.<module path>" or "text_encoder.<module path>" -> pair


# ---------------------------------------------------------------------------------------------- finding, reading


def find_lora_file(path_or_repo: str | os.PathLike, weight_name: str | None = None) -> Path:
    """A LoRA file from a file path, a folder (its `weight_name`, diffusers' pytorch_lora_weights.* or its one
    weight file) or a hub repo id (downloaded through huggingface_hub into its cache)."""
    return find_weight_file(
        path_or_repo, what="LoRA", defaults=LORA_FILE_NAMES, suffixes=LORA_SUFFIXES, weight_name=weight_name
    )


def read_lora_file(file: Path) -> tuple[dict[str, Tensor], dict | None]:
    """The tensors of a LoRA file and diffusers' adapter metadata (None when absent). Pickles are read with
    weights_only=True: a LoRA file runs no code."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
            raw = header.get(METADATA_KEY)
            return tensors, json.loads(raw) if raw else None
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # a short file, a bad header, a pickle with code in it: one message
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KolorsError(f"LoRA file {file} is truncated or corrupt ({detail[:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise KolorsError(f"LoRA file {file} holds no tensors by name")
    return state, None


def lora_short_hash(file: str | os.PathLike) -> str:
    """The short hash A1111 writes in `Lora hashes` (extensions-builtin/Lora/network.py): the first 12 hex digits
    of the file's sha256, except that for a safetensors file it is its `sshs_model_hash` metadata if it has one,
    else the sha256 of the bytes after the header (the "addnet" hash, unchanged by editing the metadata). Each
    file is read once while it stays the same (size and mtime), not at every image."""
    stat = os.stat(file)
    return _short_hash(str(Path(file).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _short_hash(file: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        if str(file).endswith(".safetensors"):
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length) or b"{}")
            stored = (header.get("__metadata__") or {}).get("sshs_model_hash")
            if stored:
                return str(stored)[:12]
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- key formats


def _alpha(tensor: Tensor | None) -> float | None:
    return None if tensor is None else float(tensor.float().item())


def _pair(down: Tensor, up: Tensor, alpha: float | None) -> LoraPair:
    rank = down.shape[0]
    return LoraPair(down, up, 1.0 if alpha is None else alpha / rank)


def peft_layers(state: dict[str, Tensor], metadata: dict | None) -> tuple[dict[str, LoraPair], list[str]]:
    """PEFT keys as diffusers' save_lora_weights writes them: `<component>.<module>.lora_A.weight` and `lora_B`;
    the alpha from diffusers' metadata (`<component>.lora_alpha`, `alpha_pattern`), else alpha = rank."""
    layers, unused = {}, []
    for key in state:
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                unused.append(key)
            continue
        stem = key.removesuffix(".lora_A.weight")
        up = state.get(f"{stem}.lora_B.weight")
        if up is None:
            raise KolorsError(f"'{key}' has no lora_B partner")
        target = stem if stem.startswith(COMPONENTS) else f"unet.{stem}"  # unprefixed: a UNet's PEFT state
        layers[target] = _pair(state[key], up, _peft_alpha(target, state[key].shape[0], metadata))
    return layers, unused


def _peft_alpha(target: str, rank: int, metadata: dict | None) -> float | None:
    """The alpha giving PEFT's scale for this layer: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    component, _, module = target.partition(".")
    if not metadata or f"{component}.lora_alpha" not in metadata:
        return None
    config = {
        k.removeprefix(component + "."): v for k, v in metadata.items() if k.startswith(component + ".")
    }
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():  # PEFT's rule: a key suffix
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = float(value)
            break
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


# diffusers' attention-processor LoRA names (before PEFT) -> the layer's module name.
_PROCESSOR_NAMES = {
    ".processor.to_q_lora": ".to_q",
    ".processor.to_k_lora": ".to_k",
    ".processor.to_v_lora": ".to_v",
    ".processor.to_out_lora": ".to_out.0",
}


def diffusers_layers(state: dict[str, Tensor]) -> tuple[dict[str, LoraPair], list[str]]:
    """diffusers' older keys: `<component>.<module>.lora.down.weight` and `.lora.up.weight` (or the
    attention-processor spelling `…attn1.processor.to_q_lora.down.weight`), with an optional `<module>.alpha`."""
    layers, unused = {}, []
    for key in state:
        if not key.endswith(".down.weight"):
            if not key.endswith((".up.weight", ".alpha")):
                unused.append(key)
            continue
        stem = key.removesuffix(".down.weight")
        target = stem.removesuffix(".lora")
        for old, new in _PROCESSOR_NAMES.items():
            if target.endswith(old):
                target = target.removesuffix(old) + new
        up = state.get(f"{stem}.up.weight")
        if up is None:
            raise KolorsError(f"'{key}' has no up partner")
        alpha = _alpha(state.get(f"{target}.alpha", state.get(f"{stem}.alpha")))
        target = (
            target if target.startswith(COMPONENTS) else f"unet.{target}"
        )  # unprefixed: a UNet state dict
        layers[target] = _pair(state[key], up, alpha)
    return layers, unused


KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}


def kohya_layers(
    state: dict[str, Tensor], module_names: dict[str, set[str]], unet_config: UNetConfig
) -> tuple[dict[str, LoraPair], list[str]]:
    """kohya's keys: `lora_unet_<module path with _ for .>.lora_down.weight`, `.lora_up.weight`, `.alpha`, in
    diffusers' module names or the original SGM ones (`lora_unet_input_blocks_4_1_…`, mapped by sgm_to_diffusers).
    An underscore name is matched to this model's own module names, so no name is guessed."""
    by_flat = {
        component: {name.replace(".", "_"): name for name in names}
        for component, names in module_names.items()
    }
    blocks = sgm_blocks(unet_config)
    layers, unused = {}, []
    for key in state:
        if not key.endswith(".lora_down.weight"):
            if not key.endswith((".lora_up.weight", ".alpha")):
                unused.append(key)
            continue
        lora_name = key.removesuffix(".lora_down.weight")
        prefix = next((p for p in KOHYA_PREFIXES if lora_name.startswith(p)), None)
        if prefix is None:
            unused.append(key)
            continue
        component, flat = KOHYA_PREFIXES[prefix], lora_name.removeprefix(prefix)
        if component == "unet":
            flat = sgm_to_diffusers(flat, blocks, sep="_")
        module = by_flat[component].get(flat)
        if module is None:
            unused.append(key)
            continue
        up = state.get(f"{lora_name}.lora_up.weight")
        if up is None:
            raise KolorsError(f"'{key}' has no lora_up partner")
        layers[f"{component}.{module}"] = _pair(state[key], up, _alpha(state.get(f"{lora_name}.alpha")))
    return layers, unused


# ---------------------------------------------------------------------------------------------- the term


class LowRankTerm:
    """up ((down x) * scales): scale_1 up_1 down_1 x + scale_2 up_2 down_2 x + … as one pair of matmuls (or
    convolutions) over the stacked pairs, each rank row scaled by its adapter's scale. The stacks are shared
    between terms of the same adapters, so a change of scales only makes a new (R,) vector. A plain object, not
    a module: it never enters a state_dict."""

    def __init__(self, layer: nn.Module, down: Tensor, up: Tensor, scales: Tensor):
        self.down, self.up, self.scales = down, up, scales
        self.conv = (
            None
            if down.dim() == 2
            else dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        )

    def __call__(self, x: Tensor) -> Tensor:
        # A model parked in host memory (memory="low" on a GPU) visits the device: the small pair follows it.
        down, up, scales = (t.to(x.device) for t in (self.down, self.up, self.scales))
        if self.conv is None:
            return F.linear(F.linear(x, down) * scales, up)
        return F.conv2d(F.conv2d(x, down, None, **self.conv) * scales[:, None, None], up)

    def delta(self) -> Tensor:
        """The same change as a weight delta (float32), for fusing."""
        delta = (self.up.flatten(1).float() * self.scales.float()) @ self.down.flatten(1).float()
        return delta.view(self.up.shape[0], *self.down.shape[1:])


def _check_fits(file: Path, key: str, pair: LoraPair, layer: nn.Module) -> None:
    """down (r, in[, kh, kw]) and up (out, r[, 1, 1]) against the layer's shape, or one error naming the key."""
    if isinstance(layer, nn.Conv2d):
        want_down = (pair.down.shape[0], layer.in_channels, *layer.kernel_size)
        want_up = (layer.out_channels, pair.down.shape[0], 1, 1)
    elif isinstance(layer, nn.Linear):
        want_down = (pair.down.shape[0], layer.in_features)
        want_up = (layer.out_features, pair.down.shape[0])
    else:
        raise KolorsError(f"LoRA file {file}: '{key}' targets a {type(layer).__name__}, which takes no LoRA")
    for what, shape, want in (("down", pair.down.shape, want_down), ("up", pair.up.shape, want_up)):
        if tuple(shape) != want:
            raise KolorsError(
                f"LoRA file {file}: '{key}' {what} has shape {tuple(shape)} but this model's layer needs {want};"
                " the LoRA is for another model"
            )
    if not (math.isfinite(pair.scale) and _finite(pair.down) and _finite(pair.up)):
        raise KolorsError(f"LoRA file {file}: '{key}' has non-finite values")


def _finite(t: Tensor) -> bool:
    # A float32 sum is inf or NaN when an element is (or, for absurd values, when finite ones overflow it: then
    # the elementwise check decides). On a CPU it costs a tenth of isfinite().all() on fp16 (BENCHMARKS.md).
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


# ---------------------------------------------------------------------------------------------- the set


def _on_one_thread(method):
    """Run `method` on one torch thread. A LoRA is hundreds of small tensors, and waking torch's other threads for
    each small op costs more than the op (a 190 MB file took 5-7 s of CPU with two threads on a busy machine, 0.4
    s with one: BENCHMARKS.md), as the checkpoint loader found."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        with one_thread():
            return method(*args, **kwargs)

    return run


class LoraSet:
    """The LoRAs loaded into one pipeline's models, which of them are active at what scale, and the state of the
    seam (unfused terms, or fused weights with their originals kept)."""

    def __init__(
        self,
        models: dict[str, nn.Module],
        *,
        unet_config: UNetConfig,
        dtype: torch.dtype,
        device: torch.device,
        text_encoder_note: str | None = None,
        plain_weight: Callable[[str, str], Tensor] | None = None,
        on_text_encoder_change: Callable[[], None] = lambda: None,
    ):
        self.models = models
        self.unet_config, self.dtype, self.device = unet_config, dtype, device
        # Why the text encoder takes no LoRA (quantized), or None when it does.
        self.text_encoder_note = text_encoder_note
        self.plain_weight = plain_weight  # (component, key) -> the unpacked weight, read again from its file
        self.on_text_encoder_change = on_text_encoder_change
        self.adapters: dict[str, Adapter] = {}
        self.active: list[tuple[str, float]] = []
        self.enabled = True
        self.call_scale = 1.0
        self.fused: dict[nn.Module, tuple[dict, dict]] | None = None  # module -> its original tensors
        self._terms: dict[str, nn.Module] = {}  # "component.module" of every layer some adapter targets
        self._stacks: dict[tuple[str, tuple[str, ...]], tuple[Tensor, Tensor]] = {}  # (layer, names) -> pairs

    # --------------------------------------------------------------------- loading

    def load(
        self, path_or_repo: str | os.PathLike, weight_name: str | None = None, adapter_name: str | None = None
    ) -> str:
        """Load a LoRA and make it the active one at scale 1, as diffusers does; returns its name."""
        name = self._add(path_or_repo, weight_name, adapter_name)
        self.set_active([name], [1.0])
        return name

    def _add(self, path_or_repo, weight_name: str | None, adapter_name: str | None) -> str:
        if self.fused is not None:
            raise KolorsError("the LoRAs are fused; call unfuse_lora() before loading another")
        file = find_lora_file(path_or_repo, weight_name)
        name = adapter_name if adapter_name is not None else f"default_{len(self.adapters)}"
        if not isinstance(name, str) or not name:
            raise KolorsError(f"adapter_name must be a non-empty string, not {name!r}")
        if name in self.adapters:
            raise KolorsError(f"an adapter named '{name}' is already loaded; pick another adapter_name")
        adapter = self.parse(file, name)
        self.adapters[name] = (
            adapter  # nothing changed before this line: a bad file leaves the model as it was
        )
        for target in adapter.layers:
            self._terms.setdefault(target, self._layer(target))
        return name

    @_on_one_thread
    def parse(self, file: Path, name: str) -> Adapter:
        """Read and check a LoRA file against the models: every key used, every shape fitting."""
        state, metadata = read_lora_file(file)
        if not state:
            raise KolorsError(f"LoRA file {file} has no tensors")
        module_names = {c: {n for n, _ in m.named_modules()} for c, m in self.models.items()}
        if any(k.startswith("lora_") for k in state):  # kohya's lora_unet_, lora_te_ (and SDXL's lora_te1_)
            layers, unused = kohya_layers(state, module_names, self.unet_config)
        else:  # diffusers' converter leaves some layers in PEFT keys: each key goes to the parser it fits
            layers, rest = peft_layers(state, metadata)
            more, unused = diffusers_layers({k: state[k] for k in rest})
            layers |= more
        layers = {_legacy(k): v for k, v in layers.items()}
        strays = [k for k in layers if k.partition(".")[0] not in COMPONENTS]
        strays += [k for k in layers if k.partition(".")[0] in COMPONENTS and k.partition(".")[2] not in
                   module_names[k.partition(".")[0]]]  # fmt: skip
        first = (unused + strays)[:1]
        if first or not layers:
            what = f"'{first[0]}'" if first else "any key"
            raise KolorsError(
                f"LoRA file {file}: {what} matches no layer of this Kolors model (a LoRA for another model, "
                "e.g. SDXL's text_encoder_2, or an unknown format)"
            )
        for key, pair in layers.items():
            component, _, module = key.partition(".")
            if component == "text_encoder" and self.text_encoder_note:
                raise KolorsError(
                    f"LoRA file {file}: '{key}' is a text-encoder LoRA; {self.text_encoder_note}"
                )
            _check_fits(file, key, pair, self.models[component].get_submodule(module))
        converted = {}
        for key, pair in layers.items():  # once, to where and how the layer computes
            dtype, device = _dtype_device(self._layer(key), self.dtype, self.device)
            converted[key] = LoraPair(pair.down.to(device, dtype), pair.up.to(device, dtype), pair.scale)
        return Adapter(name, file, converted)

    def _layer(self, target: str) -> nn.Module:
        component, _, module = target.partition(".")
        return self.models[component].get_submodule(module)

    # --------------------------------------------------------------------- which are active

    def set_active(self, names: str | Sequence[str], weights: float | Sequence[float] | None = None) -> None:
        names = [names] if isinstance(names, str) else list(names)
        if weights is None:
            weights = [1.0] * len(names)
        elif isinstance(weights, (int, float)):
            weights = [weights] * len(names)
        weights = list(weights)
        if len(weights) != len(names):
            raise KolorsError(
                f"{len(weights)} adapter weights given for {len(names)} adapters; give one each"
            )
        for n, w in zip(names, weights, strict=True):
            if n not in self.adapters:
                loaded = ", ".join(self.adapters) or "none"
                raise KolorsError(f"unknown adapter '{n}'; loaded: {loaded}")
            check_scale(w, f"adapter '{n}' weight")
        if len(set(names)) != len(names):
            raise KolorsError(f"adapter names repeat in {names}; give each once")
        if self.fused is not None:
            raise KolorsError("the LoRAs are fused; call unfuse_lora() before changing the active adapters")
        self.active = list(zip(names, [float(w) for w in weights], strict=True))
        self._apply()

    def use(self, loras: Sequence[tuple[str | os.PathLike, float]]) -> list[str]:
        """Make exactly these LoRAs active, each `(adapter name or file, scale)`: files not loaded yet are
        loaded (once; named by their path), the others are only switched, so the base weights are not touched."""
        names = [str(name_or_path) for name_or_path, _ in loras]
        for name, (_, scale) in zip(names, loras, strict=True):
            check_scale(scale, f"LoRA '{name}' scale")
        added = []
        try:
            for name in names:
                if name not in self.adapters:
                    self._add(name, None, name)  # loaded, not yet active: the set below decides
                    added.append(name)
            self.set_active(names, [scale for _, scale in loras])
        except BaseException:  # a bad file after good ones: the good ones this call loaded go too
            self._drop(added)
            raise
        return names

    def _drop(self, names: Sequence[str]) -> None:
        """Forget adapters that are not active (loaded by a call that then failed)."""
        for name in names:
            self.adapters.pop(name, None)
        targeted = {t for a in self.adapters.values() for t in a.layers}
        self._terms = {t: layer for t, layer in self._terms.items() if t in targeted}
        self._stacks = {k: v for k, v in self._stacks.items() if not set(k[1]) & set(names)}

    def set_enabled(self, enabled: bool) -> None:
        if self.fused is not None:
            raise KolorsError("the LoRAs are fused; call unfuse_lora() first")
        self.enabled = enabled
        self._apply()

    @contextlib.contextmanager
    def scaled(self, scale: float | None) -> Iterator[None]:
        """diffusers' per-call `cross_attention_kwargs={"scale": s}`: the UNet's LoRA scales times s for one call
        (not the text encoder's, as in diffusers; no effect on fused weights)."""
        if scale is None or scale == 1.0 or self.fused is not None or not self.active:
            yield
            return
        check_scale(scale, "cross_attention_kwargs scale")
        self.call_scale = float(scale)
        self._apply(components=("unet",))
        try:
            yield
        finally:
            self.call_scale = 1.0
            self._apply(components=("unet",))

    def _term(self, target: str, layer: nn.Module) -> LowRankTerm | None:
        """The layer's term for the active adapters, or None (the base layer)."""
        scale = self.call_scale if target.startswith("unet.") else 1.0
        active = [
            (n, self.adapters[n].layers[target], w * scale)
            for n, w in self.active
            if self.enabled and w != 0 and target in self.adapters[n].layers
        ]
        if not active:
            return None
        names = tuple(n for n, _, _ in active)
        stack = self._stacks.get((target, names))
        if stack is None:  # a new combination: stacked once, kept for the next switch back to it
            if len(self._stacks) > STACKS_PER_LAYER * len(self._terms):
                self._stacks.clear()
            pairs = [p for _, p, _ in active]
            down = pairs[0].down if len(pairs) == 1 else torch.cat([p.down for p in pairs])
            up = pairs[0].up if len(pairs) == 1 else torch.cat([p.up for p in pairs], dim=1)
            stack = self._stacks[target, names] = (down, up)
        down, up = stack
        scales = [p.scale * w for _, p, w in active for _ in range(p.down.shape[0])]
        return LowRankTerm(layer, down, up, torch.tensor(scales, dtype=down.dtype, device=down.device))

    @_on_one_thread  # a new combination stacks its pairs: hundreds of small copies
    def _apply(self, components: Sequence[str] = COMPONENTS) -> None:
        """Set every targeted layer's term to the active pairs (None where there are none: the base layer)."""
        te_changed = False
        for target, layer in self._terms.items():
            if not target.startswith(tuple(c + "." for c in components)):
                continue
            old = layer.lora
            layer.lora = self._term(target, layer)
            te_changed |= target.startswith("text_encoder.") and (old is not None or layer.lora is not None)
        if te_changed:
            self.on_text_encoder_change()

    # --------------------------------------------------------------------- fusing and unloading

    def fuse(self, lora_scale: float = 1.0) -> None:
        """Add the active terms into the weights. Packed layers (the oneDNN CPU path) are fused from their plain
        weight read again from the file, then packed again; the original tensors are kept for unfuse."""
        check_scale(lora_scale, "lora_scale")
        if self.fused is not None:
            raise KolorsError("the LoRAs are already fused; call unfuse_lora() first")
        plan = []
        for target, layer in self._terms.items():
            if layer.lora is None:
                continue
            component, _, module = target.partition(".")
            model = self.models[component]
            if _weight(layer) is not None and _weight(layer).is_meta:
                raise KolorsError(
                    f"cannot fuse '{target}': the text encoder is streamed (memory='low'); its LoRA stays unfused"
                )
            plan.append((target, layer, model, module))
        fused: dict[nn.Module, tuple[dict, dict]] = {}
        packs_of = {c: packable(m) for c, m in self.models.items()}
        try:
            for target, layer, model, module in plan:
                packs = packs_of[component_of(target)]
                owner = _packed_owner(model, module, packs)
                for m in {layer, owner} - {None}:
                    fused.setdefault(m, (dict(m._parameters), dict(m._buffers)))
                w = _weight(layer)
                if w is None or w.is_mkldnn:
                    if self.plain_weight is None:
                        raise KolorsError(
                            f"cannot fuse '{target}': its weight is packed and its file is unknown"
                        )
                    w = self.plain_weight(component_of(target), f"{module}.weight")
                new = (w.float() + layer.lora.delta().to(w.device) * lora_scale).to(w.dtype)
                layer.lora = None
                layer._buffers.pop(
                    "weight", None
                )  # a packed Linear's weight is a buffer (layers._replace_weight)
                layer._parameters["weight"] = nn.Parameter(new, requires_grad=False)
                if owner is not None:  # packed before: pack the fused weight the same way
                    packs[f"{module}.weight"]()
        except BaseException:
            _restore(fused)
            self._apply()
            raise
        self.fused = fused

    def unfuse(self) -> None:
        if self.fused is None:
            return
        _restore(self.fused)
        self.fused = None
        self._apply()
        self.on_text_encoder_change()

    def unload(self) -> None:
        """Every LoRA gone: the models are the base models again, bit for bit."""
        self.unfuse()
        for layer in self._terms.values():
            layer.lora = None
        te = any(t.startswith("text_encoder.") for t in self._terms)
        self.adapters, self.active, self._terms, self._stacks, self.enabled = {}, [], {}, {}, True
        if te:
            self.on_text_encoder_change()

    def describe(self) -> list[tuple[str, float, Path]]:
        """The active LoRAs as (name, scale, file), for an image's parameters."""
        return [(n, w, self.adapters[n].file) for n, w in self.active]


def check_scale(value, what: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise KolorsError(f"{what} must be a finite number >= 0, not {value!r}")


def component_of(target: str) -> str:
    return target.partition(".")[0]


def _legacy(key: str) -> str:
    # The older Kwai-Kolors text encoder nests its modules under ChatGLMForConditionalGeneration's `transformer.`.
    return key.replace("text_encoder.transformer.", "text_encoder.", 1)


def _weight(layer: nn.Module) -> Tensor | None:
    return layer._parameters.get("weight", layer._buffers.get("weight"))


def _dtype_device(
    layer: nn.Module, dtype: torch.dtype, device: torch.device
) -> tuple[torch.dtype, torch.device]:
    w = _weight(layer)
    if (
        w is None or w.is_mkldnn or w.is_meta
    ):  # packed, or streamed: the layer runs in the pipeline's dtype, there
        return dtype, device
    return w.dtype, w.device


def _packed_owner(model: nn.Module, module: str, packs: dict) -> nn.Module | None:
    """The module that packed `module`'s weight (itself, or a GEGLU for its projection), if it is packed."""
    pack = packs.get(f"{module}.weight")
    if pack is None:
        return None
    owner = pack.__self__
    layer = model.get_submodule(module)
    packed = _weight(layer) is None or _weight(layer).is_mkldnn
    return owner if packed else None


def _restore(saved: dict[nn.Module, tuple[dict, dict]]) -> None:
    for m, (params, buffers) in saved.items():
        m._parameters.clear()
        m._parameters.update(params)
        m._buffers.clear()
        m._buffers.update(buffers)
