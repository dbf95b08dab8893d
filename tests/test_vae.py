"""The VAE against diffusers' AutoencoderKL: same weights, same latents, same images, same samples."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL as ReferenceVAE

from kolors.config import ConfigError, from_dict, load_config
from kolors.models.layers import FAST_CPU_DTYPES
from kolors.models.vae import AutoencoderKL, VAEConfig, sample_latent
from tests.reference import REFERENCE, TINY_VAE


def perturb_(vae: torch.nn.Module, seed: int) -> None:
    """diffusers initialises every norm to (1, 0) and many biases to 0, which would hide a swapped norm or a
    dropped bias; give them distinct values, leaving the default conv and linear weights (sane activations)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build_pair(overrides: dict | None = None, seed: int = 0) -> tuple[ReferenceVAE, AutoencoderKL]:
    """diffusers' tiny VAE and ours, built on the meta device and loaded strictly from its state dict."""
    config = {**TINY_VAE, **(overrides or {})}
    torch.manual_seed(seed)
    ref = ReferenceVAE(**config).eval()
    perturb_(ref, seed + 1)
    with torch.device("meta"):
        ours = AutoencoderKL(from_dict(VAEConfig, config))
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    ours.load_state_dict(state, strict=True, assign=True)
    return ref, ours.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[ReferenceVAE, AutoencoderKL]:
    return build_pair()


def image(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a.float() - b.float()).abs().max().item()


# (batch, height, width) in pixels; the tiny VAE has 3 levels, so latents are 4x smaller.
SHAPES = [(1, 32, 32), (2, 48, 64)]


def test_config_defaults_follow_diffusers():
    cfg = from_dict(VAEConfig, TINY_VAE)
    assert cfg.force_upcast is True and cfg.shift_factor is None
    assert cfg.use_quant_conv and cfg.use_post_quant_conv and cfg.mid_block_add_attention
    assert cfg.downsample_factor == 4 and cfg.scaling_factor == 0.13025
    assert from_dict(VAEConfig, {**TINY_VAE, "force_upcast": False}).force_upcast is False


@pytest.mark.parametrize(
    "bad",
    [
        {"down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D")},
        {"up_block_types": ("UpDecoderBlock2D",) * 2},
        {"act_fn": "gelu"},
        {"norm_num_groups": 24},
    ],
)
def test_unsupported_config_is_an_error(bad):
    with pytest.raises(ConfigError):
        from_dict(VAEConfig, {**TINY_VAE, **bad})


def test_state_dict_matches_diffusers(pair):
    ref, ours = pair
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == ref_shapes


@pytest.mark.parametrize("shape", SHAPES)
def test_encode_matches_diffusers(pair, shape):
    ref, ours = pair
    x = image(*shape)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
    b, h, w = shape
    assert mean.shape == logvar.shape == (b, 4, h // 4, w // 4)
    assert max_diff(mean, dist.mean) <= 1e-5
    assert max_diff(logvar, dist.logvar) <= 1e-5


def test_logvar_is_clamped_as_diffusers():
    ref, ours = build_pair()
    with torch.no_grad():  # push two logvar channels beyond the clamp, through the same quant_conv bias
        for vae in (ref, ours):
            vae.quant_conv.bias[4:6] = torch.tensor([60.0, -80.0])
        dist = ref.encode(image(1, 32, 32)).latent_dist
        _, logvar = ours.encode(image(1, 32, 32))
    assert logvar[:, 0].min().item() == 20.0 and logvar[:, 1].max().item() == -30.0
    assert max_diff(logvar, dist.logvar) <= 1e-5


@pytest.mark.parametrize("seeds", [(7,), (3, 5)], ids=["one-generator", "generator-per-image"])
def test_sample_latent_matches_diffusers(pair, seeds):
    ref, ours = pair
    x = image(2, 48, 64)

    def generators():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return gens[0] if len(gens) == 1 else gens

    with torch.no_grad():
        expected = ref.encode(x).latent_dist.sample(generators())
        mean, logvar = ours.encode(x)
    sample = sample_latent(mean, logvar, generators())
    assert max_diff(sample, expected) <= 1e-5
    assert max_diff(sample, mean) > 1e-2  # the noise is really there


@pytest.mark.parametrize("shape", SHAPES)
def test_decode_matches_diffusers(pair, shape):
    ref, ours = pair
    b, h, w = shape
    z = torch.randn(b, 4, h // 4, w // 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.decode(z).sample
        out = ours.decode(z)
    assert out.shape == (b, 3, h, w)
    assert max_diff(out, expected) <= 1e-5


@pytest.mark.parametrize(
    "overrides",
    [{"mid_block_add_attention": False}, {"use_quant_conv": False, "use_post_quant_conv": False}],
    ids=["no-mid-attention", "no-quant-convs"],
)
def test_config_variants_match_diffusers(overrides):
    ref, ours = build_pair(overrides)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x, z = image(1, 32, 32), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(ours.encode(x)[0], ref.encode(x).latent_dist.mean) <= 1e-5
        assert max_diff(ours.decode(z), ref.decode(z).sample) <= 1e-5


# Both models run the same kernels in half precision, so they agree far closer than these bounds (0.0 on
# CPU with torch 2.13); the bounds leave room for other kernels while still catching a float32 detour.
HALF_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(HALF_TOLERANCE), ids=str)
def test_half_precision_matches_diffusers(pair, dtype):
    ref, ours = (copy.deepcopy(m).to(dtype) for m in pair)
    x = image(2, 48, 64).to(dtype)
    z = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        expected, out = ref.decode(z).sample, ours.decode(z)
    assert out.dtype == mean.dtype == dtype
    assert max_diff(mean, dist.mean) <= HALF_TOLERANCE[dtype]
    assert max_diff(logvar, dist.logvar) <= HALF_TOLERANCE[dtype]
    if dtype not in FAST_CPU_DTYPES:
        assert max_diff(out, expected) <= HALF_TOLERANCE[dtype]
        return
    # The CPU fast path decodes channels-last, whose bf16 convolutions round differently from diffusers'
    # (up to 0.055 here at outputs up to 2.2): judged by the error against float32, which must not be worse.
    with torch.no_grad():
        truth = pair[0].decode(z.float()).sample

    def rms(x: torch.Tensor) -> float:
        return (x.float() - truth).pow(2).mean().sqrt().item()

    assert rms(out) <= 1.25 * rms(expected)
    assert max_diff(out, expected) <= 0.05 * truth.abs().max().item()


def test_full_size_vae_on_meta_device():
    path = REFERENCE / "vae" / "config.json"
    if not path.is_file():
        pytest.skip(f"the Kolors reference VAE config is absent ({path})")
    cfg = load_config(VAEConfig, path)
    assert cfg.force_upcast is True and cfg.shift_factor is None and cfg.scaling_factor == 0.13025
    assert cfg.downsample_factor == 8
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        ref = ReferenceVAE.from_config(ReferenceVAE.load_config(path.parent))
    state = ours.state_dict()
    assert len(state) == 248
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_latent_preview_is_the_sdxl_linear_projection():
    from kolors.models.vae import SDXL_LATENT_RGB, SDXL_LATENT_RGB_BIAS, latent_preview

    latents = torch.zeros(2, 4, 3, 5)
    latents[1, 0] = 1.0  # the first channel alone: its row of the matrix, plus the bias
    out = latent_preview(latents)
    assert out.shape == (2, 3, 5, 3) and out.dtype == torch.uint8
    expected = [
        round((w + b + 1) * 127.5) for w, b in zip(SDXL_LATENT_RGB[0], SDXL_LATENT_RGB_BIAS, strict=True)
    ]
    assert out[1, 2, 4].tolist() == expected
    assert out[0, 0, 0].tolist() == [round((b + 1) * 127.5) for b in SDXL_LATENT_RGB_BIAS]
    with pytest.raises(ValueError, match="4 latent channels"):
        latent_preview(torch.zeros(1, 16, 2, 2))
