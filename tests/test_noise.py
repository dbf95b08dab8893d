"""kolors.noise.randn against diffusers' randn_tensor: the same seed must give the same numbers."""

from __future__ import annotations

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from kolors.noise import randn

SHAPE = (3, 4, 6, 5)


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cpu_generator_matches_diffusers(dtype):
    (ours,), (ref,) = gens(11), gens(11)
    noise = randn(SHAPE, ours, device="cpu", dtype=dtype)
    assert noise.dtype == dtype
    assert torch.equal(noise, randn_tensor(SHAPE, generator=ref, device=torch.device("cpu"), dtype=dtype))


def test_generator_per_batch_element_matches_diffusers():
    noise = randn(SHAPE, gens(1, 2, 3), device="cpu", dtype=torch.float32)
    assert torch.equal(noise, randn_tensor(SHAPE, generator=gens(1, 2, 3), device=torch.device("cpu")))
    # element i is what generator i alone draws, so an image's noise does not depend on its batch neighbours
    assert torch.equal(noise[1:2], randn((1, *SHAPE[1:]), gens(2)[0]))
    assert torch.equal(randn(SHAPE, gens(5)), randn(SHAPE, gens(5)[0]))  # a list of one is one generator


def test_wrong_number_of_generators_is_an_error():
    with pytest.raises(ValueError, match="generators"):
        randn(SHAPE, gens(1, 2))


def test_cpu_generator_draws_on_cpu_then_moves():
    # The meta device stands in for an accelerator: diffusers draws on the CPU and moves the tensor.
    noise = randn(SHAPE, gens(1)[0], device="meta", dtype=torch.float16)
    ref = randn_tensor(SHAPE, generator=gens(1)[0], device=torch.device("meta"), dtype=torch.float16)
    assert noise.device == ref.device == torch.device("meta") and noise.dtype == ref.dtype == torch.float16


@pytest.mark.parametrize("device", [None, "cpu"])
def test_no_generator_gives_shape_dtype_device_of_diffusers(device):
    noise = randn(SHAPE, None, device=device, dtype=torch.bfloat16)
    ref = randn_tensor(SHAPE, generator=None, device=device and torch.device(device), dtype=torch.bfloat16)
    assert (noise.shape, noise.dtype, noise.device) == (ref.shape, ref.dtype, ref.device)
    assert noise.std().item() > 0.5  # real noise, not zeros


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_matches_diffusers_and_refuses_cpu_target():
    noise = randn(SHAPE, torch.Generator("cuda").manual_seed(3), device="cuda", dtype=torch.float16)
    ref = randn_tensor(
        SHAPE,
        generator=torch.Generator("cuda").manual_seed(3),
        device=torch.device("cuda"),
        dtype=torch.float16,
    )
    assert torch.equal(noise, ref)
    on_cpu = randn(SHAPE, gens(3)[0], device="cuda")
    assert on_cpu.device.type == "cuda" and torch.equal(on_cpu.cpu(), randn(SHAPE, gens(3)[0]))
    with pytest.raises(ValueError):
        randn(SHAPE, torch.Generator("cuda"), device="cpu")
