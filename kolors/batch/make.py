"""Making a batch's images: images that share their settings go through one pipeline call, their prompts encoded
once each (KolorsPipeline.encode_texts), each PNG written and then reported as its manifest row."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kolors.batch.jobs import ImageSpec
from kolors.pipeline import KolorsPipeline, control_call, image_prompt_call, inpainting, lora_hashes
from kolors.request import save_png


def batches(specs: list[ImageSpec], batch_size: int) -> Iterator[list[ImageSpec]]:
    """Up to `batch_size` images that can share one pipeline call (same size, steps, guidance and sampler),
    in job order within each group of settings."""
    groups: dict[tuple, list[ImageSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.settings, []).append(spec)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


def make_images(pipe: KolorsPipeline, chunk: list[ImageSpec], output_dir: Path) -> Iterator[dict]:
    """Generate `chunk` and write each PNG; yields each image's manifest row once its file is in place."""
    images = chunk[0].images()  # the group's image and mask, read once
    for spec, image in zip(chunk, generate(pipe, chunk, images=images), strict=True):
        # With its image and mask, the request's parameters record its strength and inpaint settings.
        request = lora_hashes(pipe, spec.loaded(images))
        save_png(image, output_dir / spec.file, request.infotext(request.seed, pipe.label, size=image.size))
        yield spec.row(pipe.label)


def generate(
    pipe: KolorsPipeline, chunk: list[ImageSpec], output_type: str = "pil", images: dict | None = None
):
    """The images of `chunk` (one group of settings) from one pipeline call, one seed per image; `images`: the
    group's image and mask when already read."""
    first = chunk[0].request
    cfg = first.guidance > 1.0
    requests = [s.request for s in chunk]
    start = chunk[0].loaded(images) if chunk[0].files else None  # one image and mask for the whole group
    image_prompt = image_prompt_call(pipe, first)  # one reference and face per group (batches groups by them)
    if first.loras or pipe.get_active_adapters():
        pipe.set_loras(first.loras)  # one LoRA set per group (batches groups by it)
    embeds = pipe.encode_texts(
        [r.prompt for r in requests], [r.negative_prompt for r in requests] if cfg else None
    )
    out = pipe(
        prompt_embeds=embeds,
        height=None if start else first.height,
        width=None if start else first.width,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance,
        sampler=first.sampler,
        schedule=first.schedule,
        seed=[r.seed for r in requests],
        output_type=output_type,
        **(dict(image=start.image, strength=start.strength, **inpainting(start)) if start else {}),
        **control_call(pipe, first),  # one ControlNet and control image per group (batches groups by them)
        **image_prompt,
    )
    return out.images
