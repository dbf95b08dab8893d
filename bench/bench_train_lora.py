"""LoRA training: seconds per optimizer step and peak memory of the UNet's training step, with the trainer's own
pieces (TrainableLora, diffusion_loss, gradient checkpointing, AdamW), on a random UNet of the real shape.

    python bench/bench_train_lora.py --scale mid --resolution 512 --steps 3        # a few minutes on 2 cores
    python bench/bench_train_lora.py --resolution 512 --dtype float32               # full size: ~11 GiB, slow on a CPU
    python bench/bench_train_lora.py --device cuda --dtype bfloat16 --resolution 1024   # bench/gpu.sh

What a `kolors train-lora` step costs once the caches are made (the text encoder and VAE are gone by then): the
frozen UNet in --dtype, a rank-16 LoRA on every attention projection in float32, batch 1, one caption of the
real length (256 tokens, the seed prompt's pads merged as training merges them). The first step is a warm-up
(reported apart); the median of the others is the step time. Peak memory is the process's resident high-water
mark on a CPU, torch's max allocated on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/bench_train_lora.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_unet import SCALES  # noqa: E402
from bench.common import REFERENCE, command_line, format_bytes, machine_info, peak_rss, sync  # noqa: E402


def build_unet(config: dict, dtype: torch.dtype, device: torch.device):
    """kolors' UNet from `config` with seeded random weights (normal / sqrt(fan_in), norms near 1)."""
    from kolors.config import from_dict
    from kolors.models.unet import UNet2DConditionModel, UNetConfig
    from kolors.weights import build_on_meta

    fields = UNetConfig.__dataclass_fields__
    cfg = from_dict(
        UNetConfig, {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
    )
    unet = build_on_meta(lambda: UNet2DConditionModel(cfg)).to_empty(device=device).to(dtype)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() == 1:
                p.copy_(
                    (1.0 if "norm" in name else 0.0) + 0.02 * torch.randn(p.shape, generator=g, device=device)
                )
            else:
                for part in p if device.type == "cpu" else [p]:  # a row at a time: no float32 copy of it all
                    part.copy_(torch.randn(part.shape, generator=g, device=device) / p[0].numel() ** 0.5)
    return unet.requires_grad_(False), cfg


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", default="full", choices=sorted(SCALES))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps after the warm-up one")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-checkpointing", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from kolors.adapters.lora_train import TrainableLora
    from kolors.samplers import load_scheduler_config, train_alphas_cumprod
    from kolors.train.loop import checkpoint_blocks, diffusion_loss

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = {**json.loads((REFERENCE / "unet" / "config.json").read_text()), **SCALES[args.scale]}
    unet, cfg = build_unet(config, dtype, device)
    lora = TrainableLora(unet, rank=args.rank, alpha=args.rank)
    lora.attach()
    if not args.no_checkpointing:
        checkpoint_blocks(unet)
    optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-4, weight_decay=1e-4)
    alphas = train_alphas_cumprod(load_scheduler_config(REFERENCE / "scheduler" / "scheduler_config.json"))
    latent, tokens, pads = args.resolution // 8, 256, 249  # the seed prompt's 7 real tokens, left-padded
    g = torch.Generator().manual_seed(1)
    hidden = cfg.encoder_hid_dim or cfg.cross_attention_dim
    embeds = torch.randn(1, tokens, hidden, generator=g)
    embeds[:, :pads] = embeds[:, :1]
    pooled = torch.randn(1, hidden, generator=g)
    r = float(args.resolution)
    time_ids = torch.tensor([[r, r, 0.0, 0.0, r, r]])

    def step(i: int) -> tuple[float, float]:
        gi = torch.Generator().manual_seed(100 + i)
        latents = torch.randn(1, cfg.in_channels, latent, latent, generator=gi)
        noise = torch.randn(latents.shape, generator=gi)
        t = torch.randint(0, len(alphas), (1,), generator=gi)
        sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        loss = diffusion_loss(unet, *(x.to(device) for x in (latents, noise, t, embeds, pooled, time_ids)), alphas,
                              pads=[pads])  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start, time.process_time() - cpu

    warm, warm_cpu = step(0)
    times, cpus = zip(*(step(i) for i in range(1, args.steps + 1)), strict=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    print(f"command: {command_line()}")
    for k, v in machine_info(device).items():
        print(f"{k}: {v}")
    params = sum(p.numel() for p in unet.parameters())
    print(f"UNet {args.scale}: {params / 1e9:.2f} B parameters in {args.dtype}; LoRA rank {args.rank}: "
          f"{sum(p.numel() for p in lora.parameters()) / 1e6:.1f} M float32 parameters on {len(lora.names)} layers")  # fmt: skip
    print(f"{args.resolution}x{args.resolution}, batch 1, gradient checkpointing {not args.no_checkpointing}")
    # CPU seconds of the process: on a machine shared with other work, wall time also counts the waiting.
    print(f"warm-up step {warm:.2f} s ({warm_cpu:.2f} s CPU); steps {', '.join(f'{t:.2f}' for t in times)} s "
          f"({', '.join(f'{c:.2f}' for c in cpus)} s CPU); median {statistics.median(times):.2f} s/step, "
          f"{statistics.median(cpus):.2f} s CPU/step")  # fmt: skip
    print(f"peak {'GPU memory allocated' if device.type == 'cuda' else 'RSS'}: {format_bytes(peak)}")


if __name__ == "__main__":
    main()
