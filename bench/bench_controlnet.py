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
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/bench_controlnet.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_unet import SCALES, build_models, make_inputs, pad_counts, unet_config  # noqa: E402
from bench.common import REFERENCE, SEED_PROMPT, add_common_args, alternate, setup  # noqa: E402

GOAL = 1.15  # issue 17: kolors' step with a ControlNet at least 1.15x faster than diffusers'


def build_controlnet(ref_unet, dtype: torch.dtype):
    """diffusers' ControlNet copied from the UNet (zero convolutions given small random weights) and kolors'
    ControlNetModel holding the same tensors."""
    from diffusers import ControlNetModel as DiffusersControlNet

    from kolors.config import from_dict
    from kolors.models.controlnet import ControlNetConfig, ControlNetModel
    from kolors.weights import build_on_meta

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, repeats=3)
    parser.add_argument("--config", default=str(REFERENCE / "unet" / "config.json"), help="UNet config.json")
    parser.add_argument("--scale", default="full", choices=list(SCALES))
    parser.add_argument("--channels", default=None, help="block_out_channels, e.g. 320,640,640")
    parser.add_argument("--depth", default=None, help="transformer_layers_per_block, e.g. 1,1,2")
    parser.add_argument("--latent", type=int, default=64, help="latent height and width (64: 512x512 pixels)")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args(argv)
    device, dtype = setup(args)

    config = unet_config(args)
    ref_unet, unet, cfg = build_models(config, dtype, device)
    ref_cn, cn = build_controlnet(ref_unet, dtype)
    inputs = make_inputs(
        cfg, 2, args.latent, args.tokens, pad_counts([SEED_PROMPT, ""], args.tokens), dtype, device
    )
    g = torch.Generator().manual_seed(3)
    # The control image at the output size: 8 pixels per latent, which the ControlNet's image encoder undoes.
    cond = torch.rand(2, 3, args.latent * 8, args.latent * 8, generator=g).to(device, dtype)
    x, t, states = inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]
    pooled, ids = inputs["text_embeds"], inputs["time_ids"]

    start = time.perf_counter()
    context, cn_context = unet.prepare_context(states), cn.prepare_context(states)
    hint = cn.prepare_hint(cond)  # the control image's embedding, once per generation as in the pipeline
    prepare_s = time.perf_counter() - start

    def bare():
        return unet(x, t, context, pooled, ids)

    def kolors_cn():
        down, mid = cn(x, t, cn_context, pooled, ids, hint, 0.7)
        return unet(x, t, context, pooled, ids, down, mid)

    def diffusers_cn():
        added = dict(text_embeds=pooled, time_ids=ids)
        down, mid = ref_cn(
            x, t, ref_cn.encoder_hid_proj(states), cond, 0.7, added_cond_kwargs=added, return_dict=False
        )
        return ref_unet(
            x, t, encoder_hidden_states=states, added_cond_kwargs=added,
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        ).sample  # fmt: skip

    cpu: dict[str, list[float]] = {"bare": [], "kolors+cn": [], "diffusers+cn": []}

    def with_cpu(name, fn):
        def run():
            s = time.process_time()
            out = fn()
            cpu[name].append(time.process_time() - s)
            return out

        return run

    fns = {"bare": bare, "kolors+cn": kolors_cn, "diffusers+cn": diffusers_cn}
    results = alternate(
        {k: with_cpu(k, f) for k, f in fns.items()}, warmup=args.warmup, repeats=args.repeats, device=device
    )
    diff = (results["kolors+cn"].output.float() - results["diffusers+cn"].output.float()).abs().max().item()
    med = {k: r.median for k, r in results.items()}
    cpu_med = {k: sorted(v[args.warmup :])[len(v[args.warmup :]) // 2] for k, v in cpu.items()}
    print(f"command: python bench/bench_controlnet.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        f"dtype {args.dtype}, latent {args.latent}, threads {torch.get_num_threads()}, prepare_context {prepare_s:.3f} s"
    )
    for k in fns:
        print(f"  {k:<13} median {med[k]:.3f} s   CPU {cpu_med[k]:.3f} s")
    ratio = med["diffusers+cn"] / med["kolors+cn"]
    cpu_ratio = cpu_med["diffusers+cn"] / cpu_med["kolors+cn"]
    print(f"diffusers+cn / kolors+cn: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU (goal >= {GOAL}x)")
    print(f"kolors+cn / bare: {med['kolors+cn'] / med['bare']:.2f}x; max |diff| of the two steps {diff:.2e}")


if __name__ == "__main__":
    main()
