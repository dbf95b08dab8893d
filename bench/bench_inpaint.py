"""Inpainting's cost: kolors' text-to-image, image-to-image and inpainting (the base 4-channel UNet, and a
9-channel inpainting UNet) against diffusers' StableDiffusionXLInpaintPipeline fed Kolors prompt embeddings.

    python bench/fake_weights.py /tmp/kolors-mid --scale mid --dtype fp32
    python bench/bench_inpaint.py --model /tmp/kolors-mid --threads 1      # 512x512, 8 euler steps, float32

All contenders share one set of weights in one process and run interleaved (bench.common.alternate). The
9-channel UNet is the model's own with its first convolution widened to 9 input channels (random weights for
the 5 new ones): Kolors-Inpainting differs from the base model only there, so this is its per-step cost. The
prompt is encoded once, outside the timing (both sides take the same embeddings), so the numbers are the
denoising loop and the VAE: inpainting adds one VAE encode (two for a 4-channel UNet at strength < 1, as
diffusers: the image and the masked image) and, per step, the wider first convolution or the 4-channel blend.
Wall and CPU time per run are reported; on a shared machine use --threads 1 and read the CPU times.

    python bench/bench_inpaint.py --full-size       # the full Kolors UNet and VAE, what inpainting adds

At full size a denoising step takes minutes on a small CPU, and the one thing a 9-channel UNet adds per step is
5 input channels of its first convolution: that is counted exactly (torch's FLOP counter, on the meta device, for
one guided step at --size), not timed. What inpainting adds once per generation, the VAE encodes of the image
(and of the masked image), is timed on the full-size VAE with random weights, beside a decode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):  # run as `python bench/bench_inpaint.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import MemoryWatch, format_bytes, machine_info  # noqa: E402

PROMPT = "一张瓢虫的照片，微距，变焦，高质量，电影，拿着一个牌子，写着“可图”"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a Kolors-diffusers folder (bench/fake_weights.py)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--full-size", action="store_true", help="count the full UNet's step, time its VAE")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.full_size:
        return full_size(args)
    if not args.model:
        parser.error("--model is required (or --full-size)")

    from kolors import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(args.model, dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    embeds = pipe.encode_prompt(PROMPT, "")
    size = args.size
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    common = dict(prompt_embeds=embeds, num_inference_steps=args.steps, guidance_scale=5.0, output_type="np")

    unet4 = pipe.unet
    conv4 = unet4.conv_in
    conv9 = torch.nn.Conv2d(9, conv4.out_channels, conv4.kernel_size, padding=conv4.padding)
    with torch.no_grad():
        conv9.weight.zero_()
        conv9.weight[:, :4] = conv4.weight
        conv9.bias.copy_(conv4.bias)
    conv9 = conv9.to(memory_format=torch.channels_last)

    def with_unet(channels: int) -> None:
        unet4.conv_in = conv9 if channels == 9 else conv4
        unet4.config = dataclasses.replace(unet4.config, in_channels=channels)

    def run(channels: int, **kwargs):
        def go():
            with_unet(channels)
            try:
                return pipe(**common, seed=1, **kwargs).images
            finally:
                with_unet(4)

        return go

    contenders = {
        "text-to-image": run(4, height=size, width=size),
        "image-to-image": run(4, image=image, strength=0.9999),
        "inpaint 4-ch": run(4, image=image, mask_image=mask, strength=0.9999),
        "inpaint 9-ch": run(9, image=image, mask_image=mask, strength=0.9999),
    }
    if not args.no_diffusers:
        contenders["diffusers inpaint 4-ch"] = diffusers_inpaint(args.model, pipe, image, mask, args.steps)

    results = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(args.repeats + 1):
        for name in names if round_ % 2 == 0 else names[::-1]:
            with MemoryWatch(torch.device("cpu")) as mem:
                wall, cpu = time.perf_counter(), cpu_seconds()
                contenders[name]()
                wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            label = "warm-up" if round_ == 0 else f"run {round_}"
            print(f"  {name:<24} {label:<8} {wall:8.2f} s wall {cpu:8.2f} s cpu", file=sys.stderr, flush=True)
            if round_:
                results[name].append({"wall": wall, "cpu": cpu, "peak": mem.peak})

    print(f"\n{machine_info()}\n{' '.join(sys.argv)}")
    print(
        f"{size}x{size}, {args.steps} euler steps (inpainting and image-to-image at strength 0.9999: "
        f"{int(args.steps * 0.9999)} steps), float32, threads {torch.get_num_threads()}"
    )
    base = np.median([r["cpu"] for r in results["text-to-image"]])
    print(
        f"{'':<24} {'wall median':>12} {'cpu median':>11} {'cpu spread':>16} {'vs t2i (cpu)':>13} {'peak RSS':>10}"
    )
    for name, runs in results.items():
        cpu = [r["cpu"] for r in runs]
        wall = np.median([r["wall"] for r in runs])
        spread = f"{min(cpu):.2f}-{max(cpu):.2f} s"
        peak = format_bytes(max(r["peak"] for r in runs))
        print(
            f"{name:<24} {wall:10.2f} s {np.median(cpu):9.2f} s {spread:>16} {np.median(cpu) / base:12.2f}x {peak:>10}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def full_size(args) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from bench.common import REFERENCE
    from kolors.config import load_config
    from kolors.models.unet import UNet2DConditionModel, UNetConfig
    from kolors.models.vae import AutoencoderKL, VAEConfig

    latent = args.size // 8
    config = load_config(UNetConfig, REFERENCE / "unet" / "config.json")
    flops = {}
    for channels in (4, 9):
        with torch.device("meta"):
            unet = UNet2DConditionModel(dataclasses.replace(config, in_channels=channels))
            x = torch.empty(2, channels, latent, latent)
            states = torch.empty(2, 256, config.encoder_hid_dim)
            pooled, ids = torch.empty(2, config.encoder_hid_dim), torch.empty(2, 6)
            with FlopCounterMode(display=False) as counter:
                unet(x, torch.empty(2), states, pooled, ids)
        flops[channels] = counter.get_total_flops()
    extra = flops[9] - flops[4]
    print(f"\n{machine_info()}\n{' '.join(sys.argv)}")
    print(
        f"full UNet, one guided step at {args.size}x{args.size}: {flops[4] / 1e12:.3f} TFLOP with 4 input "
        f"channels, {flops[9] / 1e12:.3f} with 9 (+{extra / 1e9:.2f} GFLOP, +{100 * extra / flops[4]:.4f}%)"
    )

    vae_config = load_config(VAEConfig, REFERENCE / "vae" / "config.json")
    vae = AutoencoderKL(vae_config).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) / max(p[0].numel(), 1) ** 0.5 if p.dim() > 1 else torch.ones_like(p))
    image = torch.rand(1, 3, args.size, args.size) * 2 - 1
    latents = torch.randn(1, 4, latent, latent)
    times = {"encode": [], "decode": []}
    for round_ in range(args.repeats + 1):
        for name, fn in (("encode", lambda: vae.encode(image)), ("decode", lambda: vae.decode(latents))):
            start, cpu = time.perf_counter(), cpu_seconds()
            fn()
            if round_:
                times[name].append((time.perf_counter() - start, cpu_seconds() - cpu))
    for name, runs in times.items():
        wall, cpu = np.median([r[0] for r in runs]), np.median([r[1] for r in runs])
        print(
            f"full VAE {name} at {args.size}x{args.size}, float32, threads {torch.get_num_threads()}: "
            f"{wall:.2f} s wall, {cpu:.2f} s cpu (median of {len(runs)})"
        )


def diffusers_inpaint(model: str, pipe, image, mask, steps: int):
    """diffusers' SDXL inpaint pipeline on the same UNet and VAE files, fed the same Kolors embeddings."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLInpaintPipeline,
        UNet2DConditionModel,
    )

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32)
    scheduler = EulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    ref = StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=unet, scheduler=scheduler, add_watermarker=False,
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    e = pipe.encode_prompt(PROMPT, "")
    kwargs = dict(
        prompt_embeds=e.prompt_embeds, negative_prompt_embeds=e.negative_prompt_embeds,
        pooled_prompt_embeds=e.pooled, negative_pooled_prompt_embeds=e.negative_pooled,
        image=image, mask_image=mask, height=image.height, width=image.width, strength=0.9999,
        num_inference_steps=steps, guidance_scale=5.0, output_type="np",
    )  # fmt: skip

    def go():
        return ref(**kwargs, generator=torch.Generator().manual_seed(1)).images

    return go


if __name__ == "__main__":
    main()
