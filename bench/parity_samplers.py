"""Each sampler's image parity with diffusers on the tiny random weights of tests/reference.py (float32, CPU):
max |diff| of the np images, text-to-image (guided, two images with a generator each) and image-to-image
(strength 0.6). The tests assert <= 1e-3 on fewer steps; this prints the numbers for BENCHMARKS.md.

    python bench/parity_samplers.py
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kolors import KolorsPipeline, samplers  # noqa: E402
from tests.reference import build_reference_pipeline, save_reference_pipeline  # noqa: E402
from tests.test_pipeline import gen, init_image  # noqa: E402
from tests.test_pipeline_samplers import diffusers_pipe, scheduler  # noqa: E402


def main() -> None:
    warnings.filterwarnings("ignore", message="lcm is meant")
    ref = build_reference_pipeline(0)
    root = save_reference_pipeline(ref, Path(tempfile.mkdtemp()) / "Kolors-tiny")
    pipe = KolorsPipeline.from_pretrained(root, dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    print("| sampler | steps | text-to-image | image-to-image |\n| --- | ---: | ---: | ---: |")
    for name in samplers.SAMPLERS:
        steps = 8 if name == "heun" else 10
        t2i = dict(
            prompt="一张瓢虫的照片", height=64, width=64, guidance_scale=5.0, num_inference_steps=steps
        )
        t2i.update(num_images_per_prompt=2, output_type="np")
        theirs = diffusers_pipe(ref, scheduler(ref, name))(**t2i, generator=[gen(7), gen(8)]).images
        ours = pipe(**t2i, sampler=name, generator=[gen(7), gen(8)]).images
        i2i = dict(prompt="a watercolor painting", image=init_image(64, 96), strength=0.6, output_type="np")
        i2i.update(num_inference_steps=steps)
        theirs2 = diffusers_pipe(ref, scheduler(ref, name), img2img=True)(**i2i, generator=gen(3)).images
        ours2 = pipe(**i2i, sampler=name, generator=gen(3)).images
        d1, d2 = np.abs(ours - theirs).max(), np.abs(ours2 - theirs2).max()
        print(f"| {name} | {steps} | {d1:.2e} | {d2:.2e} |", flush=True)


if __name__ == "__main__":
    main()
