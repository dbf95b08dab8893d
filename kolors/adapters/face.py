"""FaceID-Plus' face preprocessing, as the official sample does it: insightface's antelopev2 finds the faces, the
largest is kept, its unnormalised 512-d embedding is the id and its box, made square, is cropped for CLIP.

insightface and onnxruntime are the optional `faceid` extra, imported only when a face has to be found; a
precomputed embedding (`face_embeds=`) needs neither. The models are never downloaded at run time: the user points
`face_models` at the antelopev2 files (insightface's models are for non-commercial research use only).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from kolors.errors import KolorsError

FACE_MODEL_NAME = "antelopev2"
FACE_DET_SIZE = (640, 640)
EMBEDDING_DIM = 512
INSTALL = "pip install 'kolors[faceid]' (insightface and onnxruntime)"


def check_face_models(folder: str | os.PathLike) -> Path:
    """The antelopev2 folder (its .onnx files), given as that folder or as a root holding models/antelopev2."""
    path = Path(folder).expanduser()
    for candidate in (path, path / "models" / FACE_MODEL_NAME, path / FACE_MODEL_NAME):
        if candidate.is_dir() and any(candidate.glob("*.onnx")):
            return candidate
    raise KolorsError(
        f"no antelopev2 face models (.onnx files) in {path}; download insightface's antelopev2 and pass its "
        "folder as face_models (--face-models DIR)"
    )


def check_face_embeds(embeds) -> np.ndarray:
    """A 512-d face id embedding as float32 numpy, or one clear error."""
    try:
        array = np.asarray(embeds, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise KolorsError("face_embeds must be 512 numbers (insightface's embedding)") from None
    if array.shape != (EMBEDDING_DIM,) or not np.isfinite(array).all():
        raise KolorsError(
            f"face_embeds must be {EMBEDDING_DIM} finite numbers (insightface's embedding), not shape {array.shape}"
        )
    return array


_analysers: dict[Path, object] = {}


def _analyser(models: Path):
    if models not in _analysers:
        try:
            from insightface.app import FaceAnalysis
        except ImportError:
            raise KolorsError(
                f"finding a face needs insightface: {INSTALL}; or pass face_embeds= with the face crop"
            ) from None
        # FaceAnalysis reads root/models/<name>; this layout is what check_face_models found
        app = FaceAnalysis(
            name=models.name, root=str(models.parent.parent), providers=["CPUExecutionProvider"]
        )
        app.prepare(ctx_id=0, det_size=FACE_DET_SIZE)
        _analysers[models] = app
    return _analysers[models]


def square_box(box) -> tuple[float, float, float, float]:
    """The square around a (left, top, right, bottom) box's centre, its side the box's longer one (official)."""
    left, top, right, bottom = (float(v) for v in box)
    cx, cy, r = (left + right) / 2, (top + bottom) / 2, max(right - left, bottom - top) / 2
    return cx - r, cy - r, cx + r, cy + r


def face_embedding_and_crop(image: Image.Image, models: Path | None) -> tuple[np.ndarray, Image.Image]:
    """The largest face's unnormalised embedding (512,) and its square crop of `image`."""
    if models is None:
        raise KolorsError(
            "finding the face needs insightface's antelopev2 models: pass face_models= (--face-models DIR), or "
            "face_embeds= with the face crop"
        )
    rgb = np.asarray(image.convert("RGB"))
    faces = _analyser(models).get(np.ascontiguousarray(rgb[:, :, ::-1]))  # insightface reads BGR, as OpenCV
    if len(faces) == 0:
        raise KolorsError("no face found in the face image; pass a photo where one face is clearly visible")

    def area(face) -> float:
        left, top, right, bottom = face["bbox"]
        return (right - left) * (bottom - top)

    face = max(faces, key=area)
    if len(faces) > 1:
        box = ", ".join(f"{v:.0f}" for v in face["bbox"])
        warnings.warn(
            f"{len(faces)} faces found in the face image; using the largest, at ({box}) (left, top, right, bottom)",
            UserWarning,
            stacklevel=3,
        )
    return np.asarray(face["embedding"], dtype=np.float32), image.crop(square_box(face["bbox"]))
