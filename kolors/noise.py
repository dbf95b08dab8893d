"""Gaussian noise drawn exactly as diffusers draws it, so a seed gives diffusers' image.

Both the initial latents and the VAE posterior sample come from here. The rule that matters is where the
numbers are drawn: on the generator's device, not the target's. A CPU generator draws on the CPU and the
tensor moves afterwards, so a CPU seed gives the same noise on every device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int],
    generator: Generators = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of `shape`, as diffusers' `randn_tensor`. A list of generators draws one batch
    element each (element i from generator i), so each image of a batch has its own seed."""
    shape = tuple(shape)
    device = torch.device(device) if device is not None else None
    target = device or torch.device("cpu")
    rand_device = device
    if generator is not None:
        first = generator if isinstance(generator, torch.Generator) else generator[0]
        if first.device.type != target.type:
            if first.device.type == "cuda":
                raise ValueError(f"cannot draw {target} noise from a {first.device} generator")
            if first.device.type == "cpu":
                rand_device = torch.device("cpu")

    if isinstance(generator, torch.Generator) or generator is None:
        return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(target)
    if len(generator) == 1:
        return torch.randn(shape, generator=generator[0], device=rand_device, dtype=dtype).to(target)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per element")
    one = (1, *shape[1:])
    noise = [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
    return torch.cat(noise).to(target)
