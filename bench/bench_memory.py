"""Peak memory of one generation: diffusers, kolors, and kolors with memory="low", on the same folder.

    python bench/bench_memory.py --model /tmp/kolors-full              # 512x512, 2 steps, bf16, CPU
    python bench/bench_memory.py --model /tmp/kolors-full --strength 0.5 --steps 4   # image-to-image

Each side runs in its own fresh process: load the pipeline, then one text-to-image call (the seed prompt and
an empty negative, classifier-free guidance, DPM-Solver++(2M) Karras, VAE decode). The number that counts is
the process's peak resident set (VmHWM) over load and generation together; the peak of the generation alone
(the high-water mark reset after loading) and the resident set right after loading are given too. The
number of steps barely moves the peak, so the default is 2. Sides alternate when --repeats is above 1.
With --strength, the call is image-to-image instead (diffusers' KolorsImg2ImgPipeline, made from the loaded
pipeline): a fixed synthetic image of the same size is encoded by the VAE and denoised for strength x steps.
With --ip-adapter, each side also loads an IP-Adapter-Plus of the real shapes (random weights, fp16 safetensors,
made once into --ip-dir: bench_ip_adapter.adapter_state) with its CLIP ViT-L/14-336 image encoder (random
weights, saved by transformers) and generates with a reference image at scale 0.5 (diffusers: load_ip_adapter,
set_ip_adapter_scale, ip_adapter_image). Each side reports the peak of its image-encoder stage too (reset before
it, read after it; kolors: around encode_image, diffusers: around its encode_image), and kolors-low reports
whether the encoder's weights stay in memory after the stage.

    python bench/bench_memory.py --model /tmp/kolors-full --ip-adapter --ip-dir /tmp/kolors-ipa-bench

--light keeps every weight at full size but skips the compute a CPU without native bf16/fp16 cannot do in a
sitting (there a bf16 convolution runs below 0.5 GFLOP/s): the sides get the same random prompt embeddings (and,
with --ip-adapter, image embeddings: ip_adapter_image_embeds) instead of running the text and image encoders, and
return latents (no VAE decode); use it with a small --size and --steps 1. What it measures is then the weights each
side holds, through load and one small denoising step, not a whole generation's activations.

Goal (issue 3): kolors with memory="low" peaks at most 40% of diffusers' peak, with the image identical to
kolors' normal mode (checked here bit for bit).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python bench/bench_memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_load import (  # noqa: E402
    add_args,
    file_weights_bytes,
    header,
    load,
    module_bytes,
    quiet_diffusers,
)
from bench.common import (  # noqa: E402
    SEED_PROMPT,
    GiB,
    alternate_children,
    format_bytes,
    memory_total,
    peak_rss,
    reset_peak_rss,
    rss,
)

SIDES = ("diffusers", "kolors", "kolors-low")
GPU_SIDES = ("diffusers-offload",)  # diffusers with enable_model_cpu_offload(): on CUDA only
DIFFUSERS = ("diffusers", "diffusers-offload")
GOAL = 0.4  # kolors-low's peak / diffusers' peak
TOTAL = memory_total()


def init_image(size: int):
    """The same smooth synthetic picture on every side: colour ramps and a disc (the values do not matter)."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).astype(float)
    rgb = np.stack([x, y, 0.5 * (1 - disc) + disc * (1 - x)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def make_ip_adapter(folder: Path, model: Path) -> None:
    """An IP-Adapter-Plus folder of the real shapes: ip_adapter_plus_general.safetensors (fp16, the official keys
    for the UNet in `model`) and image_encoder/ (CLIP ViT-L/14 at 336 px, random, transformers' layout, fp16)."""
    if (folder / "ip_adapter_plus_general.safetensors").is_file() and (folder / "image_encoder").is_dir():
        return  # made by an earlier run: this process stays small beside the sides it measures
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from bench.bench_ip_adapter import CLIP_L_336, adapter_state
    from kolors.config import load_config
    from kolors.models.unet import UNet2DConditionModel, UNetConfig
    from kolors.weights import build_on_meta

    folder.mkdir(parents=True, exist_ok=True)
    cfg = load_config(UNetConfig, model / "unet" / "config.json")
    unet = build_on_meta(lambda: UNet2DConditionModel(cfg))  # for its block names and widths only
    state = adapter_state(unet, cfg.cross_attention_dim)
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, folder / "tmp.safetensors")
    (folder / "tmp.safetensors").rename(folder / "ip_adapter_plus_general.safetensors")
    del state
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L_336)).to(torch.float16)
    encoder.save_pretrained(folder / "image_encoder")


def reference_image():
    """The IP-Adapter's reference picture: the init image's pattern at CLIP's size, turned."""
    return init_image(336).rotate(90)


def light_inputs(side: str, args) -> dict:
    """--light: random prompt embeddings of the model's shapes (and image embeddings, uncond first), the same on
    every side, in place of the encoders' outputs."""
    import json

    hidden = json.loads((Path(args.model) / "text_encoder" / "config.json").read_text())["hidden_size"]
    g = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)

    def r(*shape):
        return torch.randn(shape, generator=g).to(dtype)

    embeds, pooled, negative, negative_pooled = (
        r(1, 256, hidden),
        r(1, hidden),
        r(1, 256, hidden),
        r(1, hidden),
    )
    if side == "diffusers":
        out = dict(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=negative,
            negative_pooled_prompt_embeds=negative_pooled,
        )
    else:
        from kolors.pipeline import PromptEmbeds

        out = dict(prompt_embeds=PromptEmbeds(embeds, pooled, negative, negative_pooled))
    if args.ip_dir:
        clip = json.loads((Path(args.ip_dir) / "image_encoder" / "config.json").read_text())
        tokens = (clip["image_size"] // clip["patch_size"]) ** 2 + 1
        out["ip_adapter_image_embeds"] = [r(2, 1, tokens, clip["hidden_size"])]
    return out


def generate(side: str, pipe, args) -> np.ndarray:
    image = {} if args.strength is None else dict(image=init_image(args.size), strength=args.strength)
    if args.light:
        image |= light_inputs(side, args)
    else:
        image |= dict(prompt=args.prompt, negative_prompt="")
        if args.ip_dir:
            image["ip_adapter_image"] = reference_image()
    common = image | dict(
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        output_type="latent" if args.light else "np",
    )
    if side == "diffusers":
        from diffusers import DPMSolverMultistepScheduler, KolorsImg2ImgPipeline

        if args.strength is not None:  # the same components, no copy
            pipe = KolorsImg2ImgPipeline.from_pipe(pipe)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, use_karras_sigmas=True
        )
        pipe.set_progress_bar_config(disable=True)
        images = pipe(**common, generator=torch.Generator("cpu").manual_seed(args.seed)).images
    else:
        pipe.set_progress_bar_config(disable=True)
        images = pipe(**common, sampler="dpmpp-2m", seed=args.seed).images
    return images.float().numpy() if isinstance(images, torch.Tensor) else images


def child(args) -> None:
    """Load and generate once in this fresh process; the image goes next to the JSON for the comparison."""
    import json

    if args.side == "diffusers":
        quiet_diffusers()
    import kolors.pipeline  # noqa: F401

    side, device = args.side.split("-")[0], torch.device(args.device)
    gpu = device.type == "cuda"
    start = time.perf_counter()
    if args.side == "kolors-low":
        pipe, modules = load(side, Path(args.model), getattr(torch, args.dtype), args.device, memory="low")
    else:  # diffusers moves to a GPU after its adapter is loaded, as load_ip_adapter loads onto the CPU
        host = "cpu" if gpu and side == "diffusers" else args.device
        pipe, modules = load(side, Path(args.model), getattr(torch, args.dtype), host)
    encoder_stage = {}
    if args.ip_dir:
        modules += load_ip_adapter(side, pipe, Path(args.ip_dir))
        encoder_stage = watch_encoder(side, pipe)
        encoder_stage["encoder_resident_after_load"] = resident_bytes(pipe.image_encoder)
    if args.side == "diffusers-offload":  # diffusers' own answer on a GPU: each model visits the device
        pipe.enable_model_cpu_offload(device=device)
    elif gpu and side == "diffusers":
        pipe = pipe.to(device)
    load_seconds, after_load, load_peak = time.perf_counter() - start, rss(), peak_rss()
    if gpu:
        gpu_after_load, gpu_load_peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    reset = reset_peak_rss()
    start = time.perf_counter()
    image = generate(side, pipe, args)
    if args.ip_dir:
        encoder_stage["encoder_resident_after_generation"] = resident_bytes(pipe.image_encoder)
    result = dict(
        load_seconds=load_seconds,
        seconds=time.perf_counter() - start,
        load_peak=load_peak,
        after_load=after_load,
        generation_peak=peak_rss() if reset else None,
        peak=max(load_peak, peak_rss()),
        kept=module_bytes(modules),
        **encoder_stage,
    )
    if gpu:  # torch's max allocated on the device, over load and generation and over generation alone
        gpu_generation_peak = torch.cuda.max_memory_allocated()
        result |= dict(
            gpu_after_load=gpu_after_load,
            gpu_generation_peak=gpu_generation_peak,
            gpu_peak=max(gpu_load_peak, gpu_generation_peak),
        )
    out = Path(args.child_output)
    np.save(out.with_suffix(".npy"), image)
    result["image"] = str(out.with_suffix(".npy"))
    out.write_text(json.dumps(result))


def load_ip_adapter(side: str, pipe, folder: Path) -> list:
    """Load the bench IP-Adapter with its image encoder, scale 0.5, as each library's users do; its modules."""
    if side == "diffusers":
        pipe.load_ip_adapter(
            str(folder),
            subfolder="",
            weight_name="ip_adapter_plus_general.safetensors",
            image_encoder_folder="image_encoder",
        )
        pipe.set_ip_adapter_scale(0.5)
        return [pipe.image_encoder, pipe.unet.encoder_hid_proj]
    pipe.load_ip_adapter(folder, weight_name="ip_adapter_plus_general.safetensors")
    pipe.set_ip_adapter_scale(0.5)
    return [pipe.image_encoder, pipe.ip_adapter.proj]


def resident_bytes(module) -> int:
    """The bytes of `module`'s weights that are in memory (a streamed module's are meta outside its stage)."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if not p.is_meta)


def watch_encoder(side: str, pipe) -> dict:
    """Wrap the pipeline's encode_image so the peak RSS of the image-encoder stage and the resident set after it
    land in the returned dict (filled during the generation)."""
    seen: dict = {}
    inner = pipe.encode_image

    def encode_image(*a, **k):
        reset_peak_rss()
        before = rss()
        out = inner(*a, **k)
        seen.update(encoder_rss_before=before, encoder_stage_peak=peak_rss(), encoder_rss_after=rss())
        seen["encoder_resident_after"] = resident_bytes(pipe.image_encoder)  # once the stage is over
        return out

    pipe.encode_image = encode_image
    return seen


def main(argv: list[str] | None = None) -> None:
    parser = add_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), repeats=1)
    parser.set_defaults(warmup=0)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=SEED_PROMPT)
    parser.add_argument("--keep-images", default=None, help="a folder to keep each side's image (.npy) in")
    parser.add_argument(
        "--strength", type=float, default=None, help="image-to-image of a synthetic image with this strength"
    )
    parser.add_argument(
        "--ip-adapter",
        action="store_true",
        help="with an IP-Adapter-Plus and a reference image (fake weights)",
    )
    parser.add_argument(
        "--ip-dir",
        default=None,
        help="where the fake IP-Adapter is made once and kept (default: a temp folder)",
    )
    parser.add_argument(
        "--light",
        action="store_true",
        help="skip the encoders and the VAE decode (random embeddings given instead): see the docstring",
    )
    parser.add_argument(
        "--sides", default=",".join(SIDES), help=f"which sides to run, of {', '.join(SIDES)} (default: all)"
    )
    args = parser.parse_args(argv)
    if args.side:
        return child(args)
    if args.strength is not None and not (0 < args.strength <= 1 and int(args.steps * args.strength) >= 1):
        parser.error(
            "--strength must be in (0, 1] and leave a step: steps x strength >= 1, e.g. --steps 4 --strength 0.5"
        )
    if not Path(args.model).is_dir():
        parser.error("--model must be a Kolors-diffusers folder, e.g. from: python bench/fake_weights.py DIR")
    argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        if args.ip_adapter:
            args.ip_dir = args.ip_dir or str(Path(tmp) / "ip-adapter")
            make_ip_adapter(Path(args.ip_dir), Path(args.model))
            if "--ip-dir" not in argv:
                argv += ["--ip-dir", args.ip_dir]
        workdir = Path(args.keep_images or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        sides = tuple(args.sides.split(","))
        sides = sides + GPU_SIDES if torch.device(args.device).type == "cuda" else sides
        # diffusers may not fit the machine at all (killed by the OOM killer): that is a result too
        runs = alternate_children(
            __file__, argv, sides, args.warmup, args.repeats, workdir, may_die=DIFFUSERS
        )
        killed = {side: sum("killed" in r for r in rs) for side, rs in runs.items() if side in DIFFUSERS}
        runs = {side: [r for r in rs if "killed" not in r] for side, rs in runs.items()}
        images = {side: np.load(results[-1]["image"]) for side, results in runs.items() if results}
    in_files = file_weights_bytes(Path(args.model), dtype)
    notes = [
        f"{'weights':<13}: {format_bytes(in_files)} in {args.dtype} (all tensors of the files)",
        f"{'generation':<13}: {args.size}x{args.size}, {args.steps} steps dpmpp-2m Karras, guidance "
        f"{args.guidance:g}, seed prompt + empty negative, seed {args.seed}"
        + ("" if args.strength is None else f"; image-to-image, strength {args.strength:g}")
        + ("" if not args.ip_dir else "; IP-Adapter-Plus (CLIP ViT-L/14-336), scale 0.5")
        + (
            "; light: random prompt (and image) embeddings given, no encoder runs, latents out (no VAE decode)"
            if args.light
            else ""
        ),
    ]
    lines = header("peak memory of one generation (load + generate)", args, dtype, notes)
    lines.append(
        f"{'':<17} {'peak RSS':>10} {'after load':>11} {'gen. peak':>10} {'kept':>10} {'load':>8} {'generate':>9}"
    )
    for side, results in runs.items():
        if not results:
            lines.append(
                f"{side:<17} killed in every run, by the OOM killer (more than {format_bytes(TOTAL)})"
            )
            continue
        r = results[-1]
        gen_peak = format_bytes(r["generation_peak"]) if r["generation_peak"] is not None else "n/a"
        lines.append(
            f"{side:<17} {format_bytes(statistics.median(r['peak'] for r in results)):>10} "
            f"{format_bytes(r['after_load']):>11} {gen_peak:>10} "
            f"{format_bytes(r['kept']):>10} {r['load_seconds']:>7.1f}s {r['seconds']:>8.1f}s"
        )
    lines += [f"{side}: killed in {n} of {n + len(runs[side])} runs" for side, n in killed.items() if n]
    if args.ip_dir:
        lines += [
            "",
            "image encoder: RSS around its stage (none with --light), its weights in memory (bytes not meta)",
        ]
        lines.append(
            f"{'':<17} {'RSS before':>10} {'stage peak':>11} {'RSS after':>10} "
            f"{'after load':>11} {'after stage':>12} {'after gen.':>11}"
        )
        for side, results in runs.items():
            r = results[-1] if results else {}

            def b(name, r=r):
                return format_bytes(r[name]) if r.get(name) is not None else "-"

            if "encoder_resident_after_load" in r:
                lines.append(
                    f"{side:<17} {b('encoder_rss_before'):>10} {b('encoder_stage_peak'):>11} "
                    f"{b('encoder_rss_after'):>10} {b('encoder_resident_after_load'):>11} "
                    f"{b('encoder_resident_after'):>12} {b('encoder_resident_after_generation'):>11}"
                )
    first = next(rs[-1] for rs in runs.values() if rs)
    kind, key = ("GPU peak", "gpu_peak") if "gpu_peak" in first else ("peak RSS", "peak")
    peak = {side: statistics.median(r[key] for r in rs) if rs else None for side, rs in runs.items()}
    if key == "gpu_peak":
        lines += [
            "",
            f"{'':<17} {'GPU peak':>10} {'after load':>11} {'gen. peak':>10}   (torch max allocated)",
        ]
        lines += [
            f"{side:<17} {format_bytes(peak[side]):>10} {format_bytes(rs[-1]['gpu_after_load']):>11} "
            f"{format_bytes(rs[-1]['gpu_generation_peak']):>10}"
            for side, rs in runs.items()
            if rs
        ]
    # The goal is on the memory a generation runs out of: the host's on a CPU, the card's on a GPU. A
    # diffusers side that was killed needed more than the machine has, so the machine bounds the ratio.
    if "diffusers" in peak and not peak["diffusers"] and key == "gpu_peak":
        raise SystemExit("diffusers was killed on the host: no GPU peak to compare with")
    diffusers, bound = (peak.get("diffusers"), "") if peak.get("diffusers") else (TOTAL, "< ")
    ratios = {side: peak[side] / diffusers for side in ("kolors-low", "kolors") if peak.get(side)}
    offload = peak.get("diffusers-offload")
    lines.append("")
    if "kolors-low" in ratios:
        lines.append(
            f"{kind}: kolors-low / diffusers {bound}{ratios['kolors-low']:.2f} (goal <= {GOAL}: "
            f"{'met' if ratios['kolors-low'] <= GOAL else 'NOT met'})"
            + (f"; kolors / diffusers: {bound}{ratios['kolors']:.2f}" if "kolors" in ratios else "")
            + (f"; kolors-low / diffusers-offload: {peak['kolors-low'] / offload:.2f}" if offload else "")
        )
    same = None
    if "kolors-low" in images and "kolors" in images:
        same = np.array_equal(images["kolors-low"], images["kolors"])
        lines.append(
            f"low-memory image identical to normal mode: {same} (max abs diff "
            f"{np.abs(images['kolors-low'] - images['kolors']).max():.3g})"
        )
    ours = images.get("kolors", images.get("kolors-low"))
    if ours is not None and "diffusers" in images:
        lines.append(f"kolors vs diffusers max abs diff {np.abs(ours - images['diffusers']).max():.3g}")
    print("\n".join(lines), flush=True)
    what = (
        ("generation" if args.strength is None else "image-to-image")
        + (" + IP-Adapter" if args.ip_dir else "")
        + (", light" if args.light else "")
    )

    def gib(side):
        return f"{peak[side] / GiB:.2f} GiB" if peak.get(side) else "not run"

    low_ratio = f"{bound}{ratios['kolors-low']:.2f} (<= {GOAL})" if "kolors-low" in ratios else "n/a"
    print(
        f"| {kind} {args.size}px {what}, {args.dtype} | "
        + (
            gib("diffusers")
            if peak.get("diffusers") or "diffusers" not in peak
            else f"killed (> {TOTAL / GiB:.1f} GiB)"
        )
        + f" | {gib('kolors')} | {gib('kolors-low')} | {low_ratio}"
        f" | {'n/a' if same is None else 'identical' if same else 'DIFFERENT'} |"
    )


if __name__ == "__main__":
    main()
