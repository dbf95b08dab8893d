"""The denoising loop never reads a tensor back to the host, so on a GPU a step never waits for the device.

CUDA's torch.cuda.set_sync_debug_mode cannot run here, so the tests record, on CPU, every call that would
sync a GPU: reading tensor data on the host (.item(), bool(), float(), .tolist(), .numpy(), .cpu(), printing),
making a tensor from host data (torch.tensor, one blocking copy per call), and ops whose output shape depends
on the data (nonzero, boolean indexing, unique), which must read a count back.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from kolors import samplers
from kolors.pipeline import KolorsPipeline

Tensor = torch.Tensor
HOST_FUNCTIONS = {
    Tensor.item,
    Tensor.tolist,
    Tensor.numpy,
    Tensor.cpu,
    Tensor.__bool__,
    Tensor.__float__,
    Tensor.__int__,
    Tensor.__index__,
    Tensor.__format__,
    Tensor.__repr__,
    torch.tensor,
    torch.as_tensor,
}
aten = torch.ops.aten
HOST_OPS = {  # what the functions above and data-dependent shapes reach at the dispatcher
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.equal.default,
    aten.is_nonzero.default,
}


class HostReads(TorchFunctionMode):
    """Records the name of every host-reading call made inside it, at the Python API and the dispatcher."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self._ops = _OpRecorder(self.calls)

    def __enter__(self):
        self._ops.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._ops.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_FUNCTIONS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


class _OpRecorder(TorchDispatchMode):
    def __init__(self, calls: list[str]):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_OPS:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    p = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


def test_the_recorder_sees_host_reads():
    x = torch.randn(3)
    with HostReads() as reads:
        x.sum().item()
        bool(x[0] > 0)
        x.tolist()
        torch.tensor([1.0])
        x[x > 0]
    assert len(reads.calls) >= 5


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_denoising_loop_reads_nothing_back(pipe, sampler, guidance):
    """Every step of every sampler, guided or not: the UNet, guidance, the sigma -> timestep lookup, the step
    noise of the stochastic ones (DDIM with eta) and the sampler update."""
    embeds = pipe.encode_prompt(["a red car", "一只猫"], negative_prompt="" if guidance > 1 else None)
    plan = samplers.schedule(pipe.scheduler_config, sampler, 4)
    denoise = pipe._denoiser(embeds, 1, guidance, plan.sigmas, plan.timesteps, (64, 64))
    noise = pipe._step_noise(torch.Generator().manual_seed(0), sampler)
    extra = {"eta": 1.0} if sampler == "ddim" else {}
    x = torch.randn(2, 4, 8, 8) * plan.init_noise_sigma
    steps = []
    with torch.inference_mode(), HostReads() as reads:
        out = samplers.sample(
            plan, denoise, x, callback=lambda i, n, x, d: steps.append(i), noise=noise, **extra
        )
    assert steps == [0, 1, 2, 3]
    assert out.isfinite().all()
    assert reads.calls == []


def test_host_reads_of_a_generation_do_not_grow_with_steps(pipe):
    """End to end (encode, denoise, decode), the host reads are a fixed number per generation."""
    counts = []
    for steps in (1, 1, 3):  # the first call is a warm-up: lazy one-time set-up reads, a prompt cache filled
        with HostReads() as reads:
            pipe("a cat", height=64, width=64, num_inference_steps=steps, seed=0, output_type="np")
        counts.append(len(reads.calls))
    assert counts[1] == counts[2]
