"""IP-Adapter-Plus and FaceID-Plus: a reference image, or a face, as a prompt.

An adapter file holds an image projection (`image_proj`: IP-Adapter-Plus' Resampler, or FaceID-Plus' ProjPlusModel)
and, for each cross-attention of the UNet, a key and a value projection of the image tokens (`ip_adapter`, or
`adapter_modules` in the official FaceID file: `{k}.to_k_ip.weight`, `{k}.to_v_ip.weight` with k = 1, 3, 5, …, the
odd entries of diffusers' attention-processor list, whose even entries are the self-attentions).

The one seam (kolors.models.unet.ContextCache.ip): the image tokens' keys and values, computed here once per
generation like the text ones, sit beside the text's in the cache; each cross-attention attends to them on its own
and adds the result, scale times, before its output projection (diffusers' IPAdapterAttnProcessor2_0, the official
IPAttnProcessor). The scale is folded into the values (scale * attn(q, k, v) = attn(q, k, scale * v)), and a block
at scale 0 gets no pair at all, as diffusers skips it. Nothing in the UNet changes, so unloading is dropping this
object.

IP-Adapter-Plus' tokens are the Resampler's output at the UNet's cross-attention width. FaceID-Plus' are at the text
encoder's width (4096): the official pipeline appends them to the text states before the UNet's text projection
(`encoder_hid_proj`), so they pass through that projection first.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kolors.errors import KolorsError
from kolors.models.unet import UNet2DConditionModel
from kolors.weights.hub import find_weight_file

IP_ADAPTER_FILES = ("ip_adapter_plus_general.safetensors", "ip_adapter_plus_general.bin")
FACEID_FILES = ("ipa-faceid-plus.bin", "ipa-faceid-plus.safetensors")
ADAPTER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# The official files' dim_head: the head count is read from to_q's width with it (as diffusers' loader does).
DIM_HEAD = 64
# The CLIP ViT-L/14 both Kolors adapters were trained with reads 336-px images: 577 tokens of 1024. Its 224-px
# sibling gives 257 tokens, and the adapter, which never saw those, makes poor images (or, elsewhere, fails with
# "tensor a (577) must match b (257)").
KOLORS_CLIP_IMAGE_SIZE = 336
CLIP_L_HIDDEN = 1024


# ---------------------------------------------------------------------------------------------- image projections


class PerceiverAttention(nn.Module):
    """The latents attend to the image features and to themselves (Tencent IP-Adapter's resampler)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head * heads, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        B, L, _ = latents.shape

        def split(t: Tensor) -> Tensor:
            return t.view(B, t.shape[1], self.heads, -1).transpose(1, 2)  # (B, nh, T, hs)

        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        # SDPA's one 1/sqrt(hs) equals the official (q hs^-1/4)(k hs^-1/4) up to rounding
        y = F.scaled_dot_product_attention(split(self.to_q(latents)), split(k), split(v))
        return self.to_out(y.transpose(1, 2).reshape(B, L, -1))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    # Keys layers.N.1.{0,1,3}: LayerNorm, Linear, GELU, Linear
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


@dataclass(frozen=True)
class ResamplerConfig:
    """A perceiver resampler's sizes, read from its weights' shapes (the files carry no config)."""

    dim: int  # width of the latents
    depth: int
    heads: int
    embedding_dim: int  # width of the image features it reads
    output_dim: int  # width of the tokens it gives
    ff_mult: int
    num_queries: int = (
        0  # learned latents (IP-Adapter-Plus); 0: the latents come from the face id (FaceID-Plus)
    )

    @classmethod
    def from_weights(cls, state: dict[str, Tensor], prefix: str = "") -> ResamplerConfig:
        dim = state[f"{prefix}proj_in.weight"].shape[0]
        depth = len(
            {k for k in state if re.fullmatch(rf"{re.escape(prefix)}layers\.\d+\.0\.to_q\.weight", k)}
        )
        latents = state.get(f"{prefix}latents")
        return cls(
            dim=dim,
            depth=depth,
            heads=state[f"{prefix}layers.0.0.to_q.weight"].shape[0] // DIM_HEAD,
            embedding_dim=state[f"{prefix}proj_in.weight"].shape[1],
            output_dim=state[f"{prefix}proj_out.weight"].shape[0],
            ff_mult=state[f"{prefix}layers.0.1.1.weight"].shape[0] // dim,
            num_queries=0 if latents is None else latents.shape[1],
        )


class Resampler(nn.Module):
    """IP-Adapter-Plus' image projection: `num_queries` learned latents read the image features through `depth`
    perceiver blocks, then project to the UNet's cross-attention width. The FaceID resampler is the same
    without learned latents (it is given its latents)."""

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        if cfg.num_queries:
            self.latents = nn.Parameter(torch.empty(1, cfg.num_queries, cfg.dim))
        self.proj_in = nn.Linear(cfg.embedding_dim, cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.output_dim)
        self.norm_out = nn.LayerNorm(cfg.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(cfg.dim, DIM_HEAD, cfg.heads), feed_forward(cfg.dim, cfg.ff_mult)]
            )
            for _ in range(cfg.depth)
        )

    def forward(self, x: Tensor, latents: Tensor | None = None) -> Tensor:
        """Tokens (B, num_queries, output_dim) for image features x (B, T, embedding_dim)."""
        latents = self.latents.repeat(x.shape[0], 1, 1) if latents is None else latents
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ProjPlusModel(nn.Module):
    """FaceID-Plus' image projection (Kwai-Kolors' ipa_faceid_plus.py): the 512-d face id becomes `num_tokens`
    tokens of the text width, which then read the CLIP features of the face crop through a perceiver resampler
    and keep a shortcut: out = tokens + resampler(tokens, clip)."""

    def __init__(self, id_dim: int, num_tokens: int, resampler: ResamplerConfig):
        super().__init__()
        self.num_tokens, self.width = num_tokens, resampler.dim
        self.proj = nn.Sequential(
            nn.Linear(id_dim, 2 * id_dim), nn.GELU(), nn.Linear(2 * id_dim, num_tokens * resampler.dim)
        )
        self.norm = nn.LayerNorm(resampler.dim)
        self.perceiver_resampler = Resampler(resampler)

    def forward(self, id_embeds: Tensor, clip_embeds: Tensor) -> Tensor:
        x = self.norm(self.proj(id_embeds).reshape(-1, self.num_tokens, self.width))  # (B, num_tokens, width)
        return x + self.perceiver_resampler(clip_embeds, latents=x)


# ---------------------------------------------------------------------------------------------- files


def find_adapter_file(
    path_or_repo: str | os.PathLike,
    weight_name: str | None,
    subfolder: str | None,
    defaults: Sequence[str],
    revision: str | None = None,
) -> Path:
    """The adapter file from a file path, a folder (its `weight_name`, a default name, or its one weight file) or
    a hub repo id (the file downloaded into the huggingface_hub cache)."""
    return find_weight_file(
        path_or_repo,
        what="adapter",
        defaults=defaults,
        suffixes=ADAPTER_SUFFIXES,
        weight_name=weight_name,
        subfolder=subfolder,
        revision=revision,
    )


def download_folder(repo: str, folder: str, revision: str | None = None) -> Path:
    """A folder of a hub repo (an adapter's image encoder), downloaded into the huggingface_hub cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        root = snapshot_download(
            repo, revision=revision, allow_patterns=[f"{folder}/*"], library_name="kolors"
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KolorsError(f"could not get {repo}/{folder} from the model hub: {first_line}") from None
    return Path(root) / folder


def read_adapter_file(file: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(image projection, attention projections) of an adapter file: a pickle of {"image_proj": {...},
    "ip_adapter" or "adapter_modules": {...}} read with weights_only=True, or a safetensors file whose keys carry
    those names as prefixes."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            flat = load_file(str(file))
            state: dict = {}
            for key, tensor in flat.items():
                group, _, rest = key.partition(".")
                state.setdefault(group, {})[rest] = tensor
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a short file, a bad header, a pickle with code in it: one message
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KolorsError(f"adapter file {file} is truncated or corrupt ({detail[:200]})") from None
    attn = state.get("ip_adapter", state.get("adapter_modules")) if isinstance(state, dict) else None
    proj = state.get("image_proj") if isinstance(state, dict) else None
    if not isinstance(proj, dict) or not isinstance(attn, dict):
        raise KolorsError(
            f"adapter file {file} lacks 'image_proj' and 'ip_adapter' weights; it is not an IP-Adapter file"
        )
    return proj, attn


# ---------------------------------------------------------------------------------------------- the adapter


def block_names(unet: UNet2DConditionModel) -> list[str]:
    """Each BasicTransformerBlock's module name, in ContextCache order."""
    names = {id(m): n for n, m in unet.named_modules()}
    return [names[id(b)] for b in unet.transformer_blocks()]


def diffusers_order(names: list[str]) -> list[int]:
    """Indices of `names` in the order of diffusers' `attn_processors`, which the adapter files number: diffusers'
    UNet registers down_blocks, then up_blocks, then mid_block."""
    rank = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
    return sorted(range(len(names)), key=lambda i: rank[names[i].partition(".")[0]])


class ImagePromptAdapter:
    """One loaded adapter: its image projection, each cross-attention's to_k_ip / to_v_ip (in ContextCache order)
    and the scale of each block."""

    def __init__(
        self, file: Path, kind: str, proj: nn.Module, kv_weights: list[tuple[Tensor, Tensor]], names
    ):
        self.file, self.kind, self.proj = file, kind, proj
        self.kv_weights, self.names = kv_weights, names
        self.scales = [1.0] * len(kv_weights)
        self.scale_setting: float | dict = 1.0

    @property
    def token_dim(self) -> int:
        """Width of the image features the projection reads (CLIP's hidden size)."""
        proj = self.proj.perceiver_resampler if isinstance(self.proj, ProjPlusModel) else self.proj
        return proj.proj_in.in_features

    def set_scale(self, scale: float | dict, unet: UNet2DConditionModel) -> None:
        self.scales = expand_scales(scale, self.names, unet)
        self.scale_setting = scale

    def kv(self, unet: UNet2DConditionModel, tokens: Tensor) -> list[tuple[Tensor, Tensor] | None]:
        """Per cross-attention, the image tokens' (keys, values times the block's scale) (B, nh, N, hs), or None
        for a block at scale 0. FaceID's tokens pass through the UNet's text projection first."""
        if self.kind == "faceid" and unet.encoder_hid_proj is not None:
            tokens = unet.encoder_hid_proj(tokens)
        out = []
        for block, (wk, wv), scale in zip(
            unet.transformer_blocks(), self.kv_weights, self.scales, strict=True
        ):
            if scale == 0:
                out.append(None)
                continue
            wk, wv = wk.to(tokens.device, tokens.dtype), wv.to(tokens.device, tokens.dtype)
            attn = block.attn2
            out.append(
                (attn.split_heads(F.linear(tokens, wk)), attn.split_heads(F.linear(tokens, wv) * scale))
            )
        return out


def load_adapter(
    file: Path,
    unet: UNet2DConditionModel,
    *,
    kind: str,
    image_dim: int | None,
    text_dim: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> ImagePromptAdapter:
    """Read and check an adapter file against this UNet (and the image encoder's width `image_dim`): a file that
    does not fit is one error naming the tensor, its shape and the fix, before anything changes."""
    proj_state, attn_state = read_adapter_file(file)
    is_faceid = "perceiver_resampler.proj_in.weight" in proj_state
    if kind == "plus" and is_faceid:
        raise KolorsError(f"{file} is a FaceID-Plus adapter; load it with load_faceid (CLI: --faceid)")
    if kind == "faceid" and not is_faceid:
        raise KolorsError(
            f"{file} is not a FaceID-Plus adapter; load it with load_ip_adapter (CLI: --ip-adapter)"
        )
    try:
        if kind == "plus":
            if "latents" not in proj_state:
                raise KolorsError(
                    f"{file} is not an IP-Adapter-Plus file (its image projection has no resampler latents); "
                    "kolors runs Kolors-IP-Adapter-Plus and FaceID-Plus"
                )
            proj: nn.Module = Resampler(ResamplerConfig.from_weights(proj_state))
            token_width = proj.proj_out.out_features
            want_width = unet.config.cross_attention_dim
        else:
            cfg = ResamplerConfig.from_weights(proj_state, "perceiver_resampler.")
            id_dim = proj_state["proj.0.weight"].shape[1]
            proj = ProjPlusModel(id_dim, proj_state["proj.2.weight"].shape[0] // cfg.dim, cfg)
            token_width = cfg.dim
            want_width = text_dim or unet.config.cross_attention_dim
    except KeyError as e:
        raise KolorsError(
            f"adapter file {file} lacks the image projection weight {e}; the file is incomplete"
        ) from None
    _check_shapes(file, proj, proj_state)
    if token_width != want_width:
        raise KolorsError(
            f"adapter {file.name} makes image tokens {token_width} wide but this model needs {want_width}: it is "
            "for another base model (an SDXL adapter?); use a Kolors IP-Adapter"
        )
    in_width = proj.perceiver_resampler.proj_in.in_features if kind == "faceid" else proj.proj_in.in_features
    if image_dim is not None and in_width != image_dim:
        raise KolorsError(
            f"adapter {file.name} reads image features {in_width} wide but the image encoder gives {image_dim}: "
            "the adapter is for another image encoder (an SDXL adapter with ViT-bigG?); use a Kolors IP-Adapter "
            "with its own image_encoder/"
        )
    proj.load_state_dict(proj_state, strict=True, assign=True)
    proj = proj.to(device, dtype).eval().requires_grad_(False)

    names = block_names(unet)
    order = diffusers_order(names)
    kv_weights: list = [None] * len(names)
    cross = unet.config.cross_attention_dim
    for n, i in enumerate(order):
        key_id = 2 * n + 1
        pair = []
        for which in ("to_k_ip", "to_v_ip"):
            key = f"{key_id}.{which}.weight"
            if key not in attn_state:
                raise KolorsError(
                    f"adapter {file.name} lacks '{key}' for {names[i]}: it is for a UNet with fewer "
                    "cross-attentions (another base model); use a Kolors IP-Adapter"
                )
            want = (unet.get_submodule(names[i]).attn2.to_q.out_features, cross)
            if tuple(attn_state[key].shape) != want:
                raise KolorsError(
                    f"adapter {file.name}: '{key}' has shape {tuple(attn_state[key].shape)} but {names[i]} needs "
                    f"{want}; the adapter is for another base model (SDXL?); use a Kolors IP-Adapter"
                )
            pair.append(attn_state[key].to(device, dtype))
        kv_weights[i] = tuple(pair)
    extra = sorted(
        set(attn_state)
        - {f"{2 * n + 1}.{w}.weight" for n in range(len(names)) for w in ("to_k_ip", "to_v_ip")}
    )
    if extra:
        raise KolorsError(
            f"adapter {file.name} has {len(extra)} attention weight(s) this UNet has no place for, e.g. '{extra[0]}'; "
            "it is for another base model; use a Kolors IP-Adapter"
        )
    return ImagePromptAdapter(file, kind, proj, kv_weights, names)


def _check_shapes(file: Path, model: nn.Module, state: dict[str, Tensor]) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        what = "lacks" if missing else "has an unknown"
        raise KolorsError(
            f"adapter file {file}: its image projection {what} tensor '{key}'; the file is not a Kolors adapter"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise KolorsError(
                f"adapter file {file}: '{key}' has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}"
            )


def check_image_encoder(image_size: int, hidden_size: int) -> None:
    """Kolors' adapters read CLIP ViT-L/14 at 336 px; its 224-px sibling is the usual wrong download."""
    if hidden_size == CLIP_L_HIDDEN and image_size != KOLORS_CLIP_IMAGE_SIZE:
        tokens = (image_size // 14) ** 2 + 1
        raise KolorsError(
            f"the image encoder reads {image_size}-px images ({tokens} tokens) but Kolors' IP-Adapters were trained "
            f"on CLIP ViT-L/14 at {KOLORS_CLIP_IMAGE_SIZE} px (577 tokens); use the adapter repo's image_encoder/ "
            "(openai/clip-vit-large-patch14-336)"
        )


# ---------------------------------------------------------------------------------------------- scales


def expand_scales(scale: float | dict, names: list[str], unet: UNet2DConditionModel) -> list[float]:
    """A scale per cross-attention block from one number or diffusers' per-block dict (InstantStyle):
    {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}, "mid": 0.0}, lists giving one scale per
    attention of a block; parts and blocks not named get 0, as in diffusers."""
    if not isinstance(scale, dict):
        _check_number(scale, "the IP-Adapter scale")
        return [float(scale)] * len(names)
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise KolorsError(
            f"IP-Adapter scale keys are 'down', 'mid' and 'up', not {', '.join(sorted(unknown))}"
        )
    blocks = {
        "down": {i: len(b.attentions) for i, b in enumerate(unet.down_blocks) if b.attentions is not None},
        "up": {i: len(b.attentions) for i, b in enumerate(unet.up_blocks) if b.attentions is not None},
    }
    for part in ("down", "up"):
        value = scale.get(part, 0.0)
        if isinstance(value, dict):
            for key, v in value.items():
                m = re.fullmatch(r"block_(\d+)", str(key))
                if m is None or int(m.group(1)) not in blocks[part]:
                    have = ", ".join(f"block_{i}" for i in blocks[part])
                    raise KolorsError(f"IP-Adapter scale: {part} has no {key!r} with attentions; use {have}")
                _scale_list(v, blocks[part][int(m.group(1))], f"{part}.{key}")
        else:
            _scale_list(value, 1, part)
    _scale_list(scale.get("mid", 0.0), 1, "mid")

    out = []
    for name in names:
        parts = name.split(".")
        if parts[0] == "mid_block":
            value, index = scale.get("mid", 0.0), 0
        else:
            part = parts[0].removesuffix("_blocks")
            value, index = scale.get(part, 0.0), int(parts[3])
            if isinstance(value, dict):
                value = value.get(f"block_{parts[1]}", 0.0)
        if isinstance(value, (list, tuple)):
            value = value[index] if len(value) > 1 else value[0]
        out.append(float(value))
    return out


def _scale_list(value, count: int, where: str) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and len(values) not in (1, count):
        raise KolorsError(
            f"IP-Adapter scale {where}: {len(values)} scales for {count} attentions; give 1 or {count}"
        )
    for v in values:
        _check_number(v, f"IP-Adapter scale {where}")


def _check_number(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KolorsError(f"{what} must be a number, not {value!r}")
