"""The layers every model shares on the CPU fast path, and the pass that packs their weights for it.

The CPU fast path, for bf16 on a CPU where oneDNN runs it: linears through oneDNN's fused op (PyTorch's own,
the one Inductor emits), which applies the bias, a residual add or a GELU inside the matmul instead of in
extra passes over its output, and channels-last activations. Same results up to rounding (one rounding of
a fused output instead of two); float32 keeps diffusers' sequence of operations, with its linears packed on x86.

Packing (`pack_weights`) is a separate pass over a loaded model, as gpt-fast swaps in int8 layers: every module
with a `pack()` method reorders its weight into oneDNN's blocked layout for this CPU, once, instead of oneDNN
reordering it at every call (for the dtypes of PACKED_DTYPES: bf16 where the fast path runs, and float32's
linears, where a packed matmul also runs with fused bias, residual add or GELU). A model is loaded plain; the
pipeline then packs it, or has the loader apply the same pass to each weight as it arrives (`packer`), so that
the plain and packed weights never both exist.

The adapter seam: every linear and convolution here has a `lora` attribute, None unless an adapter
(kolors.adapters.lora) sets it to a callable giving the low-rank term for the layer's input. The forward adds that
term to its output (into the fused residual add where there is one), packed or not; nothing else in a model knows
about adapters.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

mkldnn = torch.ops.mkldnn
FAST_CPU_DTYPES: set[torch.dtype] = (
    {torch.bfloat16}
    if torch.backends.mkldnn.is_available()
    and hasattr(mkldnn, "_linear_pointwise")
    and mkldnn._is_mkldnn_bf16_supported()
    else set()
)


# Dtypes whose linear weights the pack pass packs on the CPU. float32 too on x86, where oneDNN's packed fp32 matmul
# runs the deepest level's linears (most of the UNet's) 9-23% faster than F.linear and the others about as fast
# (BENCHMARKS.md): the linears only, everything else on float32's plain path (see _pays).
PACKED_DTYPES: set[torch.dtype] = FAST_CPU_DTYPES | (
    {torch.float32}
    if torch.backends.mkldnn.is_available()
    and hasattr(mkldnn, "_linear_pointwise")
    and platform.machine().lower() in ("x86_64", "amd64")
    else set()
)


def packs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether models loaded for `device` in `dtype` get packed weights (`pack_weights`, `packer`)."""
    return device.type == "cpu" and dtype in PACKED_DTYPES


def fast_cpu(x: Tensor) -> bool:
    # Under torch.compile the plain ops are traced instead: Inductor fuses them itself, and the fused op
    # has no fake-tensor implementation to trace with.
    return x.device.type == "cpu" and x.dtype in FAST_CPU_DTYPES and not torch.compiler.is_compiling()


# Packed weights (`pack_weights`): oneDNN otherwise reorders each weight into its blocked layout at every call.
# The layout barely depends on the input's size (a weight packed for small inputs runs large ones as fast as one
# packed for them: BENCHMARKS.md), so one hint serves every resolution and batch.
PACK_ROWS_HINT = 512  # matmul rows: CFG batch 2 x 256 pixels at the deepest level of a 512x512 image
PACK_PIXELS_HINT = 32  # convolution input height and width
PACK_TRIM_BYTES = 256 * 1024**2  # how much freed memory goes back to the system at once; not critical


def pack_linear_weight(weight: Tensor) -> Tensor:
    """A (out, in) weight in oneDNN's blocked layout, for `_linear_pointwise`."""
    return mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def _replace_weight(module: nn.Module, packed: Tensor) -> None:
    # The packed tensor is opaque (no views, no dtype casts), so it leaves the state_dict: a packed model is for
    # inference on this CPU, and its checkpoint is the file it was loaded from.
    del module.weight
    module.register_buffer("weight", packed, persistent=False)


LowRankTerm = Callable[[Tensor], Tensor]  # the adapter seam: input -> the term added to the layer's output


class PlainLinear(nn.Linear):
    """nn.Linear with the adapter seam and nothing else: the same op as nn.Linear, never packed, for the layers
    that keep diffusers' exact computation (the text encoder, the time MLPs, GEGLU's projection)."""

    lora: LowRankTerm | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.lora is None else y + self.lora(x)


def _add_lora(module: nn.Module, x: Tensor, residual: Tensor | None) -> Tensor | None:
    # The low-rank term joins the residual, so the fused residual add of the fast path adds both.
    if module.lora is None:
        return residual
    term = module.lora(x)
    return term if residual is None else residual + term


class Conv2d(nn.Conv2d):
    """nn.Conv2d that can add a residual to its output, fused into the convolution once its weight is packed."""

    pack_key = "weight"
    lora: LowRankTerm | None = None

    def pack(self) -> None:
        hint = [2, self.in_channels, PACK_PIXELS_HINT, PACK_PIXELS_HINT]
        packed = mkldnn._reorder_convolution_weight(
            self.weight.detach(), self.padding, self.stride, self.dilation, self.groups, hint
        )
        _replace_weight(self, packed)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        residual = _add_lora(self, x, residual)
        if not self.weight.is_mkldnn:
            y = super().forward(x)
            return y if residual is None else residual + y
        args = (self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups)
        if residual is None:
            return mkldnn._convolution_pointwise(x, *args, "none", [], "")
        return mkldnn._convolution_pointwise.binary(x, residual, *args, "add", None, None, [], None)


class Linear(nn.Linear):
    """nn.Linear that can add a residual to its output, fused into the matmul on the CPU fast path."""

    pack_key = "weight"
    lora: LowRankTerm | None = None

    def pack(self) -> None:
        _replace_weight(self, pack_linear_weight(self.weight))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        residual = _add_lora(self, x, residual)
        if not (self.weight.is_mkldnn or fast_cpu(x)):
            y = F.linear(x, self.weight, self.bias)
            return y if residual is None else residual + y
        if residual is None:
            return mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")


# Logits per head up to which the CPU fast path attends with two plain matmuls: at 512 px the deepest level's
# self-attention (256 x 256) and every cross-attention. PyTorch's CPU flash kernel runs these well below the
# matmul rate (BENCHMARKS.md, small attentions). The 1024 x 1024 self-attentions of the level above stay with
# the kernel: there the logits no longer fit the cache and the kernel, which never holds them all, is faster.
SMALL_ATTENTION_LOGITS = 256 * 256


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(head size) + bias) v over (B, nh, T, hs) tensors; `bias` broadcasts to the logits.

    The matmul path rounds the logits to bf16 before the softmax, as diffusers' classic AttnProcessor does
    (baddbmm in the model's dtype, no upcast for Kolors' UNet); SDPA keeps them in float32. The added error is
    within bf16's (tests/test_unet.py holds both to the float32 output)."""
    if not (fast_cpu(q) and q.shape[-2] * k.shape[-2] <= SMALL_ATTENTION_LOGITS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    logits = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    if bias is not None:  # the merged pad keys' ln P in float32: added, not rounded into the bf16 logits
        logits = logits + bias
    return torch.matmul(logits.softmax(dim=-1).to(v.dtype), v)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Give memory freed by the process back to the OS now. glibc keeps freed heap chunks for reuse, and a
    weight freed as its replacement of another size is made (pack_weights) leaves its chunk
    resident (gigabytes for the full UNet: BENCHMARKS.md). A no-op where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# ---------------------------------------------------------------------------------------------------- the pack pass


def packable(model: nn.Module) -> dict[str, Callable[[], None]]:
    """Weight key -> the `pack()` that packs it, for every module of `model` that can pack its weight (each
    names the weight it consumes in `pack_key`: a GEGLU packs its projection's weight in two halves)."""
    return {
        f"{name}.{module.pack_key}" if name else module.pack_key: module.pack
        for name, module in model.named_modules()
        if callable(getattr(module, "pack", None)) and hasattr(module, "pack_key")
    }


def _pack_if_it_pays(model: nn.Module, key: str, pack: Callable[[], None]) -> None:
    try:
        weight = model.get_parameter(key)
    except AttributeError:  # packed already (a buffer now, or gone): the pass can run twice
        return
    if _pays(pack.__self__, weight.dtype):
        pack()


def _pays(module: nn.Module, dtype: torch.dtype) -> bool:
    # float32 convolutions stay plain: packed for one input size they ran up to 4.8x slower at another
    # (BENCHMARKS.md), and a generation's sizes vary; bf16's barely depend on it.
    return not (isinstance(module, Conv2d) and dtype not in FAST_CPU_DTYPES)


def pack_weights(model: nn.Module) -> None:
    """Pack every per-step convolution and matmul weight of a loaded model into oneDNN's layout for this CPU:
    identical results up to rounding, a faster step (BENCHMARKS.md). For the dtypes of PACKED_DTYPES on a CPU
    (float32 packs its linears only), not under torch.compile, and one way: the packed weights leave the
    state_dict, so a step that changes weights (an adapter) runs before this pass. Weights that run once per call
    (a text projection, the time MLPs) are PlainLinear and stay as they are."""
    for key, pack in packable(model).items():
        _pack_if_it_pays(model, key, pack)
        return_freed_memory()  # else the freed plain weights stay resident


def packer(model: nn.Module) -> Callable[[str], None]:
    """The same pass one weight at a time, for Checkpoint.load(loaded=...): each weight is packed as soon as it
    is read, so the plain and packed model never both exist (a faster load, BENCHMARKS.md). The freed plain
    weights go back to the system every PACK_TRIM_BYTES."""
    packs, freed = packable(model), 0

    def loaded(key: str) -> None:
        nonlocal freed
        if key in packs:
            freed += model.get_parameter(key).nbytes
            _pack_if_it_pays(model, key, packs[key])
            if freed >= PACK_TRIM_BYTES:
                return_freed_memory()
                freed = 0

    return loaded
