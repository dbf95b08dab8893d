"""SDXL's AutoencoderKL, the Kolors VAE: images to latents and back.

Only what the Kolors VAE config uses: levels of ResNet blocks (DownEncoderBlock2D, UpDecoderBlock2D), a mid
block with one single-head self-attention, GroupNorm and SiLU, and the 1x1 quant convolutions around the
latent. Attribute names are diffusers' state-dict keys, so a diffusers checkpoint loads strictly as it is.
Norms run in the model's dtype, as diffusers runs them: a float16 VAE overflows, which is why the config's
`force_upcast` asks the pipeline to decode in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kolors.config import ConfigError, check_positive
from kolors.models.layers import fast_cpu
from kolors.noise import Generators, randn

EPS = 1e-6  # diffusers' Encoder and Decoder fix every norm's epsilon to this, whatever the config says


@dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers AutoencoderKL config.json; absent keys take diffusers' defaults."""

    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    block_out_channels: tuple[int, ...]
    layers_per_block: int = 1
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int | tuple[int, ...] = 32  # the tile size, once tiled decoding exists
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        check_positive(
            self,
            "block_out_channels",
            "layers_per_block",
            "in_channels",
            "out_channels",
            "latent_channels",
            "norm_num_groups",
            "scaling_factor",
        )
        levels = len(self.block_out_channels)
        for kind, types, supported in (
            ("down", self.down_block_types, "DownEncoderBlock2D"),
            ("up", self.up_block_types, "UpDecoderBlock2D"),
        ):
            if any(t != supported for t in types):
                raise ConfigError(
                    f"VAE {kind}_block_types {types} unsupported: only {supported} is implemented"
                )
            if len(types) != levels:
                raise ConfigError(f"VAE has {len(types)} {kind} blocks but {levels} block_out_channels")
        if self.act_fn not in ("silu", "swish"):
            raise ConfigError(f"VAE act_fn {self.act_fn!r} unsupported: only silu is implemented")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(
                f"VAE block_out_channels {self.block_out_channels} not divisible by norm_num_groups"
            )

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (diffusers' `vae_scale_factor`): 8 for SDXL."""
        return 2 ** (len(self.block_out_channels) - 1)


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        # In place on tensors made here, the same values: the decoder's activations are large, and each new one is
        # fresh pages the kernel must clear (BENCHMARKS.md, VAE decode).
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList(
            [nn.Linear(channels, channels)]
        )  # diffusers' index 1 is a parameterless dropout

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x.view(B, C, H * W)).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)  # a channels-last view
        # h first: the sum, and so every later conv, keeps h's channels-last layout as in diffusers, whose
        # kernels then round exactly as ours (x first changes the decoder output by ~1e-5).
        return h + x


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # Padding only the right and bottom edge is how the checkpoint was trained; symmetric padding shifts it.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_layers
        self.resnets = nn.ModuleList(ResnetBlock2D(c, out_channels, groups) for c in channels[:-1])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_layers
        self.resnets = nn.ModuleList(ResnetBlock2D(c, out_channels, groups) for c in channels[:-1])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        # A None entry keeps diffusers' layout (and key names) when the config drops the attention.
        self.attentions = nn.ModuleList([Attention(channels, groups) if add_attention else None])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        ins = (channels[0], *channels[:-1])
        last = len(channels) - 1
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(c_in, c_out, cfg.layers_per_block, groups, downsample=i < last)
            for i, (c_in, c_out) in enumerate(zip(ins, channels, strict=True))
        )
        self.mid_block = UNetMidBlock2D(channels[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(channels[0], groups, cfg.mid_block_add_attention)
        ins = (channels[0], *channels[:-1])
        last = len(channels) - 1
        # One resnet more per level than the encoder: diffusers builds the decoder with layers_per_block + 1.
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(c_in, c_out, cfg.layers_per_block + 1, groups, upsample=i < last)
            for i, (c_in, c_out) in enumerate(zip(ins, channels, strict=True))
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_out = nn.Conv2d(channels[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Images in [-1, 1] to a diagonal Gaussian over latents, and latents back to images."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, in, H, W) image -> (mean, logvar), each (B, latent, H/f, W/f), latents not yet scaled."""
        moments = self.encoder(channels_last_on_fast_cpu(x))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        # diffusers' DiagonalGaussianDistribution clamps so that exp(logvar) stays finite.
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent, h, w) unscaled latents -> (B, out, h*f, w*f) image, roughly in [-1, 1]."""
        z = channels_last_on_fast_cpu(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).contiguous()


def channels_last_on_fast_cpu(x: Tensor) -> Tensor:
    # oneDNN's bf16 convolutions run faster channels-last (BENCHMARKS.md, VAE decode); diffusers
    # switches to it only after the mid block's attention. Rounds differently, so bf16 only, as the UNet.
    return x.contiguous(memory_format=torch.channels_last) if fast_cpu(x) else x


def sample_latent(mean: Tensor, logvar: Tensor, generator: Generators = None) -> Tensor:
    """A draw from N(mean, exp(logvar)), the same numbers as diffusers' `latent_dist.sample(generator)`."""
    noise = randn(mean.shape, generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise


# A cheap look at latents without the decoder: the SDXL VAE's latent space is close to a linear image of RGB, so
# a 4x3 matrix and a bias, the least-squares fit of decoded colours on scaled latents that ComfyUI and
# A1111 publish for their SDXL previews, gives a blurry, recognisable picture at latent resolution.
SDXL_LATENT_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def latent_preview(latents: Tensor) -> Tensor:
    """(B, 4, h, w) scaled latents (what the sampler denoises) -> (B, h, w, 3) uint8 RGB on the CPU: the linear
    preview of the SDXL latent space, for watching an image form. Meaningless for other latent spaces."""
    if latents.shape[1] != len(SDXL_LATENT_RGB):
        raise ValueError(
            f"the SDXL preview needs {len(SDXL_LATENT_RGB)} latent channels, not {latents.shape[1]}"
        )
    weight = torch.tensor(SDXL_LATENT_RGB, dtype=torch.float32, device=latents.device)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("bchw,cr->bhwr", latents.float(), weight) + bias  # roughly [-1, 1]
    return ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).cpu()
