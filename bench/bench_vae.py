"""VAE decode: diffusers' AutoencoderKL against kolors' on the same weights.

    python bench/bench_vae.py --model /tmp/kolors-full        # the SDXL VAE, 512x512 (latents 64x64), bf16

One decode of one image, the last stage of a generation. Both sides load the model folder's VAE the way their
pipeline does (fp16 variant files, cast to --dtype). The report ends with the largest difference between the two
sides' outputs and each side's error against a float32 decode, so a speedup that costs accuracy shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/bench_vae.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import add_common_args, alternate, report, setup  # noqa: E402


def load_both(folder: Path, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL as DiffusersVAE

    from kolors.components import load_vae

    variant = "fp16" if any(folder.glob("*.fp16.safetensors")) else None
    ref = DiffusersVAE.from_pretrained(folder, variant=variant, torch_dtype=dtype).to(device).eval()
    ours = load_vae(folder, dtype=dtype, device=device, variant=variant)
    return ref.requires_grad_(False), ours.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    args = parser.parse_args(argv)
    if args.model is None or not (Path(args.model) / "vae" / "config.json").is_file():
        parser.error("--model must be a Kolors-diffusers folder, e.g. from: python bench/fake_weights.py DIR")
    device, dtype = setup(args)
    ref, ours = load_both(Path(args.model) / "vae", dtype, device)
    factor = ours.config.downsample_factor
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, ours.config.latent_channels, args.size // factor, args.size // factor, generator=g)
    z = z.to(device, dtype)
    results = alternate(
        {"diffusers": lambda: ref.decode(z).sample, "kolors": lambda: ours.decode(z)},
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
    )
    expected, actual = (results[s].output.float() for s in ("diffusers", "kolors"))
    notes = [f"max |kolors - diffusers| {(actual - expected).abs().max().item():.4g}"]
    if dtype != torch.float32:  # each side's error against a float32 decode of the same latents
        truth = ref.float().decode(z.float()).sample
        for name, out in (("diffusers", expected), ("kolors", actual)):
            rms = (out - truth).pow(2).mean().sqrt().item()
            notes.append(f"{name} vs float32: rms {rms:.4g}, max {(out - truth).abs().max().item():.4g}")
    shapes = f"latents {tuple(z.shape)} -> image 1x3x{args.size}x{args.size}"
    report("VAE decode", results, dtype=dtype, shapes=shapes, device=device, notes=notes)


if __name__ == "__main__":
    main()
