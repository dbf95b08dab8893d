"""The original SGM names of the SDXL-style UNet (Stability's generative-models, which kohya's SDXL LoRAs and
single-file community fine-tunes use) and diffusers' names for the same layers, for one UNet config.

SGM numbers the UNet's layers in three flat lists: `input_blocks.i.j`, `middle_block.j`, `output_blocks.i.j`;
diffusers nests them by level (`down_blocks.1.attentions.0`). The table is built from the config, not assumed.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from kolors.models.unet import UNetConfig


def sgm_blocks(config: UNetConfig) -> dict[tuple[str, int, int], str]:
    """(SGM block list, block index, layer index) -> the diffusers module it is, for this UNet config: the original
    SGM UNet numbers its layers in three flat lists (input_blocks.i.j, middle_block.j, output_blocks.i.j; the
    middle block's entries are (middle_block, j, 0))."""
    levels, layers = len(config.block_out_channels), config.layers
    cross_down = [t == "CrossAttnDownBlock2D" for t in config.down_block_types]
    cross_up = [t == "CrossAttnUpBlock2D" for t in config.up_block_types]
    table = {("input_blocks", 0, 0): "conv_in"}
    i = 1
    for level in range(levels):
        for j in range(layers[level]):
            table["input_blocks", i, 0] = f"down_blocks.{level}.resnets.{j}"
            if cross_down[level]:
                table["input_blocks", i, 1] = f"down_blocks.{level}.attentions.{j}"
            i += 1
        if level < levels - 1:
            table["input_blocks", i, 0] = f"down_blocks.{level}.downsamplers.0"
            i += 1
    for j, name in enumerate(("resnets.0", "attentions.0", "resnets.1")):
        table["middle_block", j, 0] = f"mid_block.{name}"
    i = 0
    for up in range(levels):
        n = layers[levels - 1 - up] + 1
        for j in range(n):
            table["output_blocks", i, 0] = f"up_blocks.{up}.resnets.{j}"
            if cross_up[up]:
                table["output_blocks", i, 1] = f"up_blocks.{up}.attentions.{j}"
            if j == n - 1 and up < levels - 1:
                table["output_blocks", i, 1 + cross_up[up]] = f"up_blocks.{up}.upsamplers.0"
            i += 1
    return table


# SGM names inside a block, and outside the three lists -> diffusers' names.
_SGM_INNER = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
    "op": "conv",
}
_SGM_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def sgm_to_diffusers(key: str, blocks: dict[tuple[str, int, int], str], sep: str = ".") -> str:
    """An SGM UNet key (`input_blocks.4.1.proj_in.weight`, or kohya's `input_blocks_4_1_proj_in` with sep="_")
    as diffusers names it (`down_blocks.1.attentions.0.proj_in.weight`); any other key as it is."""
    s = re.escape(sep)
    m = re.fullmatch(rf"(input_blocks|output_blocks){s}(\d+){s}(\d+)(?:{s}(.*))?", key)
    # The middle block is one flat list: `middle_block.1.…` is its transformer.
    m = m or re.fullmatch(rf"(middle_block){s}(\d+)()(?:{s}(.*))?", key)
    if m is None:
        for old, new in _SGM_TOP.items():
            old = old.replace(".", sep)
            if key == old or key.startswith(old + sep):
                return new.replace(".", sep) + key[len(old) :]
        return key
    kind, index, layer, rest = m[1], int(m[2]), int(m[3] or 0), m[4]
    module = blocks.get((kind, index, layer))
    if module is None:
        return key  # not a layer of this config: the caller reports it
    if module == "conv_in" or rest is None:
        return sep.join(filter(None, [module.replace(".", sep), rest]))
    for old, new in _SGM_INNER.items():
        old = old.replace(".", sep)
        if rest == old or rest.startswith(old + sep):
            rest = new.replace(".", sep) + rest[len(old) :]
            break
    return module.replace(".", sep) + sep + rest


SGM_PREFIX = "model.diffusion_model."


def unet_keys_transform(config: UNetConfig) -> Callable[[dict], dict]:
    """The key transform of a single-file UNet (a community fine-tune): diffusers' keys as they are, the original
    SGM keys (`model.diffusion_model.input_blocks.…`) mapped to diffusers' for this config."""
    blocks = sgm_blocks(config)

    def transform(state: dict) -> dict:
        out = {}
        for key, value in state.items():
            if key.startswith(SGM_PREFIX):
                out[sgm_to_diffusers(key.removeprefix(SGM_PREFIX), blocks)] = value
            elif not key.startswith(("first_stage_model.", "conditioner.", "cond_stage_model.")):
                out[key] = value  # a full SGM checkpoint's VAE and text encoder are not the UNet's
        return out

    return transform
