"""IP-Adapter-Plus: the UNet step with an image prompt against the bare step, and the image encoder's time per
reference image, on random weights of the real shapes.

    python bench/bench_ip_adapter.py --scale mid --dtype float32 --latent 32    # minutes on 2 cores
    python bench/bench_ip_adapter.py --latent 64                                # the full UNet at 512x512

The adapter has Kolors-IP-Adapter-Plus' shapes (Resampler 2048 wide, depth 4, 12 heads, 16 queries, CLIP width
1024 in, the UNet's cross-attention width out; to_k_ip / to_v_ip in every cross-attention), written to a
safetensors file and loaded by kolors.adapters.ip_adapter.load_adapter. The image keys and values are computed once
(ContextCache.ip), so the step's extra cost is the second attention of each cross-attention: the steps (batch 2, as
with guidance) run interleaved, bare and with the image prompt. The encoder is CLIP ViT-L/14 at 336 px (24
layers, 1024 wide) with random weights: one reference image costs two encoder passes (the image and the zeroed
pixels of the unconditional branch) and one Resampler pass of both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

if __package__ in (None, ""):  # run as `python bench/bench_ip_adapter.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_unet import (  # noqa: E402
    SCALES,
    build_models,
    kolors_step,
    make_inputs,
    pad_counts,
    unet_config,
    with_cpu_time,
)
from bench.common import REFERENCE, SEED_PROMPT, add_common_args, alternate, report, setup  # noqa: E402

CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
RESAMPLER = dict(dim=2048, depth=4, heads=12, num_queries=16, ff_mult=4)


def adapter_state(ours, cross: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The official key layout (`image_proj.…`, `ip_adapter.{k}.to_k_ip.weight`) with random values."""
    from kolors.adapters.ip_adapter import block_names, diffusers_order

    g = torch.Generator().manual_seed(seed)
    dim, inner = RESAMPLER["dim"], 64 * RESAMPLER["heads"]

    def r(*shape):
        return torch.randn(shape, generator=g) / shape[-1] ** 0.5

    s = {
        "latents": r(1, RESAMPLER["num_queries"], dim),
        "proj_in.weight": r(dim, CLIP_L_336["hidden_size"]),
        "proj_in.bias": torch.zeros(dim),
        "proj_out.weight": r(cross, dim),
        "proj_out.bias": torch.zeros(cross),
        "norm_out.weight": torch.ones(cross),
        "norm_out.bias": torch.zeros(cross),
    }
    for i in range(RESAMPLER["depth"]):
        p = f"layers.{i}."
        s |= {p + f"0.{n}.weight": torch.ones(dim) for n in ("norm1", "norm2")}
        s |= {p + f"0.{n}.bias": torch.zeros(dim) for n in ("norm1", "norm2")}
        s |= {p + "0.to_q.weight": r(inner, dim), p + "0.to_kv.weight": r(2 * inner, dim)}
        s |= {
            p + "0.to_out.weight": r(dim, inner),
            p + "1.0.weight": torch.ones(dim),
            p + "1.0.bias": torch.zeros(dim),
        }
        s |= {p + "1.1.weight": r(4 * dim, dim), p + "1.3.weight": r(dim, 4 * dim)}
    state = {f"image_proj.{k}": v for k, v in s.items()}
    names = block_names(ours)
    for n, i in enumerate(diffusers_order(names)):
        width = ours.get_submodule(names[i]).attn2.to_q.out_features
        for which in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * n + 1}.{which}.weight"] = r(width, cross)
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, repeats=3)
    parser.add_argument("--config", default=str(REFERENCE / "unet" / "config.json"), help="UNet config.json")
    parser.add_argument("--scale", default="full", choices=list(SCALES))
    parser.add_argument("--channels", default=None)
    parser.add_argument("--depth", default=None)
    parser.add_argument("--latent", type=int, default=64, help="latent height and width (64: 512x512 pixels)")
    parser.add_argument("--encoder-layers", type=int, default=CLIP_L_336["num_hidden_layers"])
    args = parser.parse_args(argv)
    device, dtype = setup(args)

    from kolors.adapters.ip_adapter import load_adapter
    from kolors.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = unet_config(args)
    _, ours, cfg = build_models(config, dtype, device)
    tokens = 256
    inputs = make_inputs(cfg, 2, args.latent, tokens, pad_counts(["", SEED_PROMPT], tokens), dtype, device)
    bare = ours.prepare_context(inputs["encoder_hidden_states"])

    file = Path(tempfile.mkdtemp(prefix="kolors-bench-ipa-")) / "ip_adapter.safetensors"
    save_file({k: v.contiguous() for k, v in adapter_state(ours, cfg.cross_attention_dim).items()}, file)
    start = time.perf_counter()
    adapter = load_adapter(
        file,
        ours,
        kind="plus",
        image_dim=CLIP_L_336["hidden_size"],
        text_dim=None,
        dtype=dtype,
        device=device,
    )
    load_s = time.perf_counter() - start

    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(**{**CLIP_L_336, "num_hidden_layers": args.encoder_layers})
    ).to(device, dtype)
    encoder.eval().requires_grad_(False)
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def encode():  # what KolorsPipeline does for one reference image: image, zeroed pixels, Resampler
        hidden = torch.cat([encoder.hidden_states(torch.zeros_like(pixels)), encoder.hidden_states(pixels)])
        tokens = adapter.proj(hidden)  # (2, 16, cross): uncond, cond
        return adapter.kv(ours, tokens)

    cpu: dict[str, list[float]] = {}
    enc = alternate(
        {"encode": with_cpu_time(encode, cpu.setdefault("encode", []))}, warmup=1, repeats=args.repeats
    )
    kv = enc["encode"].output  # (2, nh, 16, hs) per block: uncond, cond, as the step's batch
    with_ip = bare._replace(ip=tuple((p,) for p in kv))

    steps = alternate(
        {
            "bare": with_cpu_time(kolors_step(ours, inputs, bare), cpu.setdefault("bare", [])),
            "ip-adapter": with_cpu_time(kolors_step(ours, inputs, with_ip), cpu.setdefault("ip-adapter", [])),
        },
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
    )
    cpu_s = {name: statistics.median(times[args.warmup :] or times) for name, times in cpu.items()}
    wall = steps["ip-adapter"].median / steps["bare"].median - 1
    by_cpu = cpu_s["ip-adapter"] / cpu_s["bare"] - 1
    notes = [
        f"adapter: Resampler {RESAMPLER}, to_k_ip/to_v_ip in {len(kv)} cross-attentions; load {load_s:.2f} s",
        f"image encoder: CLIP ViT-L/14-336 with {args.encoder_layers} layers (the adapter reads the 23rd of 24)",
        f"encoder + Resampler + image keys per reference image: {enc['encode'].median:.3f} s wall, "
        f"{cpu_s['encode']:.3f} s CPU (median)",
        "CPU time per step (median): " + ", ".join(f"{n} {cpu_s[n]:.3f} s" for n in ("bare", "ip-adapter")),
        f"IP-Adapter step overhead: {by_cpu:+.1%} CPU time, {wall:+.1%} wall (goal <= +15% on CPU at 512x512)",
    ]
    shapes = (
        f"latents 2x{cfg.in_channels}x{args.latent}x{args.latent}, channels {list(cfg.block_out_channels)}"
    )
    report(
        "IP-Adapter step and encoder",
        steps,
        dtype=dtype,
        shapes=shapes,
        device=device,
        baseline="bare",
        notes=notes,
    )


if __name__ == "__main__":
    main()
