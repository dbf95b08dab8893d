"""Inpainting masks and canvases: plain image work, no model.

Convention, as diffusers': a mask is a grayscale image, white = repaint, black = keep, binarised at 50% for the
sampler. The pieces diffusers' inpaint pipelines take from their VaeImageProcessor (the crop region around a
mask, the "fill" and "crop" resizes, the overlay of the original) are rewritten here with the same PIL calls, so
`padding_mask_crop` gives diffusers' pixels; the rest (blur, grow, invert, A1111's "fill" content, outpainting
canvases) are the helpers A1111 and ComfyUI users expect.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from kolors.errors import KolorsError

# A1111's "Masked content" choices, in its API's order (inpainting_fill 0..3).
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")


def as_mask(mask: Image.Image | np.ndarray) -> Image.Image:
    """A mask given as a numpy array (HW or HWC, in [0, 1] or [0, 255]) as an 8-bit grayscale image. (The server
    reads an uploaded mask's alpha itself: kolors.serve.schemas.decode_mask.)"""
    if isinstance(mask, np.ndarray):
        array = mask.astype(np.float32)
        array = array[..., 0] if array.ndim == 3 else array
        if array.ndim != 2:
            raise KolorsError(f"a numpy mask must be HW or HWC, not shape {mask.shape}")
        array = array * 255.0 if array.max() <= 1.0 else array
        return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), "L")
    if not isinstance(mask, Image.Image):
        raise KolorsError(f"mask must be a PIL image, a path or a numpy array, not {type(mask).__name__}")
    return mask.convert("L")


def check_mask(mask: Image.Image) -> None:
    """Refuse a mask that says nothing clear: every pixel a mid grey (binarised at 50%, it would flip between
    repainting all and nothing on one grey level)."""
    low, high = mask.getextrema()
    if low >= 64 and high <= 191:
        raise KolorsError(
            f"the mask is all mid grey (levels {low}..{high}); masks are binarised at 50% (128 and above "
            "repaint, below keep): paint the area to repaint white and the rest black"
        )


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """A Gaussian blur of `radius` pixels (diffusers' `mask_processor.blur`; A1111's mask blur): soft edges for
    pasting back. The sampler binarises it again, so it moves the repainted area only at corners."""
    return mask if radius <= 0 else mask.filter(ImageFilter.GaussianBlur(radius))


def invert_mask(mask: Image.Image) -> Image.Image:
    """Repaint what was kept and keep what was repainted (A1111's "Inpaint not masked")."""
    return ImageOps.invert(mask.convert("L"))


def grow_mask(mask: Image.Image, pixels: int) -> Image.Image:
    """The mask grown by `pixels` (shrunk when negative): repeated 3x3 max (min) filters, linear in `pixels`
    where one wide filter would be quadratic."""
    grow = ImageFilter.MaxFilter(3) if pixels > 0 else ImageFilter.MinFilter(3)
    for _ in range(abs(int(pixels))):
        mask = mask.filter(grow)
    return mask


def crop_region(mask: Image.Image, width: int, height: int, pad: int = 0) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the box around the mask's non-black pixels, padded by `pad` and widened to the aspect of
    width x height, within the mask (diffusers' `VaeImageProcessor.get_crop_region`, for the same pixels)."""
    array = np.asarray(mask.convert("L"))
    h, w = array.shape
    cols, rows = np.flatnonzero(array.any(axis=0)), np.flatnonzero(array.any(axis=1))
    # An all-black mask: diffusers' scan runs off both ends, giving an empty box that the widening then fixes.
    left, right = (cols[0], w - 1 - cols[-1]) if cols.size else (w, w)
    top, bottom = (rows[0], h - 1 - rows[-1]) if rows.size else (h, h)
    x1, y1 = int(max(left - pad, 0)), int(max(top - pad, 0))
    x2, y2 = int(min(w - right + pad, w)), int(min(h - bottom + pad, h))
    if x2 <= x1 or y2 <= y1:
        raise KolorsError("the mask is all black: nothing to inpaint around; paint the area to repaint white")
    if (x2 - x1) / (y2 - y1) > width / height:
        grow = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = _widen(y1 - grow // 2, y2 + grow - grow // 2, h)
    else:
        grow = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = _widen(x1 - grow // 2, x2 + grow - grow // 2, w)
    return x1, y1, x2, y2


def _widen(lo: int, hi: int, size: int) -> tuple[int, int]:
    """An interval slid back inside [0, size] (and cut to it when wider), as diffusers does."""
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit the image inside width x height keeping its aspect, centred, and stretch its edge rows or columns
    into the bands left over (diffusers' resize_mode="fill")."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        band = height // 2 - src_h // 2
        if band > 0:
            out.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(
                resized.resize((width, band), box=(0, resized.height, width, resized.height)),
                box=(0, band + src_h),
            )
    elif ratio > src_ratio:
        band = width // 2 - src_w // 2
        if band > 0:
            out.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(
                resized.resize((band, height), box=(resized.width, 0, resized.width, height)),
                box=(band + src_w, 0),
            )
    return out


def resize_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Cover width x height keeping the aspect, centred, the excess cut (diffusers' resize_mode="crop")."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def paste_back(
    mask: Image.Image,
    original: Image.Image,
    image: Image.Image,
    crop: tuple[int, int, int, int] | None = None,
) -> Image.Image:
    """`image` with the original composited over it outside the (soft) mask; with `crop`, `image` is the
    inpainted crop, placed back into the original's frame first (diffusers' `apply_overlay`, same PIL calls)."""
    width, height = original.size
    kept = Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    kept = kept.convert("RGBA")
    if crop is not None:
        x1, y1, x2, y2 = crop
        frame = Image.new("RGBA", (width, height))
        frame.paste(resize_crop(image, x2 - x1, y2 - y1), (x1, y1))
        image = frame.convert("RGB")
    image = image.convert("RGBA")
    image.alpha_composite(kept)
    return image.convert("RGB")


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked area painted with ever finer blurs of what surrounds it (A1111's "fill" masked content): a
    neutral start for the sampler, without the old content's shapes."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def outpaint_canvas(
    image: Image.Image,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    *,
    overlap: int = 8,
    multiple: int = 8,
) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask) to extend `image` past its borders: the canvas is the image padded by the given pixels (the
    new border pre-filled from the image's edges, so a 4-channel model starts from matching colours), and the mask
    is white over the new border and `overlap` pixels into the image, feathered, so the seam is repainted too.
    Each side grows by at least what is asked, so that the canvas is a multiple of `multiple` pixels."""
    pads = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in pads.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise KolorsError(f"outpaint {name} must be a whole number of pixels >= 0, not {value!r}")
    if not any(pads.values()):
        raise KolorsError("outpaint needs at least one side to grow (left, right, top or bottom > 0)")
    image = image.convert("RGB")
    # Rounded up to the multiple on a side that grows (the image's own size is the pipeline's to round).
    extra_w = -(image.width + left + right) % multiple if left or right else 0
    extra_h = -(image.height + top + bottom) % multiple if top or bottom else 0
    left, right = (left, right + extra_w) if right else (left + extra_w, right)
    top, bottom = (top, bottom + extra_h) if bottom else (top + extra_h, bottom)
    width, height = image.width + left + right, image.height + top + bottom
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image, (left, top))
    mask = Image.new("L", (width, height), 255)
    inner = (
        left + (overlap if left else 0),
        top + (overlap if top else 0),
        left + image.width - (overlap if right else 0),
        top + image.height - (overlap if bottom else 0),
    )
    if inner[2] > inner[0] and inner[3] > inner[1]:
        mask.paste(0, inner)
    canvas = fill_masked(
        canvas, _box_mask((width, height), (left, top, left + image.width, top + image.height))
    )
    canvas.paste(image, (left, top))
    return canvas, blur_mask(mask, overlap / 2)


def _box_mask(size: tuple[int, int], keep: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 255)
    mask.paste(0, keep)
    return mask


def check_options(padding_mask_crop, mask_blur, masked_content) -> None:
    check_padding(padding_mask_crop)
    check_blur(mask_blur)
    check_content(masked_content)


def check_padding(value, name: str = "padding_mask_crop") -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise KolorsError(f"{name} must be a whole number of pixels >= 0, not {value!r}")


def check_blur(value, name: str = "mask_blur") -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 256:
        raise KolorsError(f"{name} must be a number of pixels from 0 to 256, not {value!r}")


def check_content(value, name: str = "masked_content") -> None:
    if value not in MASKED_CONTENT:
        raise KolorsError(f"unknown {name} {value!r}; choose one of: {', '.join(MASKED_CONTENT)}")
