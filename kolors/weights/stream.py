"""Weights resident only while they run.

The text encoder (ChatGLM3, 12.5 GB in fp16) runs once per prompt, so in low-memory mode its weights are
streamed: each layer is fetched just before it runs and dropped when the next one is needed, and nothing is left
after the forward (WeightStream). On CPU a layer is read from the checkpoint's files and converted; on a GPU it
is copied from a host copy of the weights, so the card never holds more than one layer of it. On a GPU the UNet
and the VAE are parked in host memory and moved to the device for their stage only (on_device). On CPU they stay
loaded: denoising needs the UNet whole, so it is the peak either way, and reloading it for every call would cost
a 5 GB read and conversion.

A stream fetches each unit (a transformer layer, an embedding table) whole when any module inside it runs;
hooks on the modules that own tensors do it, so the model's forward is unchanged. Numerics are unchanged too:
the fetched tensors are the ones a normal load makes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from kolors.weights.checkpoint import Checkpoint, set_tensor


def streaming_units(module: nn.Module) -> list[str]:
    """The parts of `module` fetched as one: each element of a ModuleList (a transformer layer) and each other
    module that owns parameters (an embedding, a final norm). Buffers outside them stay resident."""
    units: list[str] = []

    def visit(name: str, m: nn.Module) -> None:
        if isinstance(m, nn.ModuleList):
            units.extend(f"{name}.{i}" for i in range(len(m)))
        elif next(m.parameters(recurse=False), None) is not None:
            units.append(name)
        else:
            for child_name, child in m.named_children():
                visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", module)
    return units


class WeightStream:
    """Keeps `module`'s units on the meta device except while they run: a unit's tensors are fetched (by
    `fetch(keys) -> {key: tensor}`) when one of its modules is called, the previous unit is dropped then, and the
    last one after the module's forward. At most one unit is resident at a time."""

    def __init__(self, module: nn.Module, fetch: Callable[[list[str]], dict[str, Tensor]]):
        self.module, self.fetch = module, fetch
        keys = list(module.state_dict())
        self.units = {unit: [k for k in keys if k.startswith(unit + ".")] for unit in streaming_units(module)}
        in_units = {k for unit_keys in self.units.values() for k in unit_keys}
        self.loaded: str | None = None
        self.fetches = 0  # units fetched so far
        for key, tensor in fetch([k for k in keys if k not in in_units]).items():
            set_tensor(module, key, tensor)  # the small rest (e.g. a rotary buffer) stays resident
        for name, sub in module.named_modules():
            unit = next((u for u in self.units if name == u or name.startswith(u + ".")), None)
            owns = any(t is not None for t in (*sub._parameters.values(), *sub._buffers.values()))
            if unit is not None and owns:
                sub.register_forward_pre_hook(lambda m, args, unit=unit: self._need(unit))
        module.register_forward_hook(lambda m, args, out: self.release(), always_call=True)

    def _need(self, unit: str) -> None:
        if self.loaded == unit:
            return
        self.release()
        for key, tensor in self.fetch(self.units[unit]).items():
            set_tensor(self.module, key, tensor)
        self.loaded = unit
        self.fetches += 1

    def release(self) -> None:
        """Drop the resident unit: its tensors become meta placeholders of the same shape and dtype."""
        if self.loaded is None:
            return
        state = self.module.state_dict(keep_vars=True)
        for key in self.units[self.loaded]:
            set_tensor(self.module, key, torch.empty_like(state[key], device="meta"))
        self.loaded = None


def stream_weights(
    module: nn.Module, checkpoint: Checkpoint, *, dtype: torch.dtype, device: torch.device
) -> WeightStream:
    """Stream `module` (built on the meta device) from `checkpoint`: from the files on CPU, from a host copy of
    the converted weights on a GPU. The checkpoint is checked against the module first, as a load would."""
    checkpoint.check(module)
    if device.type == "cpu":
        return WeightStream(
            module, lambda keys: dict(checkpoint.read(keys, dtype=dtype, device=device, reread=True))
        )
    host = dict(checkpoint.read(module.state_dict(), dtype=dtype, device="cpu"))
    return WeightStream(module, lambda keys: {k: host[k].to(device, non_blocking=True) for k in keys})


@contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Run `module` (parked in host memory) on `device` for the block, then park it again: the host tensors are
    kept and put back, the device copies are freed."""
    host = dict(module.named_parameters()) | dict(module.named_buffers())
    try:
        for key, tensor in host.items():
            set_tensor(module, key, tensor.to(device))
        yield module
    finally:
        for key, tensor in host.items():
            set_tensor(module, key, tensor)
