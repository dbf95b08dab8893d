"""FaceID-Plus against the official algorithm (Kwai-Kolors' ipa_faceid_plus.py, its IPAttnProcessor and the FaceID
pipeline), re-written here in plain torch on diffusers' tiny KolorsPipeline: the face tokens are appended to the
text states before the UNet's text projection, and each cross-attention splits them off again and adds
scale * attention to them. insightface is replaced by a stub module: the tests need neither it nor its models.
"""

from __future__ import annotations

import copy
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kolors import KolorsError, KolorsPipeline
from tests.reference import TE_HIDDEN, TINY_UNET
from tests.test_clip_vision import TINY_CLIP, photo, save_tiny_clip
from tests.test_ip_adapter import attention_state, block_widths, resampler_state
from tests.test_pipeline import assert_close

SIZE = dict(height=64, width=64)
PROMPT = "a portrait photo"
CALL = dict(**SIZE, num_inference_steps=2, guidance_scale=5.0, output_type="np")
NUM_TOKENS, ID_DIM = 6, 512


def gen() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(9)


def faceid_state(reference_unet, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    width = TE_HIDDEN  # the text encoder's width: the official 4096
    proj = {
        "proj.0.weight": torch.randn(2 * ID_DIM, ID_DIM, generator=g) / ID_DIM**0.5,
        "proj.0.bias": 0.02 * torch.randn(2 * ID_DIM, generator=g),
        "proj.2.weight": torch.randn(NUM_TOKENS * width, 2 * ID_DIM, generator=g) / (2 * ID_DIM) ** 0.5,
        "proj.2.bias": 0.02 * torch.randn(NUM_TOKENS * width, generator=g),
        "norm.weight": 1 + 0.1 * torch.randn(width, generator=g),
        "norm.bias": 0.02 * torch.randn(width, generator=g),
    }
    resampler = resampler_state(
        g, TINY_CLIP["hidden_size"], width, dim=width, depth=4, heads=width // 64, ff_mult=4
    )
    proj |= {f"perceiver_resampler.{k}": v for k, v in resampler.items()}
    adapter = attention_state(g, block_widths(reference_unet), TINY_UNET["cross_attention_dim"], 3.0)
    return {"image_proj": proj, "adapter_modules": adapter}


# ---------------------------------------------------------------------------------------------- the official maths


def official_perceiver(x, latents, s, p, heads):
    """PerceiverAttention.forward: q from the latents, k and v from [x, latents], (q s)(k s)^T with s = hs^-1/4."""
    x = F.layer_norm(x, x.shape[-1:], s[p + "norm1.weight"], s[p + "norm1.bias"])
    latents = F.layer_norm(latents, latents.shape[-1:], s[p + "norm2.weight"], s[p + "norm2.bias"])
    b, n, _ = latents.shape
    q = latents @ s[p + "to_q.weight"].T
    k, v = (torch.cat([x, latents], dim=-2) @ s[p + "to_kv.weight"].T).chunk(2, dim=-1)

    def heads_(t):
        return t.view(b, t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = heads_(q), heads_(k), heads_(v)
    scale = 1 / (q.shape[-1] ** 0.25)
    weight = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1)
    out = (weight @ v).permute(0, 2, 1, 3).reshape(b, n, -1)
    return out @ s[p + "to_out.weight"].T


def official_proj_plus(s, id_embeds, clip_embeds):
    """ProjPlusModel.forward with shortcut=True, scale=1.0."""
    width = s["norm.weight"].shape[0]
    x = F.linear(
        F.gelu(F.linear(id_embeds, s["proj.0.weight"], s["proj.0.bias"])),
        s["proj.2.weight"],
        s["proj.2.bias"],
    )
    x = F.layer_norm(x.reshape(-1, NUM_TOKENS, width), (width,), s["norm.weight"], s["norm.bias"])
    r = "perceiver_resampler."
    h = F.linear(clip_embeds, s[r + "proj_in.weight"], s[r + "proj_in.bias"])
    latents = x
    for i in range(4):
        p = f"{r}layers.{i}."
        latents = official_perceiver(h, latents, s, p + "0.", width // 64) + latents
        ff = F.layer_norm(latents, (width,), s[p + "1.0.weight"], s[p + "1.0.bias"])
        latents = F.gelu(ff @ s[p + "1.1.weight"].T) @ s[p + "1.3.weight"].T + latents
    out = F.layer_norm(
        F.linear(latents, s[r + "proj_out.weight"], s[r + "proj_out.bias"]),
        (width,),
        s[r + "norm_out.weight"],
        s[r + "norm_out.bias"],
    )
    return x + out


class OfficialIPAttn:
    """IPAttnProcessor: the last num_tokens states are the face's; attention to them, scale times, is added."""

    def __init__(self, to_k_ip, to_v_ip, scale):
        self.to_k_ip, self.to_v_ip, self.scale = to_k_ip, to_v_ip, scale

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
    ):
        b = hidden_states.shape[0]
        end = encoder_hidden_states.shape[1] - NUM_TOKENS
        text, face = encoder_hidden_states[:, :end], encoder_hidden_states[:, end:]
        q, k, v = attn.to_q(hidden_states), attn.to_k(text), attn.to_v(text)
        hd = k.shape[-1] // attn.heads

        def heads_(t):
            return t.view(b, -1, attn.heads, hd).transpose(1, 2)

        out = (
            F.scaled_dot_product_attention(heads_(q), heads_(k), heads_(v))
            .transpose(1, 2)
            .reshape(b, -1, attn.heads * hd)
        )
        ip = F.scaled_dot_product_attention(
            heads_(q), heads_(face @ self.to_k_ip.T), heads_(face @ self.to_v_ip.T)
        )
        out = out + self.scale * ip.transpose(1, 2).reshape(b, -1, attn.heads * hd)
        return attn.to_out[1](attn.to_out[0](out))


def official_generate(reference_pipeline, state, face_crop, id_embeds, scale, clip_dir):
    """The official FaceID pipeline's steps on diffusers' tiny KolorsPipeline (its loop is the same)."""
    from diffusers import KolorsPipeline as DiffusersKolors
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = TINY_CLIP["image_size"]
    encoder = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    pixels = CLIPImageProcessorPil(size=size, crop_size=size)(
        face_crop.resize((336, 336)), return_tensors="pt"
    ).pixel_values
    clip = encoder(pixels, output_hidden_states=True).hidden_states[-2]
    ids = torch.from_numpy(np.asarray([id_embeds], dtype=np.float32))
    s = state["image_proj"]
    face, uncond_face = (
        official_proj_plus(s, ids, clip),
        official_proj_plus(s, torch.zeros_like(ids), torch.zeros_like(clip)),
    )

    unet = copy.deepcopy(reference_pipeline.unet)
    procs, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = AttnProcessor2_0()
        else:
            a = state["adapter_modules"]
            procs[name] = OfficialIPAttn(a[f"{key_id}.to_k_ip.weight"], a[f"{key_id}.to_v_ip.weight"], scale)
            key_id += 2
    unet.set_attn_processor(procs)
    ref = DiffusersKolors(**{**reference_pipeline.components, "unet": unet})
    ref.set_progress_bar_config(disable=True)
    embeds, negative, pooled, negative_pooled = ref.encode_prompt(PROMPT, "cpu", 1, True, "")
    return ref(
        prompt_embeds=torch.cat([embeds, face], dim=1),
        negative_prompt_embeds=torch.cat([negative, uncond_face], dim=1),
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
        generator=gen(),
        **CALL,
    ).images


# ---------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def faceid_dir(reference_pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("faceid") / "Kolors-IP-Adapter-FaceID-Plus-tiny"
    root.mkdir()
    save_tiny_clip(root / "clip-vit-large-patch14-336", seed=4)
    state = faceid_state(reference_pipeline.unet)
    torch.save(state, root / "ipa-faceid-plus.bin")
    return root, state


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, faceid_dir):
    p = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    p.set_progress_bar_config(disable=True)
    p.load_faceid(faceid_dir[0])
    return p


def face_embedding(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(ID_DIM) * 20).astype(np.float32)  # unnormalised


@pytest.mark.parametrize("scale", [0.8, 0.0])
def test_matches_the_official_algorithm(pipe, reference_pipeline, faceid_dir, scale):
    root, state = faceid_dir
    crop, ids = photo(40, 40, seed=7), face_embedding()
    theirs = official_generate(
        reference_pipeline, state, crop, ids, scale, root / "clip-vit-large-patch14-336"
    )
    pipe.set_faceid_scale(scale)
    ours = pipe(PROMPT, face_image=crop, face_embeds=ids, generator=gen(), **CALL).images
    assert_close(ours, theirs)
    plain = pipe(PROMPT, generator=gen(), **CALL).images
    assert (np.abs(ours - plain).max() > 1e-2) == (scale > 0)


class StubFaceAnalysis:
    """insightface.app.FaceAnalysis as the tests see it: the faces it 'finds' are set by the test."""

    faces: list = []
    made: list = []

    def __init__(self, name, root, providers):
        StubFaceAnalysis.made.append((name, root))

    def prepare(self, ctx_id, det_size):
        assert det_size == (640, 640)

    def get(self, bgr):
        assert bgr.ndim == 3 and bgr.shape[2] == 3
        return StubFaceAnalysis.faces


@pytest.fixture
def insightface(monkeypatch, tmp_path):
    package, app = types.ModuleType("insightface"), types.ModuleType("insightface.app")
    app.FaceAnalysis = StubFaceAnalysis
    package.app = app
    monkeypatch.setitem(sys.modules, "insightface", package)
    monkeypatch.setitem(sys.modules, "insightface.app", app)
    models = tmp_path / "models" / "antelopev2"
    models.mkdir(parents=True)
    (models / "scrfd_10g_bnkps.onnx").write_bytes(b"stub")
    from kolors.adapters import face

    monkeypatch.setattr(face, "_analysers", {})
    return models


def test_detected_face_is_the_largest_square_crop(pipe, insightface):
    image = photo(96, 80, seed=8)
    small = {"bbox": np.array([5.0, 5.0, 20.0, 25.0]), "embedding": face_embedding(1)}
    large = {"bbox": np.array([30.0, 10.0, 70.0, 60.0]), "embedding": face_embedding(2)}
    StubFaceAnalysis.faces = [small, large]
    pipe.face_models = None
    pipe.load_faceid(pipe.faceid.file, face_models=insightface.parent.parent)
    pipe.set_faceid_scale(0.8)
    with pytest.warns(UserWarning, match=r"2 faces found.*using the largest, at \(30, 10, 70, 60\)"):
        detected = pipe(PROMPT, face_image=image, generator=gen(), **CALL).images
    crop = image.crop((25.0, 10.0, 75.0, 60.0))  # the official square: centre (50, 35), side 50
    given = pipe(PROMPT, face_image=crop, face_embeds=large["embedding"], generator=gen(), **CALL).images
    np.testing.assert_allclose(detected, given, atol=1e-6)
    assert StubFaceAnalysis.made[-1] == ("antelopev2", str(insightface.parent.parent))


def test_no_face(pipe, insightface):
    StubFaceAnalysis.faces = []
    pipe.face_models = insightface
    with pytest.raises(KolorsError, match="no face found"):
        pipe(PROMPT, face_image=photo(64, 64), **CALL)


def test_missing_insightface_names_the_extra(pipe, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "insightface", None)
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    from kolors.adapters import face

    monkeypatch.setattr(face, "_analysers", {})
    models = tmp_path / "antelopev2"
    models.mkdir()
    (models / "glintr100.onnx").write_bytes(b"stub")
    pipe.face_models = models
    with pytest.raises(KolorsError, match=r"pip install 'kolors\[faceid\]'"):
        pipe(PROMPT, face_image=photo(64, 64), **CALL)


def test_bad_face_input(pipe, tmp_path):
    pipe.face_models = None
    with pytest.raises(KolorsError, match="needs insightface's antelopev2 models"):
        pipe(PROMPT, face_image=photo(64, 64), **CALL)
    with pytest.raises(KolorsError, match="512 finite numbers"):
        pipe(PROMPT, face_image=photo(64, 64), face_embeds=np.zeros(128), **CALL)
    with pytest.raises(KolorsError, match="needs face_image"):
        pipe(PROMPT, face_embeds=face_embedding(), **CALL)
    with pytest.raises(KolorsError, match="no antelopev2 face models"):
        pipe.load_faceid(pipe.faceid.file, face_models=tmp_path)
    with pytest.raises(KolorsError, match="is a FaceID-Plus adapter"):
        pipe.load_ip_adapter(pipe.faceid.file, image_encoder_folder=None)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(KolorsError, match="cannot decode image"):
        pipe(PROMPT, face_image=str(tmp_path / "broken.jpg"), face_embeds=face_embedding(), **CALL)


def test_square_box_is_the_official_one():
    from kolors.adapters.face import square_box

    assert square_box((10, 20, 30, 60)) == (0.0, 20.0, 40.0, 60.0)
    assert isinstance(Image.new("RGB", (4, 4)).crop(square_box((0, 0, 2, 4))), Image.Image)


def test_cli_face_with_detection(tiny_model_dir, faceid_dir, insightface, tmp_path, capsys):
    from kolors.cli import main
    from kolors.request import image_hash, read_parameters

    face = tmp_path / "face.png"
    photo(96, 80, seed=8).save(face)
    StubFaceAnalysis.faces = [{"bbox": np.array([30.0, 10.0, 70.0, 60.0]), "embedding": face_embedding(2)}]
    out = tmp_path / "out.png"
    args = ["generate", "a portrait", "--model", str(tiny_model_dir), "--faceid", str(faceid_dir[0])]
    args += ["--face", str(face), "--face-models", str(insightface), "--steps", "2", "--seed", "1"]
    args += [
        "--width",
        "64",
        "--height",
        "64",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "-o",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0, capsys.readouterr().err
    params = read_parameters(out)
    assert params.endswith(
        f"FaceID: ipa-faceid-plus, FaceID scale: 0.8, FaceID image hash: {image_hash(Image.open(face))}"
    )
