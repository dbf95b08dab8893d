"""Control image preprocessors: canny for real (OpenCV), the controlnet_aux annotators through a stub module."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from PIL import Image

import kolors
from kolors import KolorsError
from kolors.adapters import preprocess as pre


def photo(w: int = 64, h: int = 48) -> Image.Image:
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[10:30, 20:40] = (200, 120, 40)  # a rectangle: its outline is the edge map
    return Image.fromarray(a)


def test_canny_is_opencv_with_the_official_thresholds():
    import cv2

    out = kolors.preprocess("canny", photo())
    assert out.mode == "RGB" and out.size == (64, 48)
    edges = cv2.Canny(np.asarray(photo()), 100, 200)
    np.testing.assert_array_equal(np.asarray(out), np.repeat(edges[:, :, None], 3, axis=2))
    assert edges.max() == 255 and edges[20, 30] == 0  # the outline, not the inside
    loose = np.asarray(kolors.preprocess("canny", photo(), low_threshold=1, high_threshold=2))
    assert loose.sum() >= np.asarray(out).sum()


def test_none_passes_the_image():
    im = photo().convert("L")
    out = kolors.preprocess("none", im)
    assert out.mode == "RGB" and out.size == im.size


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("sketch", {}, "unknown preprocessor 'sketch'; choose one of: none, canny, depth, openpose, dwpose"),
        ("canny", {"resolution": 512}, "does not take resolution; it takes low_threshold, high_threshold"),
        ("canny", {"low_threshold": -1}, "low_threshold must be a whole number >= 0"),
        ("depth", {"resolution": 10}, "resolution must be a whole number >= 64"),
    ],
)
def test_bad_options(name, options, message, monkeypatch):
    monkeypatch.setitem(sys.modules, "controlnet_aux", _stub_aux())
    with pytest.raises(KolorsError, match=message):
        kolors.preprocess(name, photo(), **options)


def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)  # import fails, as when not installed
    monkeypatch.setattr(pre, "_detectors", {})
    with pytest.raises(
        KolorsError, match=r"depth preprocessor needs the control extra: pip install 'kolors\[control\]'"
    ):
        kolors.preprocess("depth", photo())


def _stub_aux(calls: list | None = None, fail: Exception | None = None) -> types.ModuleType:
    """controlnet_aux as far as kolors uses it: detectors that record their calls and return a gray map."""
    calls = calls if calls is not None else []

    class Detector:
        def __init__(self, kind, source=None, **kwargs):
            self.kind, self.source, self.kwargs = kind, source, kwargs

        def __call__(self, image, **kwargs):
            calls.append((self.kind, self.source, kwargs))
            r = kwargs["detect_resolution"]
            return Image.new("RGB", (r, r * image.height // image.width), (90, 90, 90))

    def factory(kind):
        def from_pretrained(source):
            if fail is not None:
                raise fail
            return Detector(kind, source)

        return types.SimpleNamespace(from_pretrained=from_pretrained)

    aux = types.ModuleType("controlnet_aux")
    aux.MidasDetector, aux.OpenposeDetector = factory("depth"), factory("openpose")
    aux.DWposeDetector = lambda **kwargs: Detector("dwpose", None, **kwargs)
    return aux


@pytest.mark.parametrize("name", ["depth", "openpose", "dwpose"])
def test_annotators_through_controlnet_aux(name, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "controlnet_aux", _stub_aux(calls))
    monkeypatch.setattr(pre, "_detectors", {})
    monkeypatch.delenv("KOLORS_ANNOTATORS", raising=False)
    out = kolors.preprocess(name, photo(), resolution=256)
    assert out.size == (64, 48) and out.mode == "RGB"
    kind, source, kwargs = calls[0]
    assert kind == name and kwargs["detect_resolution"] == 256
    assert source == (None if name == "dwpose" else "lllyasviel/Annotators")
    assert kwargs.get("hand_and_face", True) is True
    kolors.preprocess(name, photo())
    assert len(pre._detectors) == 1  # loaded once


def test_annotators_from_a_local_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "controlnet_aux", _stub_aux(calls))
    monkeypatch.setattr(pre, "_detectors", {})
    with pytest.raises(KolorsError, match="lacks dpt_hybrid-midas-501f0c75.pt for the depth preprocessor"):
        kolors.preprocess("depth", photo(), annotators=tmp_path)
    (tmp_path / "dpt_hybrid-midas-501f0c75.pt").write_bytes(b"weights")
    monkeypatch.setenv("KOLORS_ANNOTATORS", str(tmp_path))
    kolors.preprocess("depth", photo())
    assert calls[0][1] == str(tmp_path)


def test_offline_without_weights_says_where_to_put_them(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "controlnet_aux", _stub_aux(fail=OSError("We couldn't connect to the Hub"))
    )
    monkeypatch.setattr(pre, "_detectors", {})
    monkeypatch.delenv("KOLORS_ANNOTATORS", raising=False)
    with pytest.raises(
        KolorsError, match=r"put body_pose_model.pth, hand_pose_model.pth, facenet.pth in a folder"
    ):
        kolors.preprocess("openpose", photo())
