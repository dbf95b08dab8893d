"""LoRA: switching the active LoRA set, and the step with an unfused LoRA against the base step, kolors against
diffusers (PEFT) on the same random UNet and the same LoRA files.

    python bench/bench_lora.py --scale mid --dtype float32 --latent 32     # minutes on 2 cores
    python bench/bench_lora.py                                             # the full UNet (needs ~12 GiB free)

Two rank-32 LoRAs on every attention projection (to_q, to_k, to_v, to_out.0 of attn1 and attn2), saved in PEFT keys
and loaded by each side from the same files (diffusers: UNet2DConditionModel.load_lora_adapter). A switch is one
change of the active set, alternating between {a: 0.8} and {a: 0.3, b: 0.6} (diffusers: set_adapters; kolors:
LoraSet.set_active, what KolorsPipeline.set_adapters calls). The steps (batch 2, as with guidance) run interleaved:
each side's base step before its LoRAs are loaded, then with LoRA a active (rank 32) and unfused, then kolors fused.
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

if __package__ in (None, ""):  # run as `python bench/bench_lora.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_unet import (  # noqa: E402
    SCALES,
    build_models,
    diffusers_step,
    kolors_step,
    make_inputs,
    pad_counts,
    unet_config,
    with_cpu_time,
)
from bench.common import REFERENCE, SEED_PROMPT, add_common_args, alternate, report, rss, setup  # noqa: E402

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
SWITCHES = 20


def write_lora(ours: torch.nn.Module, rank: int, seed: int, path: Path) -> Path:
    """A PEFT-format LoRA file (`unet.<module>.lora_A.weight`, `lora_B`) on every attention projection."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in ours.named_modules():
        if name.endswith(tuple(f"attn{i}.{p}" for i in (1, 2) for p in ATTENTION)):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) / 30
            state[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) / 30
    save_file(state, path)
    return path


def time_switches(switch, sets) -> list[float]:
    times = []
    for i in range(SWITCHES):
        start = time.perf_counter()
        switch(*sets[i % 2])
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, repeats=3)
    parser.add_argument("--config", default=str(REFERENCE / "unet" / "config.json"), help="UNet config.json")
    parser.add_argument("--scale", default="full", choices=list(SCALES))
    parser.add_argument("--channels", default=None)
    parser.add_argument("--depth", default=None)
    parser.add_argument("--latent", type=int, default=64, help="latent height and width (64: 512x512 pixels)")
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args(argv)
    device, dtype = setup(args)

    from kolors.adapters.lora import LoraSet

    config = unet_config(args)
    ref, ours, cfg = build_models(config, dtype, device)
    tokens = 256
    inputs = make_inputs(cfg, 2, args.latent, tokens, pad_counts(["", SEED_PROMPT], tokens), dtype, device)
    context = ours.prepare_context(inputs["encoder_hidden_states"])
    # CPU seconds per step beside wall time: on a shared machine, with --threads 1, what a step costs whatever
    # else runs (wall times here swung 2x with the load).
    cpu: dict[str, list[float]] = {}

    def timed_cpu(fns: dict) -> dict:
        return {name: with_cpu_time(fn, cpu.setdefault(name, [])) for name, fn in fns.items()}

    base = alternate(
        timed_cpu({"diffusers": diffusers_step(ref, inputs), "kolors": kolors_step(ours, inputs, context)}),
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
    )

    folder = Path(tempfile.mkdtemp(prefix="kolors-bench-lora-"))
    files = [write_lora(ours, args.rank, seed, folder / f"{n}.safetensors") for seed, n in enumerate("ab")]
    loras = LoraSet({"unet": ours}, unet_config=cfg, dtype=dtype, device=device)
    rss_before = rss()
    start = time.perf_counter()
    for name, file in zip("ab", files, strict=True):
        loras.load(file, adapter_name=name)
    load_kolors = time.perf_counter() - start
    start = time.perf_counter()
    for name, file in zip("ab", files, strict=True):
        ref.load_lora_adapter(str(file), prefix="unet", adapter_name=name)
    load_diffusers = time.perf_counter() - start
    sets = [(["a"], [0.8]), (["a", "b"], [0.3, 0.6])]
    switch = {
        "diffusers": time_switches(ref.set_adapters, sets),
        "kolors": time_switches(loras.set_active, sets),
    }
    rss_after = rss()
    ref.set_adapters(["a"], [0.8])  # the step: one rank-32 LoRA, as the goal states it
    loras.set_active(["a"], [0.8])
    context = ours.prepare_context(inputs["encoder_hidden_states"])  # to_k, to_v of attn2 changed
    steps = alternate(
        timed_cpu(
            {"diffusers+lora": diffusers_step(ref, inputs), "kolors+lora": kolors_step(ours, inputs, context)}
        ),
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
    )
    diff = (steps["kolors+lora"].output.float() - steps["diffusers+lora"].output.float()).abs().max().item()
    loras.fuse()
    fused = alternate(
        timed_cpu({"kolors+fused": kolors_step(ours, inputs, context)}), warmup=1, repeats=args.repeats
    )

    results = {**base, **steps, **fused}
    lora_layers = sum(1 for m in ours.modules() if getattr(m, "lora", None) is not None) or len(loras._terms)
    med = {name: statistics.median(t) * 1e3 for name, t in switch.items()}
    notes = [
        f"LoRAs: 2 files, rank {args.rank}, {lora_layers} attention layers each",
        f"load both files: diffusers {load_diffusers:.3f} s, kolors {load_kolors:.3f} s",
        f"switch the active set (median of {SWITCHES}): diffusers {med['diffusers']:.2f} ms, kolors "
        f"{med['kolors']:.2f} ms, ratio kolors/diffusers {med['kolors'] / med['diffusers']:.2f}x (goal <= 0.5x)",
        f"resident memory across loads and switches: +{(rss_after - rss_before) / 1024**2:.0f} MiB "
        f"(the UNet's weights: {sum(p.nbytes for p in ours.parameters()) / 1024**2:.0f} MiB)",
        f"max |kolors+lora - diffusers+lora| {diff:.3g}",
    ]
    cpu_s = {name: statistics.median(times[args.warmup :]) for name, times in cpu.items()}
    notes.append("CPU time per step (median): " + ", ".join(f"{n} {t:.3f} s" for n, t in cpu_s.items()))
    for side in ("diffusers", "kolors"):
        wall = results[f"{side}+lora"].median / results[side].median - 1
        by_cpu = cpu_s[f"{side}+lora"] / cpu_s[side] - 1
        notes.append(
            f"unfused rank-{args.rank} LoRA step overhead, {side}: {by_cpu:+.1%} CPU time, {wall:+.1%} wall"
            " (goal <= +10% for kolors)"
        )
    fused_cpu = cpu_s["kolors+fused"] / cpu_s["kolors"] - 1
    notes.append(f"fused LoRA step, kolors: {fused_cpu:+.1%} CPU time (no term left: none expected)")
    shapes = (
        f"latents 2x{cfg.in_channels}x{args.latent}x{args.latent}, channels {list(cfg.block_out_channels)}"
    )
    report("LoRA switch and step", results, dtype=dtype, shapes=shapes, device=device, notes=notes)


if __name__ == "__main__":
    main()
