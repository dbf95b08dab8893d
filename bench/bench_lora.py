"""LoRA: switching the active LoRA set, and the step with an unfused LoRA against the base step, kolors against
diffusers (PEFT) on the same random UNet and the same LoRA files.

    python bench/bench_lora.py --scale mid --dtype float32 --latent 32     # minutes on 2 cores
    python bench/bench_lora.py                                             # the full UNet (needs ~12 GiB free)

Two rank-32 LoRAs on every attention projection (to_q, to_k, to_v, to_out.0 of attn1 and attn2), saved in PEFT keys
and loaded by each side from the same files (diffusers: UNet2DConditionModel.load_lora_adapter). A switch is one
change of the active set, alternating between {ink: 0.8} and {ink: 0.3, cat: 0.6} (diffusers: set_adapters; kolors:
LoraSet.set_active, what KolorsPipeline.set_adapters calls). The steps (batch 2, as with guidance) run interleaved:
each side's base step before its LoRAs are loaded, then with LoRA ink active (rank 32) and unfused, then kolors fused.

On a model folder (full size: `python bench/fake_weights.py /tmp/kolors-full`), two parts that never hold two UNets:

    python bench/bench_lora.py --model /tmp/kolors-full --part switch --dtype float16 --repeats 3
    python bench/bench_lora.py --model /tmp/kolors-full --part step --dtype float32 --threads 1 --repeats 3

`switch`: each side in its own process, alternating (bench.common.alternate_children), loads the UNet from the
folder, then the two rank-32 files (a switch as above, 20 times; the resident memory they add and the peak while
switching), then a `--load-rank` 64 file (~190 MB in fp16) `--loads` times into the loaded UNet, each load undone
before the next (diffusers: what KolorsPipeline.load_lora_weights does for the UNet, lora_state_dict then
load_lora_into_unet, undone by unload_lora; kolors: LoraSet.load, undone by unload). `step`: kolors alone, one
UNet in `--dtype`: the base step, the step with LoRA ink unfused and the step with it fused, alternating, after one
small warm-up step; the text keys and values (prepare_context) are made once for each, as per generation.
"""

from __future__ import annotations

import argparse
import json
import shutil
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
from bench.common import (  # noqa: E402
    REFERENCE,
    SEED_PROMPT,
    add_common_args,
    alternate,
    alternate_children,
    format_bytes,
    machine_info,
    peak_rss,
    report,
    reset_peak_rss,
    rss,
    setup,
    sync,
)

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
SWITCHES = 20


def write_lora(
    ours: torch.nn.Module, rank: int, seed: int, path: Path, dtype: torch.dtype = torch.float32
) -> Path:
    """A PEFT-format LoRA file (`unet.<module>.lora_A.weight`, `lora_B`) on every attention projection."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in ours.named_modules():
        if name.endswith(tuple(f"attn{i}.{p}" for i in (1, 2) for p in ATTENTION)):
            down = torch.randn(rank, module.in_features, generator=g) / 30
            up = torch.randn(module.out_features, rank, generator=g) / 30
            state[f"unet.{name}.lora_A.weight"], state[f"unet.{name}.lora_B.weight"] = (
                down.to(dtype),
                up.to(dtype),
            )
    save_file(state, path)
    return path


def time_switches(
    switch, sets, cpu: list[float] | None = None, device: torch.device | str = "cpu"
) -> list[float]:
    """Wall seconds of each of SWITCHES switches (and their CPU seconds appended to `cpu`)."""
    times = []
    for i in range(SWITCHES):
        start, start_cpu = time.perf_counter(), time.process_time()
        switch(*sets[i % 2])
        sync(device)  # a GPU's switch has only been queued
        times.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(time.process_time() - start_cpu)
    return times


# Names of more than one letter: diffusers picks an adapter's keys by `name in key`, and "a" is in every key.
NAMES = ("ink", "cat")
SWITCH_SETS = [(["ink"], [0.8]), (["ink", "cat"], [0.3, 0.6])]


def meta_unet(folder: Path):
    """kolors' UNet of a model folder on the meta device: its layer names and shapes, to write LoRA files."""
    from kolors.config import load_config
    from kolors.models.unet import UNet2DConditionModel, UNetConfig

    with torch.device("meta"):
        return UNet2DConditionModel(load_config(UNetConfig, folder / "unet" / "config.json"))


def spread(times: list[float], unit: float = 1.0) -> str:
    """median (min-max) of `times`, times `unit`."""
    return f"{statistics.median(times) * unit:.2f} ({min(times) * unit:.2f}-{max(times) * unit:.2f})"


def child(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """One side of `--part switch`, in a fresh process: the UNet from the folder, the switches, the loads."""
    folder, files = Path(args.model), Path(args.files)
    if args.side == "diffusers":
        from diffusers import KolorsPipeline, UNet2DConditionModel
        from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA

        start = time.perf_counter()

        variant = "fp16" if any((folder / "unet").glob("*.fp16.*")) else None  # the file kolors picks
        unet = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", variant=variant, torch_dtype=dtype
        )
        unet = unet.to(device).eval().requires_grad_(False)

        def load(file: Path, name: str) -> None:  # KolorsPipeline.load_lora_weights, for its UNet
            state, alphas, metadata = KolorsPipeline.lora_state_dict(str(file), return_lora_metadata=True)
            KolorsPipeline.load_lora_into_unet(
                state,
                network_alphas=alphas,
                unet=unet,
                adapter_name=name,
                metadata=metadata,
                low_cpu_mem_usage=_LOW_CPU_MEM_USAGE_DEFAULT_LORA,
            )

        switch, unload = unet.set_adapters, unet.unload_lora
    else:
        from kolors.adapters.lora import LoraSet
        from kolors.components import load_unet

        start = time.perf_counter()
        unet = load_unet(folder / "unet", dtype=dtype, device=device)
        loras = LoraSet({"unet": unet}, unet_config=unet.config, dtype=dtype, device=device)

        def load(file: Path, name: str) -> None:  # what KolorsPipeline.load_lora_weights calls
            loras.load(file, adapter_name=name)

        switch, unload = loras.set_active, loras.unload
    unet_s = time.perf_counter() - start
    before = rss()
    for name in NAMES:
        load(files / f"{name}.safetensors", name)
    loaded = rss()
    reset_peak_rss()
    switches_cpu: list[float] = []
    switches = time_switches(switch, SWITCH_SETS, switches_cpu, device)
    peak, after = peak_rss(), rss()
    unload()
    loads, loads_cpu, unloads = [], [], []
    for _ in range(args.loads):
        start, start_cpu = time.perf_counter(), time.process_time()
        load(files / "big.safetensors", "big")
        sync(device)
        loads.append(time.perf_counter() - start)
        loads_cpu.append(time.process_time() - start_cpu)
        start = time.perf_counter()
        unload()
        unloads.append(time.perf_counter() - start)
    return dict(
        unet_load_s=unet_s,
        unet_bytes=sum(p.nbytes for p in unet.parameters()),
        rss_unet=before,
        loras_added=loaded - before,
        switching_added=after - loaded,
        switching_peak=peak - loaded,
        switches=switches,
        switches_cpu=switches_cpu,
        loads=loads,
        loads_cpu=loads_cpu,
        unloads=unloads,
    )


def switch_and_load(args: argparse.Namespace, argv: list[str]) -> None:
    """`--part switch`: the two sides in turn, each in its own process, on LoRA files written once here."""
    folder = Path(args.model)
    files = Path(tempfile.mkdtemp(prefix="kolors-bench-lora-"))
    try:
        unet = meta_unet(folder)
        for seed, name in enumerate(NAMES):
            write_lora(unet, args.rank, seed, files / f"{name}.safetensors", torch.float16)
        big = write_lora(unet, args.load_rank, 2, files / "big.safetensors", torch.float16)
        runs = alternate_children(
            str(Path(__file__).resolve()),
            [*argv, "--files", str(files)],
            ["diffusers", "kolors"],
            warmup=0,
            repeats=args.repeats,
            workdir=files,
        )
        big_mb = big.stat().st_size / 1e6
    finally:
        shutil.rmtree(files, ignore_errors=True)

    def pooled(key: str) -> dict[str, list[float]]:
        return {side: [t for r in rs for t in r[key]] for side, rs in runs.items()}

    lines = [f"== LoRA switch and load, UNet from {folder} =="]
    lines += [f"{k:<13}: {v}" for k, v in machine_info().items()]
    lines += [
        f"{'command':<13}: python {' '.join([sys.argv[0], *argv])}",
        f"{'dtype':<13}: {args.dtype} (UNet and LoRAs)",
        f"LoRAs ink, cat: rank {args.rank}, {len(lora_targets(unet))} attention layers each (PEFT keys, fp16 "
        f"files); big: rank {args.load_rank}, {big_mb:.0f} MB",
    ]
    for what, key, unit, goal in (
        ("switch the active set", "switches", "ms", "goal <= 0.5x"),
        (f"load the {big_mb:.0f} MB LoRA into the loaded UNet", "loads", "s", "no goal set"),
    ):
        wall, cpu = pooled(key), pooled(f"{key}_cpu")
        scale = 1e3 if unit == "ms" else 1.0
        for side, rs in runs.items():
            lines.append(
                f"{side}: {what}, median (min-max) of {len(wall[side])} in {len(rs)} processes: wall "
                f"{spread(wall[side], scale)} {unit}, CPU {spread(cpu[side], scale)} {unit}; first of each "
                "process (wall) " + ", ".join(f"{r[key][0] * scale:.2f}" for r in rs)
            )
        ratio = {
            name: statistics.median(t["kolors"]) / statistics.median(t["diffusers"])
            for name, t in (("wall", wall), ("CPU", cpu))
        }
        lines.append(
            f"{what}, ratio kolors/diffusers: {ratio['wall']:.2f}x wall, {ratio['CPU']:.2f}x CPU ({goal})"
        )
    for side, rs in runs.items():
        r = rs[-1]
        lines.append(
            f"{side} memory: UNet {format_bytes(r['unet_bytes'])} (resident with it {format_bytes(r['rss_unet'])}); "
            f"the two LoRAs add {format_bytes(r['loras_added'])} resident, {SWITCHES} switches "
            f"{format_bytes(r['switching_added'])} more, peak while switching +{format_bytes(r['switching_peak'])}"
            " (last process; the others: "
            + ", ".join(
                f"+{format_bytes(x['loras_added'])}, +{format_bytes(x['switching_peak'])}" for x in rs[:-1]
            )
            + ")"
        )
    lines.append(
        "per process, UNet load: "
        + ", ".join(
            f"{side} " + " ".join(f"{r['unet_load_s']:.1f}" for r in rs) + " s" for side, rs in runs.items()
        )
        + "; unload of the big LoRA (median): "
        + ", ".join(f"{side} {statistics.median(t):.2f} s" for side, t in pooled("unloads").items())
    )
    print("\n".join(lines), flush=True)


def lora_targets(unet: torch.nn.Module) -> list[str]:
    return [
        n
        for n, _ in unet.named_modules()
        if n.endswith(tuple(f"attn{i}.{p}" for i in (1, 2) for p in ATTENTION))
    ]


def step_part(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """`--part step`: kolors' full step, base, with an unfused LoRA and fused, alternating, CPU time per step."""
    from kolors.adapters.lora import LoraSet
    from kolors.components import load_unet

    folder = Path(args.model)
    start = time.perf_counter()
    unet = load_unet(folder / "unet", dtype=dtype, device=device)
    unet_s = time.perf_counter() - start
    cfg = unet.config
    tokens = 256
    pads = pad_counts(["", SEED_PROMPT], tokens)
    inputs = make_inputs(cfg, 2, args.latent, tokens, pads, dtype, device)
    files = Path(tempfile.mkdtemp(prefix="kolors-bench-lora-"))
    try:
        file = write_lora(unet, args.rank, 0, files / "a.safetensors", torch.float16)
        loras = LoraSet({"unet": unet}, unet_config=cfg, dtype=dtype, device=device)
        loras.load(file, adapter_name="ink")
    finally:
        shutil.rmtree(files, ignore_errors=True)
    loras.set_active(["ink"], [0.8])
    lora_context = unet.prepare_context(inputs["encoder_hidden_states"])  # attn2's to_k, to_v take the LoRA
    loras.set_enabled(False)
    base_context = unet.prepare_context(inputs["encoder_hidden_states"])
    small = make_inputs(cfg, 2, 16, tokens, pads, dtype, device)  # first-call costs, not the step's
    kolors_step(unet, small, base_context)()
    fuse_s: list[float] = []

    def base():
        loras.set_enabled(False)
        return kolors_step(unet, inputs, base_context)

    def lora():
        loras.set_enabled(True)
        return kolors_step(unet, inputs, lora_context)

    def fused():
        loras.set_enabled(True)
        start = time.perf_counter()
        loras.fuse()
        sync(device)
        fuse_s.append(time.perf_counter() - start)
        return kolors_step(unet, inputs, lora_context)

    variants = {"base": base, "lora": lora, "fused": fused}
    cpu = {name: [] for name in variants}
    wall = {name: [] for name in variants}
    outputs = {}
    reset_peak_rss()
    for round_ in range(args.repeats):
        for name in list(variants) if round_ % 2 == 0 else list(variants)[::-1]:
            step = variants[name]()
            start_cpu, start = time.process_time(), time.perf_counter()
            outputs[name] = step()
            sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            loras.unfuse()
            print(
                f"  {name:<6} round {round_ + 1}: {cpu[name][-1]:.2f} s CPU, {wall[name][-1]:.2f} s wall",
                file=sys.stderr,
                flush=True,
            )
    med = {name: statistics.median(t) for name, t in cpu.items()}
    lines = [f"== LoRA step, kolors, UNet from {folder} =="]
    lines += [f"{k:<13}: {v}" for k, v in machine_info().items()]
    lines += [
        f"{'command':<13}: python {' '.join(sys.argv)}",
        f"{'dtype':<13}: {args.dtype}",
        f"{'shapes':<13}: latents 2x{cfg.in_channels}x{args.latent}x{args.latent}, text 2x{tokens}, "
        f"{sum(p.numel() for p in unet.parameters()) / 1e9:.2f} B parameters",
        f"LoRA ink: rank {args.rank}, scale 0.8, {len(loras._terms)} attention layers; UNet load {unet_s:.1f} s",
    ]
    for name in variants:
        lines.append(
            f"{name:<6} CPU s per step, median (min-max) of {len(cpu[name])}: {spread(cpu[name])}; "
            f"wall {spread(wall[name])}; runs CPU " + " ".join(f"{t:.2f}" for t in cpu[name])
        )
    for name in ("lora", "fused"):
        lo = min(cpu[name]) / max(cpu["base"]) - 1
        hi = max(cpu[name]) / min(cpu["base"]) - 1
        lines.append(
            f"{name} overhead over base: {med[name] / med['base'] - 1:+.1%} CPU time (medians; "
            f"extremes {lo:+.1%} to {hi:+.1%}), goal {'<= +10%' if name == 'lora' else 'none'}"
        )
    base_spread = (max(cpu["base"]) - min(cpu["base"])) / med["base"]
    lines.append(f"base steps' own spread: {base_spread:.1%} of the median")
    lines.append(f"fuse ({len(loras._terms)} layers' deltas into the weights): {spread(fuse_s)} s wall")
    diff = (outputs["lora"] - outputs["fused"]).abs().max().item()
    effect = (outputs["lora"] - outputs["base"]).abs().max().item()
    lines.append(f"max |lora - fused| {diff:.3g}; max |lora - base| {effect:.3g} (the LoRA's effect)")
    lines.append(
        f"peak resident during the steps: {format_bytes(peak_rss())} (the UNet's weights "
        f"{format_bytes(sum(p.nbytes for p in unet.parameters()))}; fused keeps the originals)"
    )
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, repeats=3)
    parser.add_argument("--config", default=str(REFERENCE / "unet" / "config.json"), help="UNet config.json")
    parser.add_argument("--scale", default="full", choices=list(SCALES))
    parser.add_argument("--channels", default=None)
    parser.add_argument("--depth", default=None)
    parser.add_argument("--latent", type=int, default=64, help="latent height and width (64: 512x512 pixels)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument(
        "--part",
        choices=["mid", "switch", "step"],
        default="mid",
        help="switch, step: on the UNet of --model (see above); mid: both sides in one process",
    )
    parser.add_argument("--load-rank", type=int, default=64, help="--part switch: rank of the file to load")
    parser.add_argument("--loads", type=int, default=3, help="--part switch: loads of it per process")
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)  # a child of --part switch
    parser.add_argument("--files", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    if args.part != "mid" and not args.model:
        parser.error(f"--part {args.part} needs --model (a model folder, e.g. from bench/fake_weights.py)")
    if args.side:
        Path(args.child_output).write_text(json.dumps(child(args, device, dtype)))
        return
    if args.part == "switch":
        switch_and_load(args, argv)
        return
    if args.part == "step":
        step_part(args, device, dtype)
        return

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
    files = [write_lora(ours, args.rank, seed, folder / f"{n}.safetensors") for seed, n in enumerate(NAMES)]
    loras = LoraSet({"unet": ours}, unet_config=cfg, dtype=dtype, device=device)
    rss_before = rss()
    start = time.perf_counter()
    for name, file in zip(NAMES, files, strict=True):
        loras.load(file, adapter_name=name)
    load_kolors = time.perf_counter() - start
    start = time.perf_counter()
    for name, file in zip(NAMES, files, strict=True):
        ref.load_lora_adapter(str(file), prefix="unet", adapter_name=name)
    load_diffusers = time.perf_counter() - start
    sets = SWITCH_SETS
    switch = {
        "diffusers": time_switches(ref.set_adapters, sets),
        "kolors": time_switches(loras.set_active, sets),
    }
    rss_after = rss()
    ref.set_adapters(["ink"], [0.8])  # the step: one rank-32 LoRA, as the goal states it
    loras.set_active(["ink"], [0.8])
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
