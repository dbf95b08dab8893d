"""One denoising step with a ControlNet: kolors' against diffusers' on the same random weights, beside the bare step.

    python bench/bench_controlnet.py --scale mid --latent 32 --threads 1 --dtype float32   # minutes on 2 cores
    python bench/bench_controlnet.py                                                      # full size (~12 GiB)

A step with one ControlNet is what StableDiffusionXLControlNetPipeline runs per step with classifier-free
guidance: the ControlNet on batch 2 (its control image in both halves), then the UNet with its residuals.
diffusers' ControlNet applies its own encoder_hid_proj first (as Kolors' pipeline patches it), and both of its
models project the text and compute every cross-attention's keys and values each step, and its ControlNet embeds
the control image each step; kolors reads both models' keys and values from the caches `prepare_context` builds
once per generation, and the image's embedding from `prepare_hint`, also once per generation. The bare step is kolors' UNet alone, so
"kolors+cn / bare" is the ControlNet's cost. The ControlNet is diffusers' ControlNetModel.from_unet of the random
UNet (Kolors' ControlNets have the UNet's down half), and each side holds one copy of the weights, shared between
the two implementations as in bench_unet.py. Same timing rules as bench_unet.py (interleaved, medians, CPU time).

    python bench/bench_controlnet.py --memory --model /tmp/kolors-full --cn-dir /tmp/cn-full   # peak RSS

With --memory: peak memory of one generation with one and with two ControlNets, each side in a fresh process
(bench_memory.py's rules: VmHWM over load and generation). The ControlNets are full-size fakes written once into
--cn-dir (diffusers' ControlNetModel.from_unet layout of the model's UNet, Kolors' encoder_hid_proj included,
random fp16 weights written tensor by tensor as fake_weights.py writes them). Sides: kolors, kolors with
memory="low", and diffusers' StableDiffusionXLControlNetPipeline built from the same UNet, VAE and ControlNets
(their encoder_hid_proj applied first, as Kolors' pipeline patches it) fed Kolors-shaped prompt embeddings: it
has no text encoder loaded at all, since diffusers' own KolorsPipeline has no ControlNet. Killed sides (out of
memory) are reported as such.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

if __package__ in (None, ""):  # run as `python bench/bench_controlnet.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_unet import SCALES, build_models, make_inputs, pad_counts, unet_config  # noqa: E402
from bench.common import (  # noqa: E402
    REFERENCE,
    SEED_PROMPT,
    add_common_args,
    alternate,
    alternate_children,
    setup,
)

GOAL = 1.15  # issue 17: kolors' step with a ControlNet at least 1.15x faster than diffusers'


def build_controlnet(ref_unet, dtype: torch.dtype):
    """diffusers' ControlNet copied from the UNet (zero convolutions given small random weights) and kolors'
    ControlNetModel holding the same tensors."""
    from diffusers import ControlNetModel as DiffusersControlNet

    from kolors.config import from_dict
    from kolors.models.controlnet import ControlNetConfig, ControlNetModel
    from kolors.weights import build_on_meta

    torch.manual_seed(1)  # from_unet draws the image encoder's first layers: the same in every process
    ref = DiffusersControlNet.from_unet(ref_unet).to(dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    for conv in [
        *ref.controlnet_down_blocks,
        ref.controlnet_mid_block,
        ref.controlnet_cond_embedding.conv_out,
    ]:
        conv.weight.copy_(0.01 * torch.randn(conv.weight.shape, generator=g))
    fields = ControlNetConfig.__dataclass_fields__
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in ref.config.items() if k in fields}
    ours = build_on_meta(lambda: ControlNetModel(from_dict(ControlNetConfig, config)))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------ memory

MEMORY_SIDES = ("kolors", "kolors-low", "diffusers")


def write_fake_controlnets(model: Path, out: Path, count: int) -> list[Path]:
    """`count` full-size fake ControlNets for `model`'s UNet in `out` (kept: written once, ~2.5 GB each in fp16),
    with diffusers' from_unet config and fake_weights.py's random values (a different seed each)."""
    from diffusers import ControlNetModel as DiffusersControlNet
    from diffusers import UNet2DConditionModel

    from bench.fake_weights import random_blocks, write_safetensors

    folders = [out / f"cn-{i}" for i in range(count)]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((model / "unet" / "config.json").read_text()))
        cn = DiffusersControlNet.from_unet(unet, load_weights_from_unet=False)
    shapes = {key: tuple(t.shape) for key, t in cn.state_dict().items()}
    for seed, folder in enumerate(folders, start=100):
        weights = folder / "diffusion_pytorch_model.fp16.safetensors"
        if weights.is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        cn.save_config(folder)
        write_safetensors(
            weights, shapes, torch.float16, lambda key, s=seed: random_blocks(key, shapes[key], s)
        )
    return folders


def memory_generate(side: str, model: Path, folders: list[Path], dtype: torch.dtype, size: int, steps: int):
    """Load one side with the ControlNets and make one image; returns (after_load, load_peak, kept bytes)."""
    from bench.bench_load import module_bytes, quiet_diffusers
    from bench.common import peak_rss, reset_peak_rss, rss

    control = [Image.new("RGB", (size, size), (i * 80, 128, 255 - i * 80)) for i in range(len(folders))]
    if side == "diffusers":
        quiet_diffusers()
        from diffusers import (
            AutoencoderKL,
            EulerDiscreteScheduler,
            StableDiffusionXLControlNetPipeline,
            UNet2DConditionModel,
        )
        from diffusers import ControlNetModel as DiffusersControlNet

        class KolorsControlNet(DiffusersControlNet):  # as tests/test_controlnet.py: the projection applied
            def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
                return super().forward(
                    sample, timestep, self.encoder_hid_proj(encoder_hidden_states), *args, **kwargs
                )

        load = dict(variant="fp16", torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(model / "unet", **load)
        vae = AutoencoderKL.from_pretrained(model / "vae", **load)
        nets = [KolorsControlNet.from_pretrained(f, **load) for f in folders]
        pipe = StableDiffusionXLControlNetPipeline(
            vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
            controlnet=nets if len(nets) > 1 else nets[0],
            scheduler=EulerDiscreteScheduler.from_pretrained(model / "scheduler"),
            force_zeros_for_empty_prompt=False, add_watermarker=False,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        modules = [unet, vae, *nets]
        after_load, load_peak = rss(), peak_rss()
        reset = reset_peak_rss()
        g = torch.Generator().manual_seed(0)
        # Kolors' shapes (ChatGLM's 256 positions and its pooled state), as wide as this model's text encoder.
        width = unet.config.encoder_hid_dim
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        embeds = dict(
            prompt_embeds=torch.randn(1, 256, width, generator=g).to(dtype),
            negative_prompt_embeds=torch.randn(1, 256, width, generator=g).to(dtype),
            pooled_prompt_embeds=torch.randn(1, pooled, generator=g).to(dtype),
            negative_pooled_prompt_embeds=torch.randn(1, pooled, generator=g).to(dtype),
        )
        pipe(
            **embeds, image=control if len(nets) > 1 else control[0], height=size, width=size,
            num_inference_steps=steps, guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    else:
        from kolors.pipeline import KolorsPipeline

        memory = "low" if side == "kolors-low" else "normal"
        pipe = KolorsPipeline.from_pretrained(model, dtype=dtype, device="cpu", variant="fp16", memory=memory)
        names = [pipe.load_controlnet(f) for f in folders]
        pipe.set_progress_bar_config(disable=True)
        modules = [pipe.text_encoder, pipe.unet, pipe.vae, *(pipe.controlnets[n] for n in names)]
        after_load, load_peak = rss(), peak_rss()
        reset = reset_peak_rss()
        pipe(
            SEED_PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=5.0,
            control_image=control if len(names) > 1 else control[0], controlnet=names if len(names) > 1 else names[0],
            seed=0, output_type="np",
        )  # fmt: skip
    return dict(
        after_load=after_load,
        load_peak=load_peak,
        generation_peak=peak_rss() if reset else None,
        peak=max(load_peak, peak_rss()),
        kept=module_bytes(modules),
        controlnets_kept=module_bytes(modules[-len(folders) :]),
    )


def memory_main(args) -> None:
    from bench.bench_memory import TOTAL
    from bench.common import GiB, alternate_children, format_bytes

    dtype, model = getattr(torch, args.dtype), Path(args.model)
    if args.side:  # a child: "SIDE:N" with N ControlNets
        side, count = args.side.split(":")
        folders = write_fake_controlnets(model, Path(args.cn_dir), int(count))
        start = time.perf_counter()
        result = memory_generate(side, model, folders, dtype, args.size, args.steps)
        result["seconds"] = time.perf_counter() - start
        Path(args.child_output).write_text(json.dumps(result))
        return
    counts = [int(n) for n in args.controlnets.split(",")]
    write_fake_controlnets(
        model, Path(args.cn_dir), max(counts)
    )  # before any child, so none measures writing
    sides = [f"{side}:{n}" for n in counts for side in args.sides.split(",")]
    argv = [a for a in (sys.argv[1:] if args.argv is None else args.argv)]
    with tempfile.TemporaryDirectory() as tmp:
        runs = alternate_children(__file__, argv, sides, 0, 1, Path(tmp), may_die=sides)
    print(f"command: python bench/bench_controlnet.py {' '.join(argv)}")
    print(
        f"{args.size}x{args.size}, {args.steps} step(s), guidance 5, {args.dtype}, machine {format_bytes(TOTAL)}"
    )
    print(
        f"{'':<16} {'peak RSS':>10} {'after load':>11} {'gen. peak':>10} {'kept':>10} {'ControlNets':>12} {'time':>7}"
    )
    for side, results in runs.items():
        r = results[-1] if results else {"killed": "?"}
        if "killed" in r:
            print(
                f"{side:<16} killed ({r['killed']}): out of memory, more than the machine's {TOTAL / GiB:.1f} GiB"
            )
            continue
        gen = format_bytes(r["generation_peak"]) if r["generation_peak"] is not None else "n/a"
        print(
            f"{side:<16} {format_bytes(r['peak']):>10} {format_bytes(r['after_load']):>11} {gen:>10} "
            f"{format_bytes(r['kept']):>10} {format_bytes(r['controlnets_kept']):>12} {r['seconds']:>6.0f}s"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, repeats=3)
    parser.add_argument(
        "--memory", action="store_true", help="peak RSS with 1 and 2 ControlNets (needs --model)"
    )
    parser.add_argument(
        "--cn-dir", default="/tmp/kolors-cn-full", help="--memory: where the fake ControlNets go"
    )
    parser.add_argument("--size", type=int, default=256, help="--memory: image height and width")
    parser.add_argument("--steps", type=int, default=1, help="--memory: denoising steps")
    parser.add_argument("--controlnets", default="1,2", help="--memory: how many ControlNets, e.g. 1,2")
    parser.add_argument("--sides", default=",".join(MEMORY_SIDES), help="--memory: e.g. kolors-low,diffusers")
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="each side in N fresh processes of its own (full size, float32)",
    )
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: one child's run, in a child process
    parser.add_argument("--child-output", help=argparse.SUPPRESS)
    parser.add_argument("--config", default=str(REFERENCE / "unet" / "config.json"), help="UNet config.json")
    parser.add_argument("--scale", default="full", choices=list(SCALES))
    parser.add_argument("--channels", default=None, help="block_out_channels, e.g. 320,640,640")
    parser.add_argument("--depth", default=None, help="transformer_layers_per_block, e.g. 1,1,2")
    parser.add_argument("--latent", type=int, default=64, help="latent height and width (64: 512x512 pixels)")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args(argv)
    if args.memory:
        if not args.model:
            parser.error("--memory needs --model, a Kolors-diffusers folder (bench/fake_weights.py DIR)")
        args.argv = argv
        return memory_main(args)
    if args.processes and not args.side:
        return step_in_processes(args, argv if argv is not None else sys.argv[1:])
    device, dtype = setup(args)
    times, outputs, prepare_s = step_times(args, device, dtype, args.side)
    if args.side:  # a child of --processes: its times, and its output for the parent to compare
        torch.save(outputs, Path(args.child_output).with_suffix(".pt"))
        Path(args.child_output).write_text(json.dumps(times))
        return
    diff = (outputs["kolors+cn"].float() - outputs["diffusers+cn"].float()).abs().max().item()
    print(f"command: python bench/bench_controlnet.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        f"dtype {args.dtype}, latent {args.latent}, threads {torch.get_num_threads()}, prepare {prepare_s:.3f} s"
    )
    report_steps(args, times, diff)


def step_times(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, side: str | None
) -> tuple[dict[str, dict[str, list[float]]], dict[str, torch.Tensor], float]:
    """Each contender's wall and CPU seconds per timed step ({name: {"wall": [...], "cpu": [...]}}), its last
    output and the time prepare_context and prepare_hint took. `side` "kolors" times the bare step and kolors'
    step with the ControlNet, "diffusers" diffusers' (each in a process of its own, --processes); None all three.
    kolors' weights are packed as the pipeline packs them (kolors.models.layers.packs): a copy of the linears,
    which is why a full-size float32 run needs a process per side (both sides' weights and the packed copy do
    not fit in 24 GiB together)."""
    from kolors.models.layers import pack_weights, packs

    config = unet_config(args)
    ref_unet, unet, cfg = build_models(config, dtype, device)
    ref_cn, cn = build_controlnet(ref_unet, dtype)
    if side == "kolors":
        del ref_unet, ref_cn  # kolors' models hold the tensors now
    elif side == "diffusers":
        del unet, cn
    gc.collect()
    if side != "diffusers" and packs(device, dtype):
        pack_weights(unet)
        pack_weights(cn)
    inputs = make_inputs(
        cfg, 2, args.latent, args.tokens, pad_counts([SEED_PROMPT, ""], args.tokens), dtype, device
    )
    g = torch.Generator().manual_seed(3)
    # The control image at the output size: 8 pixels per latent, which the ControlNet's image encoder undoes.
    cond = torch.rand(2, 3, args.latent * 8, args.latent * 8, generator=g).to(device, dtype)
    x, t, states = inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]
    pooled, ids = inputs["text_embeds"], inputs["time_ids"]

    fns = {}
    prepare_s = 0.0
    if side != "diffusers":
        start = time.perf_counter()
        context, cn_context = unet.prepare_context(states), cn.prepare_context(states)
        hint = cn.prepare_hint(cond)  # the control image's embedding, once per generation as in the pipeline
        prepare_s = time.perf_counter() - start

        def bare():
            return unet(x, t, context, pooled, ids)

        def kolors_cn():
            down, mid = cn(x, t, cn_context, pooled, ids, hint, 0.7)
            return unet(x, t, context, pooled, ids, down, mid)

        fns |= {"bare": bare, "kolors+cn": kolors_cn}
    if side != "kolors":

        def diffusers_cn():
            added = dict(text_embeds=pooled, time_ids=ids)
            down, mid = ref_cn(
                x, t, ref_cn.encoder_hid_proj(states), cond, 0.7, added_cond_kwargs=added, return_dict=False
            )
            return ref_unet(
                x, t, encoder_hidden_states=states, added_cond_kwargs=added,
                down_block_additional_residuals=down, mid_block_additional_residual=mid,
            ).sample  # fmt: skip

        fns["diffusers+cn"] = diffusers_cn

    cpu: dict[str, list[float]] = {k: [] for k in fns}

    def with_cpu(name, fn):
        def run():
            s = time.process_time()
            out = fn()
            cpu[name].append(time.process_time() - s)
            return out

        return run

    results = alternate(
        {k: with_cpu(k, f) for k, f in fns.items()}, warmup=args.warmup, repeats=args.repeats, device=device
    )
    times = {k: {"wall": list(r.times), "cpu": cpu[k][args.warmup :]} for k, r in results.items()}
    return times, {k: r.output for k, r in results.items()}, prepare_s


def step_in_processes(args: argparse.Namespace, argv: list[str]) -> None:
    """--processes N: kolors' side and diffusers' side each in a fresh process, N of each, alternating; every
    process warms up and times its steps as the single-process run does. The step outputs are compared across
    the processes (the same seeded weights and inputs on both sides)."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = alternate_children(
            __file__, argv, ["kolors", "diffusers"], warmup=0, repeats=args.processes, workdir=Path(tmp)
        )
        outputs = {}
        for side in runs:
            outputs |= torch.load(Path(tmp) / f"{side}-0.pt")
    times: dict[str, dict[str, list[float]]] = {}
    for side_runs in runs.values():
        for run in side_runs:
            for name, t in run.items():
                for kind in ("wall", "cpu"):
                    times.setdefault(name, {"wall": [], "cpu": []})[kind] += t[kind]
    diff = (outputs["kolors+cn"].float() - outputs["diffusers+cn"].float()).abs().max().item()
    print(f"command: python bench/bench_controlnet.py {' '.join(argv)}")
    print(
        f"dtype {args.dtype}, latent {args.latent}, threads {args.threads or 'default'}, "
        f"{args.processes} process(es) per side, each {args.warmup} warm-up + {args.repeats} timed steps"
    )
    report_steps(args, times, diff)


def report_steps(args: argparse.Namespace, times: dict[str, dict[str, list[float]]], diff: float) -> None:
    med = {k: statistics.median(v["wall"]) for k, v in times.items()}
    cpu_med = {k: statistics.median(v["cpu"]) for k, v in times.items()}
    for k in times:
        runs = ", ".join(f"{c:.1f}" for c in times[k]["cpu"])
        print(f"  {k:<13} median {med[k]:.3f} s   CPU {cpu_med[k]:.3f} s (runs: {runs})")
    ratio = med["diffusers+cn"] / med["kolors+cn"]
    cpu_ratio = cpu_med["diffusers+cn"] / cpu_med["kolors+cn"]
    print(f"diffusers+cn / kolors+cn: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU (goal >= {GOAL}x)")
    print(f"kolors+cn / bare: {med['kolors+cn'] / med['bare']:.2f}x; max |diff| of the two steps {diff:.2e}")


if __name__ == "__main__":
    main()
