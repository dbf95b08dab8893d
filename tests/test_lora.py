"""LoRAs against diffusers' KolorsPipeline.load_lora_weights on the same files, and taken back bit for bit.

The LoRAs are made with PEFT (LoraConfig, inject_adapter_in_model, get_peft_model_state_dict) on copies of the tiny
reference's models and saved by diffusers' own save_lora_weights; the kohya files are written here from the same
tensors, in diffusers' module names and in the original SGM ones.
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import kolors.pipeline
from kolors import KolorsError, KolorsPipeline
from kolors.config import load_config
from kolors.models.sgm import sgm_blocks
from kolors.models.unet import UNetConfig
from tests.test_pipeline import assert_close

SIZE = dict(height=64, width=64)
CALL = dict(prompt="a watercolor fox", **SIZE, num_inference_steps=2, guidance_scale=5.0, output_type="np")
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def gen() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(11)


def peft_lora(model: torch.nn.Module, targets: list[str], r: int, alpha: float, seed: int):
    """PEFT's LoRA state dict and config for `targets` of a copy of `model`, with random (non-zero) weights."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets)
    model = inject_adapter_in_model(config, copy.deepcopy(model))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3 / p.shape[1] ** 0.5
    return get_peft_model_state_dict(model), config


def kohya(state: dict[str, torch.Tensor], alpha: float | None, rename=lambda m: m) -> dict:
    """PEFT `<module>.lora_A.weight` / `lora_B` as kohya's `lora_unet_<module>.lora_down/up.weight` (+ alpha)."""
    out = {}
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".lora_")
        name = "lora_unet_" + rename(module).replace(".", "_")
        out[f"{name}.lora_{'down' if kind == 'A.weight' else 'up'}.weight"] = tensor.contiguous()
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def sgm_names(config) -> dict[str, str]:
    """diffusers module -> SGM module (the middle block is one flat list: middle_block.1)."""
    return {
        v: f"{kind}.{i}" if kind == "middle_block" else f"{kind}.{i}.{j}"
        for (kind, i, j), v in sgm_blocks(config).items()
    }


def to_sgm(module: str, config) -> str:
    """A diffusers UNet module name in the original SGM numbering (the inverse of kolors.models.sgm's table)."""
    inverse = sgm_names(config)
    for prefix, sgm in sorted(inverse.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            rest = module[len(prefix) :]
            return sgm + {".conv1": ".in_layers.2", ".conv2": ".out_layers.3"}.get(rest, rest)
    return module


@pytest.fixture(scope="module")
def loras(reference_pipeline, tiny_model_dir, tmp_path_factory):
    """LoRA files (by name) made by PEFT and saved by diffusers, plus kohya files from the same tensors."""
    from diffusers import KolorsPipeline as DiffusersKolors
    from diffusers.utils import convert_state_dict_to_diffusers

    root = tmp_path_factory.mktemp("loras")
    unet, te = reference_pipeline.unet, reference_pipeline.text_encoder
    files = {}
    ink, ink_config = peft_lora(unet, ATTENTION, r=4, alpha=8, seed=1)  # scale 2, from the metadata
    DiffusersKolors.save_lora_weights(
        root / "ink", unet_lora_layers=ink, unet_lora_adapter_metadata=ink_config.to_dict()
    )
    files["ink"] = root / "ink" / "pytorch_lora_weights.safetensors"
    # The official Kolors script's format: convert_state_dict_to_diffusers, `.lora.down/.lora.up`, no alpha.
    cat, _ = peft_lora(unet, ATTENTION, r=8, alpha=8, seed=2)
    DiffusersKolors.save_lora_weights(root / "cat", unet_lora_layers=convert_state_dict_to_diffusers(cat))
    files["cat"] = root / "cat" / "pytorch_lora_weights.safetensors"
    # LoCon: the resnets' convolutions and time projections too, and the transformers' other linears.
    others = ["conv1", "conv2", "time_emb_proj", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "to_v"]
    conv, _ = peft_lora(unet, others, r=4, alpha=4, seed=3)
    save_file(kohya(conv, alpha=2), root / "locon.safetensors")
    files["locon"] = root / "locon.safetensors"
    save_file(kohya(ink, alpha=8), root / "ink_kohya.safetensors")
    files["ink_kohya"] = root / "ink_kohya.safetensors"
    config = load_config(UNetConfig, tiny_model_dir / "unet" / "config.json")
    sgm = kohya(ink, alpha=8, rename=lambda m: to_sgm(m, config))
    assert any("input_blocks_4_1" in k for k in sgm)
    save_file(sgm, root / "ink_sgm.safetensors")
    files["ink_sgm"] = root / "ink_sgm.safetensors"
    text, text_config = peft_lora(te, ["query_key_value"], r=4, alpha=4, seed=4)
    DiffusersKolors.save_lora_weights(
        root / "text", text_encoder_lora_layers=text, text_encoder_lora_adapter_metadata=text_config.to_dict()
    )
    files["text"] = root / "text" / "pytorch_lora_weights.safetensors"
    torch.save({f"unet.{k}": v for k, v in ink.items()}, root / "ink.bin")  # pickled
    files["ink_bin"] = root / "ink.bin"
    return files


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    p = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def base_image(pipe):
    return pipe(**CALL, generator=gen()).images


@pytest.fixture
def lora_pipe(pipe, base_image):
    """The shared pipeline, its LoRAs unloaded after each test (checked: the base model, bit for bit)."""
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    yield pipe
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert not any(getattr(m, "lora", None) for m in (*pipe.unet.modules(), *pipe.text_encoder.modules()))


@pytest.fixture
def ref(reference_pipeline):
    """A copy of diffusers' tiny pipeline to load LoRAs into (the shared one stays clean)."""
    r = copy.deepcopy(reference_pipeline)
    r.set_progress_bar_config(disable=True)
    return r


def images(p, **kwargs):
    return p(**{**CALL, **kwargs}, generator=gen()).images


# ------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["ink", "cat", "locon", "ink_kohya", "ink_bin"])
def test_one_lora_matches_diffusers(lora_pipe, ref, loras, base_image, name):
    ref.load_lora_weights(str(loras[name]), adapter_name=name)
    ref.set_adapters([name], adapter_weights=[0.8])
    assert lora_pipe.load_lora_weights(loras[name], adapter_name=name) == name
    lora_pipe.set_adapters([name], adapter_weights=[0.8])
    ours, theirs = images(lora_pipe), images(ref)
    assert_close(ours, theirs)
    assert np.abs(ours - base_image).max() > 0.02  # the LoRA changes the image


def test_text_encoder_lora_matches_peft_on_diffusers(lora_pipe, ref, loras, base_image):
    """diffusers' load_lora_weights reads CLIP text encoders only; the official Kolors inference applies the text
    encoder's LoRA with PEFT itself (PeftModel.from_pretrained), so PEFT on diffusers' encoder is the reference."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    state = {k.removeprefix("text_encoder."): v for k, v in _read(loras["text"]).items()}
    inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=4, target_modules=["query_key_value"]), ref.text_encoder
    )
    set_peft_model_state_dict(ref.text_encoder, state)
    lora_pipe.load_lora_weights(loras["text"], adapter_name="text")
    ours = images(lora_pipe)
    assert_close(ours, images(ref))
    assert np.abs(ours - base_image).max() > 0.02


def test_sgm_kohya_matches_diffusers_with_unet_config(lora_pipe, ref, loras):
    ref.load_lora_weights(str(loras["ink_sgm"]), adapter_name="a", unet_config=ref.unet.config)
    lora_pipe.load_lora_weights(loras["ink_sgm"], adapter_name="a")
    assert_close(images(lora_pipe), images(ref))
    lora_pipe.load_lora_weights(loras["ink_kohya"], adapter_name="b")  # the same LoRA in diffusers' names
    np.testing.assert_array_equal(images(lora_pipe), images(lora_pipe.set_adapters("a") or lora_pipe))


def test_two_loras_mixed_and_per_call_scale_match_diffusers(lora_pipe, ref, loras, base_image):
    for p in (ref, lora_pipe):
        p.load_lora_weights(str(loras["ink"]), adapter_name="ink")
        p.load_lora_weights(str(loras["cat"]), adapter_name="cat")
        assert p.get_active_adapters() == ["cat"]  # the last one loaded, as diffusers
        p.set_adapters(["ink", "cat"], adapter_weights=[0.8, 0.5])
    assert lora_pipe.get_active_adapters() == ["ink", "cat"]
    assert_close(images(lora_pipe), images(ref))
    kwargs = dict(cross_attention_kwargs={"scale": 0.7})
    assert_close(images(lora_pipe, **kwargs), images(ref, **kwargs))
    # A scale of 0, disabled: exactly the base image.
    lora_pipe.set_adapters(["ink", "cat"], adapter_weights=[0.0, 0.0])
    np.testing.assert_array_equal(images(lora_pipe), base_image)
    lora_pipe.set_adapters(["ink", "cat"], adapter_weights=[0.8, 0.5])
    lora_pipe.disable_lora()
    np.testing.assert_array_equal(images(lora_pipe), base_image)
    lora_pipe.enable_lora()
    assert_close(images(lora_pipe), images(ref))


def test_fuse_matches_diffusers_and_unfuse_is_exact(lora_pipe, ref, loras, base_image):
    unfused = {k: v.clone() for k, v in lora_pipe.unet.state_dict().items()}
    for p in (ref, lora_pipe):
        p.load_lora_weights(str(loras["ink"]), adapter_name="ink")
        p.load_lora_weights(str(loras["locon"]), adapter_name="locon")
        p.set_adapters(["ink", "locon"], adapter_weights=[0.6, 1.0])
    before = images(lora_pipe)
    ref.fuse_lora(lora_scale=0.9)
    lora_pipe.fuse_lora(lora_scale=0.9)
    assert_close(images(lora_pipe), images(ref))
    lora_pipe.unfuse_lora()
    assert all(torch.equal(lora_pipe.unet.state_dict()[k], v) for k, v in unfused.items())
    np.testing.assert_array_equal(images(lora_pipe), before)  # unfused again: the same terms are back
    lora_pipe.unload_lora_weights()
    np.testing.assert_array_equal(images(lora_pipe), base_image)


def test_text_encoder_lora_reaches_the_cached_and_streamed_encoder(lora_pipe, tiny_model_dir, loras):
    before = lora_pipe.encode_prompt("a cat").prompt_embeds
    lora_pipe.load_lora_weights(loras["text"], adapter_name="text")
    after = lora_pipe.encode_prompt("a cat").prompt_embeds  # not the cached embeddings of the base encoder
    assert (after - before).abs().max() > 1e-3
    low = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu", memory="low")
    low.load_lora_weights(loras["text"], adapter_name="text")
    torch.testing.assert_close(low.encode_prompt("a cat").prompt_embeds, after)
    with pytest.raises(KolorsError, match="streamed"):
        low.fuse_lora()


def test_quantized_text_encoder_refuses_a_text_lora_only(tiny_model_dir, loras):
    q = KolorsPipeline.from_pretrained(
        tiny_model_dir, dtype=torch.float32, device="cpu", text_encoder_quant="int8"
    )
    with pytest.raises(KolorsError, match=r"text-encoder LoRA; this text encoder is quantized \(int8\)"):
        q.load_lora_weights(loras["text"])
    assert q.get_list_adapters() == []
    q.load_lora_weights(loras["ink"])


def test_set_loras_switches_without_reloading(lora_pipe, loras, base_image):
    lora_pipe.set_loras([(str(loras["ink"]), 0.8), (str(loras["cat"]), 0.5)])
    mixed = images(lora_pipe)
    weights = lora_pipe.unet.state_dict(keep_vars=True)
    lora_pipe.set_loras([(str(loras["cat"]), 0.5)])
    lora_pipe.set_loras([(str(loras["ink"]), 0.8), (str(loras["cat"]), 0.5)])
    np.testing.assert_array_equal(images(lora_pipe), mixed)
    assert all(v is weights[k] for k, v in lora_pipe.unet.state_dict(keep_vars=True).items())  # untouched
    assert len(lora_pipe.get_list_adapters()) == 2
    lora_pipe.set_loras([])
    np.testing.assert_array_equal(images(lora_pipe), base_image)
    lora_pipe.set_loras([(str(loras["ink"]), 1.0)])
    data = loras["ink"].read_bytes()  # A1111's addnet hash: the bytes after the safetensors header
    sha = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
    assert lora_pipe.lora_hashes() == [(str(loras["ink"]), sha[:12])]


def test_lora_from_a_folder_or_a_hub_repo(lora_pipe, loras, tmp_path, monkeypatch):
    """A folder gives diffusers' pytorch_lora_weights.safetensors, its one weight file or `weight_name`; a hub id
    goes through huggingface_hub's cache (faked here: no network in tests), its failure one clear line."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from kolors.adapters.lora import find_lora_file

    assert find_lora_file(loras["ink"].parent) == loras["ink"]
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "style.safetensors").write_bytes(loras["cat"].read_bytes())
    assert find_lora_file(tmp_path / "one") == tmp_path / "one" / "style.safetensors"
    (tmp_path / "one" / "other.safetensors").write_bytes(loras["cat"].read_bytes())
    with pytest.raises(KolorsError, match="has other.safetensors, style.safetensors; pass weight_name="):
        find_lora_file(tmp_path / "one")
    assert lora_pipe.load_lora_weights(tmp_path / "one", weight_name="style.safetensors") == "default_0"
    asked = []

    def download(repo, filename, **kwargs):
        asked.append((repo, filename))
        if repo == "someone/missing":
            raise LocalEntryNotFoundError("no such file in the cache and no connection")
        return str(loras["ink"])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert lora_pipe.load_lora_weights("someone/ink-lora", adapter_name="ink") == "ink"
    assert asked == [("someone/ink-lora", "pytorch_lora_weights.safetensors")]
    with pytest.raises(
        KolorsError, match="could not get LoRA 'someone/missing' from the model hub: no such file"
    ):
        lora_pipe.load_lora_weights("someone/missing", adapter_name="missing")
    assert lora_pipe.get_list_adapters() == ["default_0", "ink"]


# ------------------------------------------------------------------------------------------------- fast paths


def test_low_memory_mode_with_a_unet_lora_matches_normal_mode(lora_pipe, tiny_model_dir, loras):
    """memory="low" (the text encoder streamed a layer at a time, no prompt cache): a UNet LoRA gives normal
    mode's image, fuses (the UNet is not streamed) and unfuses bit for bit."""
    low = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu", memory="low")
    low.set_progress_bar_config(disable=True)
    for p in (low, lora_pipe):
        p.load_lora_weights(loras["ink"], adapter_name="ink")
        p.set_adapters(["ink"], [0.8])
    expected = images(lora_pipe)
    np.testing.assert_array_equal(images(low), expected)
    weights = {k: v.clone() for k, v in low.unet.state_dict().items()}
    low.fuse_lora()
    assert_close(images(low), expected)
    low.unfuse_lora()
    assert all(torch.equal(low.unet.state_dict()[k], v) for k, v in weights.items())
    np.testing.assert_array_equal(images(low), expected)


def test_int8_text_encoder_with_a_unet_lora(lora_pipe, tiny_model_dir, loras):
    """The int8 text encoder takes no text LoRA (tested above) but a UNet LoRA works as on the float model: the
    same image as the float pipeline given the int8 encoder's embeddings, fused or not."""
    q = KolorsPipeline.from_pretrained(
        tiny_model_dir, dtype=torch.float32, device="cpu", text_encoder_quant="int8"
    )
    q.set_progress_bar_config(disable=True)
    base = images(q)
    embeds = q.encode_prompt(CALL["prompt"])
    for p in (q, lora_pipe):
        p.load_lora_weights(loras["ink"], adapter_name="ink")
        p.set_adapters(["ink"], [0.8])
    ours = images(q)
    assert np.abs(ours - base).max() > 0.02
    call = {k: v for k, v in CALL.items() if k != "prompt"}
    np.testing.assert_array_equal(ours, lora_pipe(**call, prompt_embeds=embeds, generator=gen()).images)
    q.fuse_lora()
    assert_close(images(q), ours)
    q.unfuse_lora()
    np.testing.assert_array_equal(images(q), ours)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_loras_on_packed_weights(tiny_model_dir, loras, monkeypatch):
    """Packed weights (oneDNN's layout: the pipeline packs every one for bf16 where the CPU has it, the linears
    for float32 on x86; the convolutions are packed here too, in float32, which any x86 CPU runs) against plain
    ones: the terms join the packed linears, convolutions and GEGLU projections through the same seam; fusing
    reads the plain weights again and packs the sums; unfusing puts the very same packed tensors back."""
    from kolors.models.layers import Conv2d, pack_weights

    packed = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    pack_weights(
        packed.unet
    )  # the linears, where from_pretrained has not; float32's pass leaves convolutions
    for conv in (m for m in packed.unet.modules() if isinstance(m, Conv2d)):
        conv.pack()
    monkeypatch.setattr(kolors.pipeline, "packs", lambda device, dtype: False)
    plain = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    assert packed.unet.conv_in.weight.is_mkldnn and not plain.unet.conv_in.weight.is_mkldnn
    assert not plain.unet.down_blocks[1].attentions[0].proj_in.weight.is_mkldnn
    for p in (packed, plain):
        p.set_progress_bar_config(disable=True)
    for p in (packed, plain):
        p.load_lora_weights(loras["ink"], adapter_name="ink")
        p.load_lora_weights(loras["locon"], adapter_name="locon")  # convolutions, GEGLU's proj, ff.net.2
        p.set_adapters(["ink", "locon"], adapter_weights=[0.6, 1.0])
    before = images(packed)
    assert_close(before, images(plain))
    tensors = dict(packed.unet.named_buffers()) | dict(packed.unet.named_parameters())
    for p in (packed, plain):
        p.fuse_lora(lora_scale=0.9)
    assert packed.unet.down_blocks[1].attentions[0].proj_in.weight.is_mkldnn  # packed again after the sum
    assert_close(images(packed), images(plain))
    for p in (packed, plain):
        p.unfuse_lora()
    after = dict(packed.unet.named_buffers()) | dict(packed.unet.named_parameters())
    assert after.keys() == tensors.keys() and all(after[k] is v for k, v in tensors.items())
    np.testing.assert_array_equal(images(packed), before)


@pytest.mark.slow
def test_compiled_unet_with_unfused_loras_and_switches(lora_pipe, tiny_model_dir, loras):
    """compile=True with LoRAs unfused: the compiled UNet gives the eager images with one LoRA, after a switch to
    two, after a change of scales and back. A change of scales reuses the compiled code; a set of another total
    rank compiles once more (its shapes become dynamic), then no more. Two Inductor compilations: 14 minutes on
    this project's loaded 2-core machine, hence slow."""
    from torch._dynamo.utils import counters

    start = counters["stats"]["unique_graphs"]

    compiled = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu", compile=True)
    compiled.set_progress_bar_config(disable=True)
    for p in (compiled, lora_pipe):
        p.load_lora_weights(loras["ink"], adapter_name="ink")
        p.load_lora_weights(loras["cat"], adapter_name="cat")
    frames = []
    for names, weights in [(["ink"], [0.8]), (["ink", "cat"], [0.3, 0.6]), (["ink", "cat"], [0.5, 0.2]),
                           (["ink"], [0.8]), (["ink"], [0.4])]:  # fmt: skip
        for p in (compiled, lora_pipe):
            p.set_adapters(names, weights)
        assert_close(images(compiled), images(lora_pipe))
        frames.append(counters["stats"]["unique_graphs"])
    assert frames[2] == frames[1] and frames[4] == frames[3], frames  # new scales: no new graph
    assert frames[-1] - start <= 2, frames


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_loras_are_one_clear_error_and_change_nothing(lora_pipe, loras, tmp_path, base_image):
    lora_pipe.load_lora_weights(loras["ink"], adapter_name="ink")
    good = images(lora_pipe)
    sdxl = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)}
    save_file(sdxl, tmp_path / "sdxl.safetensors")
    first = sorted(k for k in _read(loras["ink"]) if k.endswith("lora_A.weight"))[0]
    wrong = _read(loras["ink"])
    wrong[first] = torch.zeros(4, 3)  # the first key checked may be another; one is enough
    save_file(wrong, tmp_path / "wrong.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(loras["ink"].read_bytes()[:300])
    cases = {
        tmp_path
        / "sdxl.safetensors": "'lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight' matches no",
        tmp_path / "wrong.safetensors": f"'{first.removesuffix('.lora_A.weight')}' down has shape (4, 3)",
        corrupt: "is truncated or corrupt",
        tmp_path / "missing.safetensors": "LoRA file not found",
    }
    for file, message in cases.items():
        with pytest.raises(KolorsError) as e:
            lora_pipe.load_lora_weights(file, adapter_name="bad")
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
        if file.exists():
            assert str(file) in str(e.value)
    for call, message in [
        (lambda: lora_pipe.set_adapters(["nope"]), "unknown adapter 'nope'; loaded: ink"),
        (lambda: lora_pipe.set_adapters(["ink"], [-0.5]), "must be a finite number >= 0"),
        (lambda: lora_pipe.set_adapters(["ink"], [float("nan")]), "must be a finite number >= 0"),
        (lambda: lora_pipe.fuse_lora(lora_scale=float("inf")), "lora_scale must be a finite number"),
        (lambda: lora_pipe(**CALL, cross_attention_kwargs={"scale": -1}), "scale must be a finite number"),
        (lambda: lora_pipe.load_lora_weights(loras["cat"], adapter_name="ink"), "already loaded"),
    ]:
        with pytest.raises(KolorsError, match=message):
            call()
    assert lora_pipe.get_list_adapters() == ["ink"] and lora_pipe.get_active_adapters() == ["ink"]
    np.testing.assert_array_equal(images(lora_pipe), good)


def test_loras_for_other_models_bad_values_and_bad_sets_change_nothing(lora_pipe, loras, tmp_path):
    """The issue's other bad inputs: SDXL's text_encoder_2 beside keys that fit, an SD1.5 UNet key, non-finite
    values, a .bin that is no pickle; and set_loras with an unknown name, a bad scale or a bad file after a good
    one, which loads nothing (the good file is not left loaded)."""
    lora_pipe.load_lora_weights(loras["ink"], adapter_name="ink")
    good = images(lora_pipe)
    ink = _read(loras["ink"])
    sdxl = {
        **ink,
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
    }
    sdxl["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(8, 4)
    save_file(sdxl, tmp_path / "sdxl_peft.safetensors")
    sd15 = (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # SDXL has no attention there
    )
    save_file({f"{sd15}.lora_down.weight": torch.zeros(4, 32), f"{sd15}.lora_up.weight": torch.zeros(32, 4)},
              tmp_path / "sd15.safetensors")  # fmt: skip
    nan = dict(ink)
    key = sorted(k for k in nan if k.endswith("lora_B.weight"))[0]
    nan[key] = nan[key].clone()
    nan[key][0, 0] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"not a pickle at all")
    cases = {
        "sdxl_peft.safetensors": "'text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj' matches no layer",
        "sd15.safetensors": f"'{sd15}.lora_down.weight' matches no layer",
        "nan.safetensors": f"'{key.removesuffix('.lora_B.weight')}' has non-finite values",
        "junk.bin": "is truncated or corrupt",
    }
    for name, message in cases.items():
        with pytest.raises(KolorsError) as e:
            lora_pipe.load_lora_weights(tmp_path / name, adapter_name="bad")
        assert message in str(e.value) and str(tmp_path / name) in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
    terms = [m for m in lora_pipe.unet.modules() if getattr(m, "lora", None) is not None]
    for loras_, message in [
        ([("nope", 1.0)], "LoRA file not found: nope"),
        ([("ink", float("inf"))], "LoRA 'ink' scale must be a finite number >= 0"),
        ([("ink", -1)], "LoRA 'ink' scale must be a finite number >= 0"),
        ([(str(loras["cat"]), 0.5), (str(tmp_path / "sd15.safetensors"), 1.0)], "matches no layer"),
        ([(str(loras["cat"]), 0.5), (str(loras["cat"]), 0.7)], "adapter names repeat"),
    ]:
        with pytest.raises(KolorsError, match=message):
            lora_pipe.set_loras(loras_)
        assert lora_pipe.get_list_adapters() == ["ink"] and lora_pipe.get_active_adapters() == ["ink"]
    assert [m for m in lora_pipe.unet.modules() if getattr(m, "lora", None) is not None] == terms
    assert set(lora_pipe.loras._terms) == set(lora_pipe.loras.adapters["ink"].layers)
    np.testing.assert_array_equal(images(lora_pipe), good)


def _read(file) -> dict:
    from safetensors.torch import load_file

    return load_file(file)


# ------------------------------------------------------------------------------------------------- fine-tunes


def sgm_unet_state(unet, config: UNetConfig) -> dict[str, torch.Tensor]:
    """A diffusers UNet's weights in the original SGM keys, written here from diffusers' names."""
    top = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "conv_in": "input_blocks.0.0",
    }
    inner = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
             "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
    inverse = sgm_names(config)
    out = {}
    for key, tensor in unet.state_dict().items():
        module, _, param = key.rpartition(".")
        name = next((top[p] + module[len(p) :] for p in top if module.startswith(p)), None)
        if name is None:
            prefix = max((p for p in inverse if module.startswith(p + ".")), key=len, default=None)
            if prefix is None:
                name = module  # encoder_hid_proj: the same name in both
            else:
                rest = module[len(prefix) + 1 :]
                rest = inner.get(rest, "op" if rest == "conv" and "downsamplers" in prefix else rest)
                name = f"{inverse[prefix]}.{rest}"
        out[f"model.diffusion_model.{name}.{param}"] = tensor.clone()
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_single_file_unet_in_sgm_or_diffusers_keys(
    tiny_model_dir, reference_pipeline, tmp_path, dtype, monkeypatch
):
    monkeypatch.setattr(
        kolors.pipeline, "packs", lambda device, dtype: False
    )  # every weight in the state_dict
    unet = reference_pipeline.unet
    sgm = sgm_unet_state(unet, load_config(UNetConfig, tiny_model_dir / "unet" / "config.json"))
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in sgm
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in sgm
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in sgm
    save_file({k: v.to(dtype) for k, v in sgm.items()}, tmp_path / "sgm.safetensors")
    save_file({k: v.to(dtype).contiguous() for k, v in unet.state_dict().items()}, tmp_path / "d.safetensors")
    for file in ("sgm.safetensors", "d.safetensors"):
        p = KolorsPipeline.from_pretrained(
            tiny_model_dir, dtype=torch.float32, device="cpu", unet=tmp_path / file
        )
        ours = p.unet.state_dict()
        assert set(ours) == set(unet.state_dict())
        for key, value in unet.state_dict().items():
            assert torch.equal(ours[key], value.to(dtype).float()), key
    with pytest.raises(KolorsError, match="UNet file not found"):
        KolorsPipeline.from_pretrained(
            tiny_model_dir, dtype=torch.float32, device="cpu", unet=tmp_path / "no"
        )


def test_a1111_short_hash(tmp_path):
    from kolors.adapters.lora import lora_short_hash

    save_file(
        {"x": torch.zeros(2)}, tmp_path / "a.safetensors", metadata={"sshs_model_hash": "0123456789abcdef"}
    )
    assert (
        lora_short_hash(tmp_path / "a.safetensors") == "0123456789ab"
    )  # the trainer's own, as A1111 reads it
    torch.save({"x": torch.zeros(2)}, tmp_path / "b.bin")
    assert (
        lora_short_hash(tmp_path / "b.bin")
        == hashlib.sha256((tmp_path / "b.bin").read_bytes()).hexdigest()[:12]
    )
