"""Control image preprocessors: a photo in, the map a ControlNet was trained on out (edges, depth, pose).

`canny` is OpenCV's Canny edge detector with the thresholds of Kolors' official sample (100, 200), as a
3-channel image. `depth` (MiDaS DPT-Hybrid, what Kolors-ControlNet-Depth was trained with), `openpose` and `dwpose`
run controlnet_aux's annotators. All of these are the optional extra `kolors[control]`, imported only when a
preprocessor runs. Annotator weights come from a local folder (`annotators=`, or the KOLORS_ANNOTATORS
environment variable) or the huggingface_hub cache of lllyasviel/Annotators; when the hub cannot be reached and
the cache lacks them, the error says which files to put where. `none` passes a control image made elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from kolors.errors import KolorsError

ANNOTATORS_REPO = "lllyasviel/Annotators"
EXTRA = "pip install 'kolors[control]'"
# Each annotator's files in the annotators folder or repo.
ANNOTATOR_FILES = {
    "depth": ("dpt_hybrid-midas-501f0c75.pt",),
    "openpose": ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
    "dwpose": ("yolox_l.onnx", "dw-ll_ucoco_384.onnx"),
}
# The options each preprocessor takes, with their defaults.
OPTIONS: dict[str, dict[str, object]] = {
    "none": {},
    "canny": {"low_threshold": 100, "high_threshold": 200},
    "depth": {"resolution": 512},
    "openpose": {"resolution": 512, "hand_and_face": True},
    "dwpose": {"resolution": 512},
}
PREPROCESSORS = tuple(OPTIONS)

_detectors: dict[tuple[str, str], Callable] = {}  # loaded annotators, by (name, weights source)


def preprocess(
    name: str, image: Image.Image, *, annotators: str | os.PathLike | None = None, **options
) -> Image.Image:
    """The control image `name` ("canny", "depth", "openpose", "dwpose" or "none") makes of `image`, as an
    RGB image of the same size. Options: canny's `low_threshold`, `high_threshold`; the annotators'
    `resolution` (the side they detect at); openpose's `hand_and_face`."""
    if name not in OPTIONS:
        raise KolorsError(f"unknown preprocessor {name!r}; choose one of: {', '.join(PREPROCESSORS)}")
    unknown = set(options) - set(OPTIONS[name])
    if unknown:
        takes = ", ".join(OPTIONS[name]) or "no options"
        raise KolorsError(f"preprocessor {name} does not take {', '.join(sorted(unknown))}; it takes {takes}")
    if not isinstance(image, Image.Image):
        raise KolorsError(f"preprocess takes a PIL image, not {type(image).__name__}")
    opts = {**OPTIONS[name], **options}
    image = image.convert("RGB")
    if name == "none":
        return image
    if name == "canny":
        return _canny(image, opts["low_threshold"], opts["high_threshold"])
    detector = _detector(name, annotators)
    resolution = _whole(opts["resolution"], "resolution", 64)
    kwargs = dict(detect_resolution=resolution, image_resolution=max(image.size))
    if name == "openpose":
        kwargs["hand_and_face"] = bool(opts["hand_and_face"])
    out = detector(image, **kwargs)
    out = out if isinstance(out, Image.Image) else Image.fromarray(np.asarray(out, dtype=np.uint8))
    return (
        out.convert("RGB").resize(image.size, Image.BILINEAR)
        if out.size != image.size
        else out.convert("RGB")
    )


def _canny(image: Image.Image, low, high) -> Image.Image:
    low, high = _whole(low, "low_threshold", 0), _whole(high, "high_threshold", 0)
    cv2 = _import("cv2", "canny")
    edges = cv2.Canny(np.asarray(image), low, high)  # (H, W) uint8, 0 or 255
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def _whole(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < low:
        raise KolorsError(f"preprocessor option {name} must be a whole number >= {low}, not {value!r}")
    return int(value)


def _import(module: str, name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise KolorsError(f"the {name} preprocessor needs the control extra: {EXTRA}") from None


def _detector(name: str, annotators: str | os.PathLike | None) -> Callable:
    source = str(annotators or os.environ.get("KOLORS_ANNOTATORS") or ANNOTATORS_REPO)
    key = (name, source)
    if key in _detectors:
        return _detectors[key]
    aux = _import("controlnet_aux", name)
    local = Path(source).expanduser()
    if source != ANNOTATORS_REPO and not local.is_dir():
        raise KolorsError(f"annotators folder not found: {source}; pass a folder with {_files(name)}")
    if local.is_dir():
        missing = [f for f in ANNOTATOR_FILES[name] if not (local / f).is_file()]
        if missing:
            raise KolorsError(
                f"annotators folder {local} lacks {', '.join(missing)} for the {name} preprocessor"
            )
    try:
        if name == "depth":
            detector = aux.MidasDetector.from_pretrained(source)
        elif name == "openpose":
            detector = aux.OpenposeDetector.from_pretrained(source)
        else:
            detector = aux.DWposeDetector(
                det_ckpt=str(local / ANNOTATOR_FILES[name][0]) if local.is_dir() else None,
                pose_ckpt=str(local / ANNOTATOR_FILES[name][1]) if local.is_dir() else None,
            )
    except (
        OSError,
        ValueError,
        RuntimeError,
    ) as e:  # huggingface_hub's offline and not-found errors are OSErrors
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KolorsError(
            f"cannot load the {name} annotator ({first[:200]}); without the hub, put {_files(name)} in a folder "
            "and pass annotators=FOLDER (or set KOLORS_ANNOTATORS), or download "
            f"{ANNOTATORS_REPO} into the hub cache once online"
        ) from None
    _detectors[key] = detector
    return detector


def _files(name: str) -> str:
    return ", ".join(ANNOTATOR_FILES[name])
