"""Write a Kolors-diffusers folder with random weights, for load, memory and speed benchmarks.

    python bench/fake_weights.py OUT_DIR [--scale full|mid|tiny] [--dtype fp16] [--only unet,vae]

The folder has the real configs and tokenizer (from ../shared/kolors-reference), model_index.json, and the
real file names of the fp16 variant: unet/ and vae/diffusion_pytorch_model.fp16.safetensors, and the text
encoder in three shards model.fp16-0000N-of-00003.safetensors with model.safetensors.index.fp16.json.
Keys and shapes are those of diffusers' own models built from the configs (on the meta device, so nothing is
allocated), so diffusers' KolorsPipeline and kolors both load the result.

Files are written tensor by tensor straight into the safetensors format (a JSON header of shapes and offsets,
then the raw bytes, a block of rows at a time), so this command never holds even one whole big tensor. The
five files (three text encoder shards, UNet, VAE) are written at once, one thread each: full size (17.8 GB on
disk in fp16) took 51 s on 2 cores and 31 s on 16, with 0.9-1.6 GB of RAM (one file at a time, UNet and VAE
alone took 26 s on 2 cores). Each tensor comes from its own generator, seeded by its key, so its values
depend neither on the other tensors, nor on the order the threads run in, nor on `--only`: the files are the
same byte for byte.

Values are scaled like a trained network's so activations stay finite in fp16 and bf16: weights are
normal / sqrt(fan_in), norm weights are 1 + small noise, biases small. The images they give are noise, which
is all a benchmark needs; never judge image quality on them.

`--scale mid` shrinks every component (fewer layers and channels, same structure and key names): 0.75 GB,
and a whole 512x512 generation of 25 steps is about 7 TFLOP instead of 90. `--scale tiny` is for tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/fake_weights.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REFERENCE, format_bytes, peak_rss  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
COMPONENTS = ("text_encoder", "unet", "vae")
TEXT_ENCODER_SHARDS = 3  # as in the real repository
CHUNK_ELEMENTS = 32 * 1024**2  # rows of a big tensor are drawn in chunks of about this many values

# Overrides of the reference configs per scale. Head dims stay 64 (UNet) and 128 (ChatGLM3), the text encoder
# keeps the real vocabulary (the tokenizer's ids) and multi-query attention with 2 groups.
SCALES: dict[str, dict[str, dict]] = {
    "full": {"text_encoder": {}, "unet": {}, "vae": {}},
    "mid": {
        "text_encoder": dict(num_layers=8, hidden_size=1024, num_attention_heads=8, ffn_hidden_size=3424),
        "unet": dict(
            block_out_channels=[128, 256, 512],
            attention_head_dim=[2, 4, 8],
            transformer_layers_per_block=[1, 1, 2],
            cross_attention_dim=1024,
            encoder_hid_dim=1024,
            projection_class_embeddings_input_dim=1024 + 6 * 256,
        ),
        "vae": dict(block_out_channels=[64, 128, 256, 256]),
    },
    "tiny": {
        "text_encoder": dict(
            num_layers=2, hidden_size=64, kv_channels=16, num_attention_heads=4, ffn_hidden_size=96
        ),
        "unet": dict(
            sample_size=8,
            block_out_channels=[32, 64, 64],
            attention_head_dim=[1, 2, 4],
            transformer_layers_per_block=[1, 1, 2],
            cross_attention_dim=32,
            encoder_hid_dim=64,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=64 + 6 * 8,
        ),
        "vae": dict(block_out_channels=[32, 32, 64], layers_per_block=1, sample_size=64),
    },
}


# ---------------------------------------------------------------------------------------------------- configs


def scaled_config(reference: Path, component: str, scale: str) -> dict:
    """The reference config of a component with the scale's overrides; other keys keep their exact values."""
    config = json.loads((reference / component / "config.json").read_text(encoding="utf-8"))
    overrides = dict(SCALES[scale][component])
    if component == "vae" and "block_out_channels" in overrides:
        n = len(overrides["block_out_channels"])  # one down and one up block per level
        overrides.setdefault("down_block_types", ["DownEncoderBlock2D"] * n)
        overrides.setdefault("up_block_types", ["UpDecoderBlock2D"] * n)
    config.update(overrides)
    return config


def tensor_shapes(component: str, config: dict) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of diffusers' model for this config (built on the meta device: nothing allocated)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    with torch.device("meta"):
        if component == "unet":
            model = UNet2DConditionModel.from_config(config)
        elif component == "vae":
            model = AutoencoderKL.from_config(config)
        else:
            model = ChatGLMModel(ChatGLMConfig(**config))
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- values


def random_blocks(key: str, shape: tuple[int, ...], seed: int) -> Iterator[torch.Tensor]:
    """The values of one tensor (float32) as consecutive blocks of rows, drawn from a generator seeded by the
    key: normal / sqrt(fan_in) for weights, 1 + small noise for norm weights (the only 1-D weights in these
    models), small biases. Blocks keep a big tensor from ever being whole in memory, in any dtype."""
    g = torch.Generator().manual_seed(seed ^ zlib.crc32(key.encode()))
    if key.endswith("inv_freq"):  # RoPE frequencies are fixed by the architecture, not learned
        dim = 2 * shape[0]
        yield 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    elif len(shape) == 1 and key.endswith("weight"):
        yield 1.0 + 0.02 * torch.randn(shape, generator=g)
    elif len(shape) == 1:
        yield 0.02 * torch.randn(shape, generator=g)
    else:
        row = math.prod(shape[1:])
        rows = max(1, CHUNK_ELEMENTS // row)
        for start in range(0, shape[0], rows):
            block = torch.empty((min(rows, shape[0] - start), *shape[1:]))
            yield block.normal_(0.0, 1.0 / math.sqrt(row), generator=g)


def random_tensor(key: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The whole tensor fake_weights writes for `key` (float32): what a test compares a loaded model to."""
    return torch.cat(list(random_blocks(key, shape, seed)))


# ---------------------------------------------------------------------------------------------------- writing

SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def write_safetensors(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    blocks: Callable[[str], Iterator[torch.Tensor]],
    metadata: dict | None = None,
) -> int:
    """Write a safetensors file one tensor at a time: the header first (it needs only shapes), then each
    tensor's bytes, block by block as `blocks(key)` yields them. Written under a temporary name and renamed,
    so a killed run leaves no file that looks complete. Returns the bytes of tensor data."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for key, shape in shapes.items():
        size = math.prod(shape) * itemsize
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key, shape in shapes.items():
            written = 0
            for block in blocks(key):
                block = block.to(dtype).contiguous()
                f.write(block.view(torch.uint8).numpy())  # the buffer itself: no bytes copy
                written += block.numel()
            if written != math.prod(shape):
                raise RuntimeError(f"{key}: wrote {written} values for shape {shape}")
    os.replace(tmp, path)
    return offset


def split_shards(shapes: dict[str, tuple[int, ...]], n: int) -> list[dict[str, tuple[int, ...]]]:
    """Split tensors, in key order, into n shards of about equal bytes, none empty."""
    sizes = [math.prod(s) for s in shapes.values()]
    total, shards, acc, shard = sum(sizes), [{} for _ in range(n)], 0, 0
    for i, ((key, shape), size) in enumerate(zip(shapes.items(), sizes, strict=True)):
        # Where its first byte falls, but never skipping a shard and leaving a tensor for each later one.
        shard = max(min(acc * n // total, shard + 1), n - (len(shapes) - i))
        shards[shard][key] = shape
        acc += size
    return shards


def write_component(
    out: Path,
    component: str,
    config: dict,
    dtype: torch.dtype,
    variant: str | None,
    seed: int,
    pool: Executor,
) -> tuple[list[Future], Callable[[], None]]:
    """config.json of one component now, its weight files queued on `pool` (futures of the bytes each file
    holds), and what to write once they are done: the text encoder's index, last, so that a killed run leaves
    no index that points to missing shards."""
    folder = out / component
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shapes = tensor_shapes(component, config)

    def blocks(key: str) -> Iterator[torch.Tensor]:
        return random_blocks(key, shapes[key], seed)

    v = f".{variant}" if variant else ""
    if component != "text_encoder":
        path = folder / f"diffusion_pytorch_model{v}.safetensors"
        return [pool.submit(write_safetensors, path, shapes, dtype, blocks)], lambda: None

    # The text encoder is sharded like the real one: model.fp16-0000N-of-00003.safetensors plus an index.
    shards = split_shards(shapes, TEXT_ENCODER_SHARDS)
    names = [f"model{v}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    futures = [
        pool.submit(write_safetensors, folder / name, shard, dtype, blocks)
        for name, shard in zip(names, shards, strict=True)
    ]

    def write_index() -> None:
        total = sum(f.result() for f in futures)
        weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / f"model.safetensors.index{v}.json").write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8"
        )

    return futures, write_index


def write_shared_files(reference: Path, out: Path) -> None:
    """model_index.json, the scheduler config and the tokenizer, copied byte for byte (not their modes: the
    reference folder may be read-only, the copy must stay writable)."""
    files = [Path("model_index.json")]
    files += [p.relative_to(reference) for c in ("scheduler", "tokenizer") for p in (reference / c).iterdir()]
    for file in files:
        (out / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(reference / file, out / file)


def expected_bytes(reference: Path, scale: str, components: list[str], dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(
        math.prod(shape) * itemsize
        for c in components
        for shape in tensor_shapes(c, scaled_config(reference, c, scale)).values()
    )


def make_fake_model(
    out: str | os.PathLike,
    *,
    reference: str | os.PathLike = REFERENCE,
    scale: str = "full",
    dtype: str = "fp16",
    only: list[str] | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> Path:
    """Write the folder (or only some components of it) and return its path."""
    reference, out = Path(reference), Path(out)
    if not (reference / "model_index.json").is_file():
        raise SystemExit(f"error: no Kolors reference folder at {reference}; pass --reference PATH")
    if scale not in SCALES:
        raise SystemExit(f"error: unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    components = list(only or COMPONENTS)
    torch_dtype = DTYPES[dtype]
    variant = "fp16" if torch_dtype == torch.float16 else None  # the real repository's only variant

    need = expected_bytes(reference, scale, components, torch_dtype)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if need > free:
        raise SystemExit(
            f"error: {out} has {format_bytes(free)} free but the weights need {format_bytes(need)}"
        )
    write_shared_files(reference, out)
    # Each file is drawn and written by its own thread (torch's generators and file writes release the GIL):
    # a drawing generator runs on one core, so five files on five cores take the time of the largest.
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        jobs = {
            c: write_component(out, c, scaled_config(reference, c, scale), torch_dtype, variant, seed, pool)
            for c in components
        }
        for component, (futures, finish) in jobs.items():
            size = sum(f.result() for f in futures)
            finish()
            if verbose:
                print(
                    f"{component:<13} {format_bytes(size):>10} done at {time.perf_counter() - start:6.1f} s "
                    f"(peak RSS so far {format_bytes(peak_rss())})",
                    flush=True,
                )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "out", help="the folder to write (created; files of the chosen components overwritten)"
    )
    parser.add_argument(
        "--reference", default=str(REFERENCE), help="folder with the real configs and tokenizer"
    )
    parser.add_argument("--scale", default="full", choices=list(SCALES))
    parser.add_argument(
        "--dtype", default="fp16", choices=list(DTYPES), help="fp16 writes the .fp16 variant names"
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated components to write ({','.join(COMPONENTS)}); the others are left as they are",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    only = None
    if args.only:
        only = [c.strip() for c in args.only.split(",") if c.strip()]
        unknown = sorted(set(only) - set(COMPONENTS))
        if unknown:
            parser.error(f"unknown component(s) {', '.join(unknown)}; use {', '.join(COMPONENTS)}")
    start = time.perf_counter()
    out = make_fake_model(
        args.out,
        reference=args.reference,
        scale=args.scale,
        dtype=args.dtype,
        only=only,
        seed=args.seed,
        verbose=True,
    )
    print(
        f"wrote {out} ({args.scale}, {args.dtype}) in {time.perf_counter() - start:.1f} s, "
        f"peak RSS {format_bytes(peak_rss())}"
    )


if __name__ == "__main__":
    main()
