"""Text encoder: diffusers' KolorsPipeline.encode_prompt against kolors' on the same random ChatGLM3 weights.

Both sides encode the seed prompt and an empty negative, tokenized to 256 as the pipelines do: diffusers in
two calls of 256 rows each (as its encode_prompt does), kolors in one call on 31 packed rows (the pad collapse
of kolors.models.text_encoder.pack_prompts). The two models share one set of weight tensors, so the process holds
the weights once: about 12.5 GB at full size in bf16 (diffusers' unused LM head included), plus a few
hundred MB of activations. Random weights are drawn in place in the target dtype, one tensor at a time.

With --quant int8|int4 it compares kolors' quantized encoder with kolors in the plain dtype instead: speed,
the bytes of both (also counted exactly at the full ChatGLM3 size, on the meta device) and the deviation of
prompt_embeds and pooled. On random weights that deviation is only indicative.

    python bench/bench_text_encoder.py --layers 4              # mid-size: real layer shapes, 4 of 28 layers
    python bench/bench_text_encoder.py                         # full ChatGLM3-6B (needs ~14 GB of free RAM)
    python bench/bench_text_encoder.py --layers 2 --quant int8
    python bench/bench_text_encoder.py --quant int8 --load /tmp/kolors-mid   # a fake_weights.py folder
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as `python bench/bench_text_encoder.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REFERENCE, SEED_PROMPT, alternate, format_bytes, report, rss, speed_row  # noqa: E402

GOAL = 8.0  # issue 3: encode_prompt at least 8x faster than diffusers' at full size, bf16, CPU
INT8_GOAL_BYTES = 6.6e9  # issue 3: int8 ChatGLM3 at most 6.6 GB
LOAD_MODES = ("plain", "load-then-quantize", "quantize-while-loading")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REFERENCE / "text_encoder" / "config.json")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (mid-size runs)")
    p.add_argument("--tokenizer", type=Path, default=REFERENCE / "tokenizer")
    p.add_argument("--quant", choices=["int8", "int4"], default=None, help="kolors quantized vs kolors")
    p.add_argument(
        "--load",
        type=Path,
        default=None,
        metavar="DIR",
        help="with --quant: peak RSS of loading DIR/text_encoder (e.g. from fake_weights.py) plain, loaded then "
        "quantized, and quantized while loading, each in a fresh process",
    )
    p.add_argument("--load-one", choices=LOAD_MODES, default=None, help=argparse.SUPPRESS)  # the worker
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="where both sides run (random weights are drawn there)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def randomize_(model: nn.Module, seed: int) -> None:
    """Weights scaled like a trained network's, drawn in place (on the model's device): norms near one, small
    biases, the rest normal / sqrt(fan_in)."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.normal_(1.0, 0.1, generator=generator)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.02, generator=generator)
        else:
            p.normal_(0.0, 1 / math.sqrt(p.shape[-1]), generator=generator)


def build_reference(config: dict, dtype: torch.dtype, seed: int, device: torch.device) -> nn.Module:
    """diffusers' ChatGLMModel with random weights, built on the meta device: its own skip_init would
    allocate every weight in float32 first (25 GB at full size)."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    with torch.device("meta"):
        model = ChatGLMModel(ChatGLMConfig(**config), device="meta")
    model = model.to(dtype).to_empty(device=device).eval()
    randomize_(model, seed)
    dim = model.rotary_pos_emb.dim
    model.rotary_pos_emb.inv_freq.copy_(1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)))
    return model


def build_ours(config: dict, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """kolors' ChatGLMModel on the given weight tensors (assigned, nothing copied), or on the meta device."""
    from kolors.config import from_dict
    from kolors.models.text_encoder import ChatGLMModel, TextEncoderConfig, checkpoint_keys_transform

    with torch.device("meta"):
        model = ChatGLMModel(from_dict(TextEncoderConfig, config))
    if state is not None:
        model.load_state_dict(checkpoint_keys_transform(state), strict=True, assign=True)
    return model.eval()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    full_config = json.loads(args.config.read_text())
    config = {**full_config, "num_layers": args.layers or full_config["num_layers"]}

    from kolors.models.text_encoder import pack_prompts
    from kolors.models.tokenizer import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer.from_pretrained(args.tokenizer)
    tokens = tokenizer([SEED_PROMPT, ""], max_length=256)
    rows = pack_prompts(tokens.input_ids, tokens.attention_mask, tokens.position_ids).input_ids.shape[1]
    shapes = (
        f"2 prompts x 256 tokens (seed prompt {int(tokens.attention_mask[0].sum())} tokens + empty negative), "
        f"{config['num_layers']} layers, hidden {config['hidden_size']}"
    )
    if args.load_one:
        return load_one(args, dtype)
    if args.load:
        return compare_loads(args)
    if args.quant:
        return compare_quantized(args, config, full_config, dtype, device, tokenizer, shapes)

    from diffusers import KolorsPipeline as DiffusersPipeline
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer as DiffusersTokenizer

    reference = build_reference(config, dtype, args.seed, device)
    ours = build_ours(config, reference.state_dict())
    weights = sum(t.numel() * t.element_size() for t in reference.state_dict().values())
    print(
        f"weights: {format_bytes(weights)} shared by both models; RSS {format_bytes(rss())}", file=sys.stderr
    )

    # diffusers' own encode_prompt, on a pipeline holding only the tokenizer and the text encoder.
    diffusers_pipe = DiffusersPipeline(
        vae=None,
        text_encoder=reference,
        tokenizer=DiffusersTokenizer(str(args.tokenizer / "tokenizer.model")),
        unet=None,
        scheduler=None,
        force_zeros_for_empty_prompt=False,
    )

    def run_diffusers():
        embeds, negative, pooled, negative_pooled = diffusers_pipe.encode_prompt(
            SEED_PROMPT, device, negative_prompt=""
        )
        return torch.cat([embeds, negative]), torch.cat([pooled, negative_pooled])

    def run_kolors():
        # What kolors' KolorsPipeline.encode_prompt does: one batched call, prompts then negatives.
        t = tokenizer([SEED_PROMPT, ""], max_length=256)
        return ours(t.input_ids.to(device), t.attention_mask.to(device), t.position_ids.to(device))

    results = alternate(
        {"diffusers": run_diffusers, "kolors": run_kolors},
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
    )
    (ref_embeds, ref_pooled), (embeds, pooled) = results["diffusers"].output, results["kolors"].output
    layers = config["num_layers"]
    report(
        "text encoder: encode_prompt",
        results,
        dtype=dtype,
        device=device,
        shapes=f"{shapes}; diffusers computes 2 x 256 rows, kolors {rows}",
        goal=GOAL if layers == full_config["num_layers"] else None,
        notes=[
            f"weights      : {format_bytes(weights)} (random, shared by both sides)",
            f"max |diff|   : prompt_embeds {(embeds.float() - ref_embeds.float()).abs().max().item():.3g} "
            f"(largest value {ref_embeds.float().abs().max().item():.3g}), "
            f"pooled {(pooled.float() - ref_pooled.float()).abs().max().item():.3g}",
            "BENCHMARKS.md row: "
            + speed_row(f"text encoder, {layers} layers, {args.dtype}: >= {GOAL:g}x", results, goal=GOAL),
        ],
    )


def compare_quantized(args, config, full_config, dtype, device, tokenizer, shapes) -> None:
    """kolors in `dtype` against kolors with the `--quant` text encoder, on the same random weights."""
    from kolors.models.quant import nbytes, quantize_text_encoder

    plain = build_ours(config)
    plain = plain.to(dtype).to_empty(device=device)
    randomize_(plain, args.seed)
    # The twin shares every tensor with `plain` except the quantized layers, which it replaces by its own.
    start = time.perf_counter()
    quantized = quantize_text_encoder(build_ours(config, plain.state_dict()), args.quant)
    seconds = time.perf_counter() - start
    print(f"quantized in {seconds:.1f} s; RSS {format_bytes(rss())}", file=sys.stderr)

    def encode(model):
        t = tokenizer([SEED_PROMPT, ""], max_length=256)
        return model(t.input_ids.to(device), t.attention_mask.to(device), t.position_ids.to(device))

    results = alternate(
        {args.dtype: lambda: encode(plain), args.quant: lambda: encode(quantized)},
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
    )
    (embeds, pooled), (q_embeds, q_pooled) = results[args.dtype].output, results[args.quant].output
    # Exact byte counts at the real size: the meta device holds shapes and dtypes, no data.
    full = build_ours(full_config).to(dtype)
    full_bytes, full_quant_bytes = nbytes(full), nbytes(quantize_text_encoder(full, args.quant))
    line = (
        f"full size ({full_config['num_layers']} layers): {format_bytes(full_bytes)} in {args.dtype} -> "
        f"{format_bytes(full_quant_bytes)} ({full_quant_bytes / 1e9:.2f} GB) in {args.quant}"
    )
    if args.quant == "int8":
        met = "met" if full_quant_bytes <= INT8_GOAL_BYTES else "NOT met"
        line += f"  (goal <= {INT8_GOAL_BYTES / 1e9:g} GB: {met})"
    deviation = [
        f"{name} cosine {cosine(q, p):.6f}, max |diff| {(q.float() - p.float()).abs().max().item():.3g} "
        f"(largest value {p.float().abs().max().item():.3g})"
        for name, q, p in (("prompt_embeds", q_embeds, embeds), ("pooled", q_pooled, pooled))
    ]
    report(
        f"text encoder: {args.quant} against {args.dtype}",
        results,
        dtype=dtype,
        device=device,
        shapes=shapes,
        baseline=args.dtype,
        notes=[
            f"parameters   : {format_bytes(nbytes(plain))} in {args.dtype}, {format_bytes(nbytes(quantized))} "
            f"in {args.quant} at this size",
            f"             : {line}",
            f"quantizing   : {seconds:.1f} s for {config['num_layers']} layers on this machine "
            f"(~{seconds / config['num_layers'] * full_config['num_layers']:.0f} s for {full_config['num_layers']}, "
            "scaled by layers)",
            f"deviation    : {deviation[0]}",
            f"             : {deviation[1]} (random weights: indicative only)",
        ],
    )


def load_one(args, dtype: torch.dtype) -> None:
    """Worker: load the text encoder once the --load-one way, print its seconds and peak RSS as JSON."""
    from bench.common import peak_rss, reset_peak_rss
    from kolors.components import load_text_encoder
    from kolors.models.quant import nbytes, quantize_text_encoder

    folder = args.load / "text_encoder"
    variant = "fp16" if any(folder.glob("*.fp16*")) else None
    start_rss, _ = rss(), reset_peak_rss()
    start = time.perf_counter()
    quant = args.quant if args.load_one == "quantize-while-loading" else None
    model = load_text_encoder(folder, dtype=dtype, device="cpu", variant=variant, quant=quant)
    if args.load_one == "load-then-quantize":
        quantize_text_encoder(model, args.quant)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(seconds=seconds, peak=peak_rss() - start_rss, model=nbytes(model))))


def compare_loads(args) -> None:
    """Each load in a fresh process (memory freed by one would hide the next one's peak)."""
    import subprocess

    print(f"== text encoder load: {args.quant}, {args.dtype}, {args.load / 'text_encoder'} ==")
    print(f"command      : python {' '.join(sys.argv)}")
    print(f"{'':<24} {'seconds':>8} {'model':>10} {'peak RSS above start':>22}")
    for mode in LOAD_MODES:
        worker = [sys.executable, __file__, "--load", str(args.load), "--load-one", mode]
        worker += ["--quant", args.quant, "--dtype", args.dtype]
        out = json.loads(
            subprocess.run(worker, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
        print(
            f"{mode:<24} {out['seconds']:>7.1f}s {format_bytes(out['model']):>10} {format_bytes(out['peak']):>22}"
        )


if __name__ == "__main__":
    main()
