"""Weight-only int8 and int4 for the ChatGLM3 text encoder: less memory, same code on CPU and GPU.

Only the big matrices of each layer are quantized (attention query_key_value and dense, the MLP's two
projections: 95% of the encoder's weights at full size); the embedding, norms and biases keep the model dtype.
Activations stay in the model dtype: only the stored weights are rounded.

- int8: one scale per output channel, w = q * scale with q in [-127, 127].
- int4: asymmetric groups of up to 128 inputs, w = (q - 8) * scale + zero with q in [0, 15], two per byte.

The matmuls use PyTorch's own weight-only kernels on the CPU (torch._weight_int8pack_mm and
torch._weight_int4pack_mm_for_cpu); elsewhere the weight is dequantized to the activation dtype right before
the matmul, which any device can do and a GPU does quickly. torchao was tried first: its int8 ran slower than
bf16 on the CPU and its int4 had no CPU path without further packages (BENCHMARKS.md, text encoder).

The int4 CPU kernel wants its own packed layout, made when the layer is quantized on the CPU; those layers
then run on the CPU only (quantize on the device that runs the model). int8 and the int4 layout used on other
devices move freely between devices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kolors.errors import KolorsError

QUANT_CHOICES = ("int8", "int4")
# The text encoder's big matrices, by attribute name: attention qkv and output, SwiGLU in and out.
QUANTIZED_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
INT4_GROUP_SIZES = (128, 64, 32)  # the largest that divides the layer's inputs (ChatGLM3: 128)
ROWS_PER_BLOCK = 1024  # output channels quantized at a time (a multiple of the CPU int4 kernel's 16)


def parse_quant(quant: str | None) -> str | None:
    """None (no quantization), "int8" or "int4"; anything else is a KolorsError naming the choices."""
    if quant is None or quant in QUANT_CHOICES:
        return quant
    raise KolorsError(
        f"unknown text encoder quantization {quant!r}; choose one of: {', '.join(QUANT_CHOICES)} (None: no quantization)"
    )


def quantize_text_encoder(model: nn.Module, quant: str | None) -> nn.Module:
    """Replace the big Linear layers of the text encoder, in place, by weight-only int8 or int4 ones.
    Each layer is quantized on its own device, one at a time, and its full-precision weight freed."""
    quant = parse_quant(quant)
    if quant is None:
        return model
    make = Int8Linear.from_linear if quant == "int8" else Int4Linear.from_linear
    for name, module in list(model.named_modules()):
        if _is_quantized(name, module):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, make(module))
    return model


def load_quantized(
    model: nn.Module, checkpoint, quant: str, *, dtype: torch.dtype, device: torch.device | str
) -> nn.Module:
    """Load `model` (built on the meta device) from a kolors.weights.Checkpoint, quantizing each big Linear as
    soon as its tensors are read: the full-precision encoder never exists whole (12 GB for ChatGLM3 in fp16,
    more than the GPUs int8 is for), only the quantized one and the matrix at hand."""
    make = Int8Linear.from_linear if parse_quant(quant) == "int8" else Int4Linear.from_linear
    pending = {
        name: {f"{name}.{key}" for key, _ in module.named_parameters()}
        for name, module in model.named_modules()
        if _is_quantized(name, module)
    }

    def quantize(key: str) -> None:
        owner_name = key.rpartition(".")[0]
        if owner_name in pending:
            pending[owner_name].discard(key)
            if not pending[owner_name]:  # weight and bias both read
                parent_name, _, name = owner_name.rpartition(".")
                setattr(model.get_submodule(parent_name), name, make(model.get_submodule(owner_name)))
                del pending[owner_name]

    return checkpoint.load(model, dtype=dtype, device=device, loaded=quantize)


def quant_of(model: nn.Module) -> str | None:
    """ "int8" or "int4" when `model` holds quantized layers, else None."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            return "int8"
        if isinstance(module, Int4Linear):
            return "int4"
    return None


def nbytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight and one scale per output channel (symmetric, round to nearest)."""

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) model dtype
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = _by_rows(_quantize_int8, linear.weight.detach())
        return cls(q, scale, _detached(linear.bias))

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The (out, in) weight in `dtype`."""
        return self.weight.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scale.to(x.dtype))
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, int8, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """nn.Linear with a 4-bit weight in groups along the input, each with its own scale and zero."""

    def __init__(
        self,
        weight: Tensor,
        scales_and_zeros: Tensor,
        bias: Tensor | None,
        *,
        in_features: int,
        group_size: int,
        cpu_packed: bool,
    ):
        super().__init__()
        self.register_buffer("weight", weight)  # uint8: (out, in / 2), two 4-bit values per byte
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (in / group, out, 2) model dtype
        self.register_buffer("bias", bias)
        self.in_features, self.group_size, self.cpu_packed = in_features, group_size, cpu_packed

    @classmethod
    def from_linear(cls, linear: nn.Linear, cpu_kernel: bool | None = None) -> Int4Linear:
        """`cpu_kernel`: pack for PyTorch's CPU kernel (default: when the weight is on the CPU)."""
        w = linear.weight.detach()
        N, K = w.shape
        G = next((g for g in INT4_GROUP_SIZES if K % g == 0), None)
        if G is None or K % 2:
            raise ValueError(f"int4 needs in_features divisible by 32, not {K}")
        cpu_packed = (w.device.type == "cpu" if cpu_kernel is None else cpu_kernel) and N % 16 == 0
        packed, scale, zero = _by_rows(lambda rows: _quantize_int4(rows, G, cpu_packed), w)
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
        return cls(
            packed,
            scales_and_zeros,
            _detached(linear.bias),
            in_features=K,
            group_size=G,
            cpu_packed=cpu_packed,
        )

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The (out, in) weight in `dtype`, from the plain layout (not the CPU kernel's)."""
        N, K, G = self.weight.shape[0], self.in_features, self.group_size
        q = torch.stack([self.weight & 15, self.weight >> 4], dim=-1).view(N, K // G, G).to(dtype)
        scale, zero = self.scales_and_zeros.to(dtype).transpose(0, 1).unbind(-1)  # (N, K/G) each
        return ((q - 8) * scale[..., None] + zero[..., None]).view(N, K)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.cpu_packed:
            if x.device.type != "cpu":
                raise RuntimeError(
                    f"int4 weights packed for the CPU kernel cannot run on {x.device}: quantize the text "
                    "encoder on the device that runs it"
                )
            sz = self.scales_and_zeros.to(x.dtype)
            y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight, self.group_size, sz)
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.weight.shape[0]}, int4, "
            f"group_size={self.group_size}, bias={self.bias is not None}, cpu_packed={self.cpu_packed}"
        )


def _is_quantized(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.rpartition(".")[2] in QUANTIZED_LINEARS


def _quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of a weight -> int8 values and one scale per row (in the weight's dtype)."""
    # Round the scale to the model dtype first, so q is the best integer for the scale actually used.
    scale = (w.abs().amax(dim=1).float() / 127).clamp_(min=torch.finfo(w.dtype).tiny).to(w.dtype)
    q = (w.float() / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def _quantize_int4(w: Tensor, group_size: int, cpu_packed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of a weight -> packed 4-bit values, and a scale and zero per group (in the weight's dtype)."""
    N, K = w.shape
    groups = w.float().view(N, K // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    # Store scale and zero in the model dtype first, then pick each q for the values actually stored.
    scale = ((high - low) / 15).clamp_(min=torch.finfo(w.dtype).tiny).to(w.dtype)
    zero = (low + 8 * scale.float()).to(w.dtype)  # the value of q = 8
    q = (groups - zero.float()[..., None]).div_(scale.float()[..., None]).round_().add_(8)
    q = q.clamp_(0, 15).view(N, K).to(torch.uint8)
    if cpu_packed:
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1), scale, zero
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, zero


def _by_rows(quantize, w: Tensor) -> list[Tensor]:
    """`quantize` over blocks of rows of `w`, each of its outputs concatenated: the same result with small
    float32 temporaries (a whole MLP weight in float32 is 450 MB, and quantizing it whole is several times
    slower)."""
    parts = [quantize(rows) for rows in w.split(ROWS_PER_BLOCK)]
    return [torch.cat(outputs) for outputs in zip(*parts, strict=True)]


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()
