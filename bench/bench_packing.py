"""Packed against plain weights, one layer at a time, at the full UNet's shapes: why the pack pass packs what it does.

    python bench/bench_packing.py --dtype float32 --threads 1     # seconds on 2 cores

kolors.models.layers packs weights into oneDNN's blocked layout once (`pack_weights`). This times, at 512x512
with classifier-free guidance (batch 2), each linear of a transformer block at the two levels that have them
(F.linear against oneDNN's `_linear_pointwise` on the packed weight) and the 3x3 convolutions of each level
(F.conv2d against `_convolution_pointwise` on a weight packed for the layers' packing hint, PACK_PIXELS_HINT, and
on one packed for the input's own size). The two sides of each row alternate; medians of CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as `python bench/bench_packing.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import add_common_args, setup  # noqa: E402
from kolors.models.layers import PACK_PIXELS_HINT, PACK_ROWS_HINT  # noqa: E402

mkldnn = torch.ops.mkldnn

# (rows, in, out, bias): to_q/k/v and to_out at 1280 and 640 channels (16x16 and 32x32 pixels, batch 2),
# GEGLU's projection (both halves) and the feed-forward's output.
LINEARS = [
    (512, 1280, 1280, False),
    (512, 1280, 10240, True),
    (512, 5120, 1280, True),
    (2048, 640, 640, False),
    (2048, 640, 5120, True),
    (2048, 2560, 640, True),
]
CONVS = [(320, 64), (640, 32), (1280, 16)]  # (channels, pixels): a resnet's 3x3 convolution at each level


def cpu_median(fns: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up: oneDNN builds its kernel for the shape on first use
    for i in range(repeats):
        for name in list(fns) if i % 2 == 0 else list(fns)[::-1]:
            start = time.process_time()
            fns[name]()
            times[name].append(time.process_time() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def linear_row(rows: int, n_in: int, n_out: int, bias: bool, dtype, g, repeats: int) -> str:
    x = torch.randn(rows, n_in, generator=g).to(dtype)
    w = (torch.randn(n_out, n_in, generator=g) * n_in**-0.5).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    packed = mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT)
    t = cpu_median(
        {
            "plain": lambda: F.linear(x, w, b),
            "packed": lambda: mkldnn._linear_pointwise(x, packed, b, "none", [], ""),
        },
        repeats,
    )
    label = f"{rows} x {n_in} x {n_out}"
    return (
        f"{label:<28} {t['plain'] * 1e3:7.1f}ms {t['packed'] * 1e3:7.1f}ms {t['packed'] / t['plain']:12.2f}x"
    )


def conv_row(channels: int, pixels: int, dtype, g, repeats: int) -> str:
    x = torch.randn(2, channels, pixels, pixels, generator=g).to(dtype)
    w = (torch.randn(channels, channels, 3, 3, generator=g) * (9 * channels) ** -0.5).to(dtype)
    b = torch.randn(channels, generator=g).to(dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    hint, own = (
        mkldnn._reorder_convolution_weight(w, *geometry, [2, channels, size, size])
        for size in (PACK_PIXELS_HINT, pixels)
    )
    t = cpu_median(
        {
            "plain": lambda: F.conv2d(x, w, b, padding=1),
            "hint": lambda: mkldnn._convolution_pointwise(x_cl, hint, b, *geometry, "none", [], ""),
            "own": lambda: mkldnn._convolution_pointwise(x_cl, own, b, *geometry, "none", [], ""),
        },
        repeats,
    )
    label = f"{channels} ch, {pixels}x{pixels}"
    return f"{label:<28} {t['plain'] * 1e3:7.1f}ms {t['hint'] * 1e3:7.1f}ms {t['own'] * 1e3:7.1f}ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, repeats=8)
    args = parser.parse_args(argv)
    _, dtype = setup(args)
    g = torch.Generator().manual_seed(0)
    print(f"command: python bench/bench_packing.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"dtype {args.dtype}, threads {torch.get_num_threads()}, CPU-time medians of {args.repeats}")
    print(f"{'linear (rows x in x out)':<28} {'F.linear':>9} {'packed':>9} {'packed/plain':>13}")
    for shape in LINEARS:
        print(linear_row(*shape, dtype, g, args.repeats), flush=True)
    print(
        f"{'conv 3x3 (channels, pixels)':<28} {'F.conv2d':>9} {'hint':>9} {'own size':>9}  (hint: {PACK_PIXELS_HINT} px)"
    )
    for channels, pixels in CONVS:
        print(conv_row(channels, pixels, dtype, g, args.repeats), flush=True)


if __name__ == "__main__":
    main()
