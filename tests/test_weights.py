"""Finding and reading checkpoints: formats, variants, strict checks, clear errors, and what the hub downloads."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kolors import KolorsError
from kolors.config import load_config
from kolors.models.text_encoder import ChatGLMModel, TextEncoderConfig, checkpoint_keys_transform
from kolors.models.vae import AutoencoderKL, VAEConfig
from kolors.weights import (
    Checkpoint,
    build_on_meta,
    check_model_folder,
    load_weights,
    resolve_model,
    weight_files,
)
from kolors.weights import checkpoint as weights


def meta_vae(model_dir: Path) -> AutoencoderKL:
    return build_on_meta(lambda: AutoencoderKL(load_config(VAEConfig, model_dir / "vae" / "config.json")))


def meta_text_encoder(model_dir: Path) -> ChatGLMModel:
    return build_on_meta(lambda: ChatGLMModel(TextEncoderConfig.from_json(model_dir / "text_encoder")))


def vae_file(model_dir: Path) -> Path:
    return model_dir / "vae" / "diffusion_pytorch_model.safetensors"


def assert_same_state(a: torch.nn.Module, b: dict[str, torch.Tensor]) -> None:
    state = a.state_dict()
    assert set(state) == set(b)
    for key, tensor in state.items():
        assert tensor.dtype == b[key].dtype, key
        assert torch.equal(tensor, b[key]), key


@pytest.fixture(scope="module")
def vae_state(tiny_model_dir) -> dict[str, torch.Tensor]:
    return load_file(vae_file(tiny_model_dir))


# ---------------------------------------------------------------------------------------------------- reading


def test_load_gives_the_file_values(tiny_model_dir, vae_state):
    vae = load_weights(
        meta_vae(tiny_model_dir), [vae_file(tiny_model_dir)], dtype=torch.float32, device="cpu"
    )
    assert_same_state(vae, vae_state)


def test_conversion_rounds_as_torch_does(tiny_model_dir_fp16):
    """fp16 files read as bf16 and fp32: the values `.to(dtype)` gives, for every tensor."""
    file = tiny_model_dir_fp16 / "vae" / "diffusion_pytorch_model.fp16.safetensors"
    state = load_file(file)
    for dtype in (torch.bfloat16, torch.float32):
        vae = load_weights(meta_vae(tiny_model_dir_fp16), [file], dtype=dtype, device="cpu")
        assert_same_state(vae, {k: v.to(dtype) for k, v in state.items()})


@pytest.mark.parametrize("chunk", [weights.CAST_CHUNK, 1000], ids=["one-chunk", "workers-share-chunks"])
@pytest.mark.parametrize("source, target", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_half_casts_are_bit_exact(tmp_path, monkeypatch, source, target, chunk):
    """Every 16-bit pattern (subnormals, infinities, NaNs) cast as torch's own direct cast does, though the
    reader goes through float32 chunks, which the threads share out when there are several."""
    monkeypatch.setattr(weights, "CAST_CHUNK", chunk)
    monkeypatch.setattr(weights, "_workers", lambda: 3)
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(source).reshape(256, 256)
    file = tmp_path / "all.safetensors"
    save_file({"all": values}, file)
    (_, got), *_ = Checkpoint([file]).read(["all"], dtype=target, device="cpu")
    expected = values.to(target)
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


def test_loaded_weights_do_not_depend_on_the_file(tiny_model_dir, vae_state, tmp_path):
    """Every tensor is a copy, never a view of the file's mapping: overwriting the file changes nothing."""
    file = tmp_path / "vae.safetensors"
    shutil.copy(vae_file(tiny_model_dir), file)
    vae = load_weights(meta_vae(tiny_model_dir), [file], dtype=torch.float32, device="cpu")
    size = file.stat().st_size
    with open(file, "r+b") as f:  # in place, so a live mapping would see it
        f.seek(size // 2)
        f.write(b"\xff" * (size - size // 2))
    assert_same_state(vae, vae_state)


def test_keep_dtype_and_integer_tensors(tmp_path):
    file = tmp_path / "mixed.safetensors"
    save_file({"a": torch.randn(3, 2), "b": torch.randn(4), "ids": torch.arange(5)}, file)
    got = dict(
        Checkpoint([file]).read(
            ["a", "b", "ids"], dtype=torch.bfloat16, device="cpu", keep_dtype=lambda k: k == "b"
        )
    )
    assert got["a"].dtype == torch.bfloat16 and got["b"].dtype == torch.float32
    assert got["ids"].dtype == torch.int64 and got["ids"].tolist() == [0, 1, 2, 3, 4]


def write_raw_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors laid out in the given order without alignment padding (the format allows it)."""
    header, blobs, offset = {}, [], 0
    names = {torch.float32: "F32", torch.float16: "F16", torch.uint8: "U8", torch.int64: "I64"}
    for name, t in tensors.items():
        data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned: a 3-byte tensor misaligns the next
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + b"".join(blobs))


def test_unaligned_and_empty_tensors(tmp_path):
    tensors = {
        "odd": torch.arange(3, dtype=torch.uint8),  # puts the next tensor at an odd offset
        "w": torch.randn(5, 7),
        "empty": torch.zeros(0, 4),
        "h": torch.randn(3).half(),
    }
    file = tmp_path / "raw.safetensors"
    write_raw_safetensors(file, tensors)
    got = dict(Checkpoint([file]).read(list(tensors), dtype=torch.float32, device="cpu"))
    for key, t in tensors.items():
        expected = t.float() if t.is_floating_point() else t
        assert got[key].shape == t.shape and torch.equal(got[key], expected), key


@pytest.fixture(params=["page-cache", "direct", "direct-refused"])
def read_path(request, monkeypatch) -> str:
    """How _Source reads: through the page cache (the tests' files are freshly written, so cached), straight
    from the disk as for an uncached file (O_DIRECT, Linux), or O_DIRECT refused mid-load."""
    if request.param != "page-cache":
        if not hasattr(os, "O_DIRECT"):
            pytest.skip("O_DIRECT is Linux-only")
        monkeypatch.setattr(weights, "_cached_fraction", lambda *args: 0.0)
    calls = []
    preadv = os.preadv

    def counting_preadv(fd, buffers, offset, *args):
        calls.append(offset)
        if request.param == "direct-refused":
            raise OSError(22, "Invalid argument")
        assert offset % weights.BLOCK == 0 and all(len(b) % weights.BLOCK == 0 for b in buffers)
        return preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", counting_preadv)
    yield request.param
    assert bool(calls) == (request.param != "page-cache")


@pytest.mark.parametrize(
    "read_bytes", [2 * weights.BLOCK, weights.READ_BYTES], ids=["small-reads", "one-read"]
)
def test_reads_split_tensors_anywhere(tmp_path, monkeypatch, read_path, read_bytes):
    """Tensors at odd offsets, larger than a read (split between reads at element boundaries), empty ones and
    a subset of the keys (gaps between reads) come out exact, whichever way the file is read."""
    monkeypatch.setattr(weights, "READ_BYTES", read_bytes)
    tensors = {
        "odd": torch.arange(3, dtype=torch.uint8),
        "w": torch.randn(50, 70),  # 14,000 bytes from an odd offset: over three small reads
        "empty": torch.zeros(0, 4),
        "h": torch.randn(3001).half(),
        "ids": torch.arange(1000),
        "skipped": torch.randn(5000),
        "tail": torch.randn(1),
    }
    file = tmp_path / "raw.safetensors"
    write_raw_safetensors(file, tensors)
    for keys in (list(tensors), ["h", "tail", "odd"]):
        got = dict(Checkpoint([file]).read(keys, dtype=torch.float32, device="cpu"))
        assert set(got) == set(keys)
        for key in keys:
            t = tensors[key]
            expected = t.float() if t.is_floating_point() else t
            assert got[key].dtype == expected.dtype and torch.equal(got[key], expected), key


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is not on this platform")
def test_cached_fraction_sees_the_page_cache(tmp_path):
    file = tmp_path / "data.bin"
    with open(file, "w+b") as f:  # mincore needs a mapping, a mapping needs read access
        f.write(os.urandom(4 * 1024**2))
        f.flush()
        assert weights._cached_fraction(f.fileno(), 0, 4 * 1024**2) > 0.9
        os.fsync(f.fileno())  # written back: clean pages, which DONTNEED drops
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert weights._cached_fraction(f.fileno(), weights.BLOCK, 2 * 1024**2) < 0.1


@pytest.mark.skipif(sys.platform != "linux", reason="kolors asks mincore on Linux only")
def test_cached_fraction_is_zero_where_unknown(tmp_path, monkeypatch):
    """No mincore (not Linux), or a range past the end of the file: 0, so the piece is read as uncached."""
    file = tmp_path / "data.bin"
    file.write_bytes(b"x" * 10000)
    with open(file, "rb") as f:
        assert weights._cached_fraction(f.fileno(), 0, 10000) > 0.9
        assert weights._cached_fraction(f.fileno(), 0, 10**9) == 0.0

        def no_mincore():
            raise AttributeError("mincore")

        monkeypatch.setattr(weights, "_libc", no_mincore)
        assert weights._cached_fraction(f.fileno(), 0, 10000) == 0.0


def test_legacy_pickled_shards_with_prefix(tiny_model_dir, tmp_path):
    """The older Kwai-Kolors/Kolors text encoder: pytorch_model-0000N-of-0000M.bin shards, an index, keys under
    `transformer.` and the unused LM head. It loads to the same weights as the safetensors one."""
    reference = load_weights(
        meta_text_encoder(tiny_model_dir),
        weight_files(tiny_model_dir / "text_encoder"),
        dtype=torch.float32,
        device="cpu",
        transform=checkpoint_keys_transform,
    ).state_dict()
    state = {f"transformer.{k}": v.clone() for k, v in reference.items()}
    state["transformer.output_layer.weight"] = torch.randn(8, 4)
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save({k: state[k] for k in shard}, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))

    files = weight_files(folder)
    assert [f.name for f in files] == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    model = load_weights(
        meta_text_encoder(tiny_model_dir),
        files,
        dtype=torch.float32,
        device="cpu",
        transform=checkpoint_keys_transform,
    )
    assert_same_state(model, reference)


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) - 100],  # data cut short
        lambda b: b[:5],  # not even the header length
        lambda b: b[:8] + b"{not json" + b[17:],  # a broken header
        lambda b: (10**12).to_bytes(8, "little") + b[8:],  # a header length past the end
    ],
    ids=["data", "length", "json", "header-size"],
)
def test_truncated_or_corrupt_safetensors(tiny_model_dir, tmp_path, damage):
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    file.write_bytes(damage(vae_file(tiny_model_dir).read_bytes()))
    with pytest.raises(KolorsError, match="truncated or corrupt") as e:
        load_weights(meta_vae(tiny_model_dir), [file], dtype=torch.float32, device="cpu")
    assert str(file) in str(e.value) and "download" in str(e.value)
    assert "\n" not in str(e.value)


def test_corrupt_pickle(tiny_model_dir, tmp_path):
    file = tmp_path / "diffusion_pytorch_model.bin"
    torch.save({"w": torch.randn(100)}, file)
    file.write_bytes(file.read_bytes()[:-300])
    with pytest.raises(KolorsError, match="truncated or corrupt") as e:
        load_weights(meta_vae(tiny_model_dir), [file], dtype=torch.float32, device="cpu")
    assert str(file) in str(e.value)


def test_shape_mismatch_names_key_file_and_shapes(tiny_model_dir, vae_state, tmp_path):
    key = "decoder.conv_in.weight"
    bad = dict(vae_state)
    bad[key] = torch.randn(bad[key].shape[0] + 1, *bad[key].shape[1:])
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(bad, file)
    with pytest.raises(KolorsError) as e:
        load_weights(meta_vae(tiny_model_dir), [file], dtype=torch.float32, device="cpu")
    message = str(e.value)
    assert key in message and str(file) in message
    assert str(tuple(bad[key].shape)) in message and str(tuple(vae_state[key].shape)) in message


def test_missing_and_unexpected_tensors(tiny_model_dir, vae_state, tmp_path):
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in vae_state.items() if k != "decoder.conv_in.bias"}, file)
    with pytest.raises(KolorsError, match="lack 1 tensor.*decoder.conv_in.bias"):
        load_weights(meta_vae(tiny_model_dir), [file], dtype=torch.float32, device="cpu")
    save_file({**vae_state, "extra.weight": torch.zeros(2)}, file)
    with pytest.raises(KolorsError, match="does not know.*extra.weight") as e:
        load_weights(meta_vae(tiny_model_dir), [file], dtype=torch.float32, device="cpu")
    assert str(file) in str(e.value)


def test_missing_component_lists_missing_and_found(tiny_model_dir, tmp_path):
    root = tmp_path / "model"
    shutil.copytree(tiny_model_dir, root)
    shutil.rmtree(root / "unet")
    (root / "vae" / "config.json").unlink()
    with pytest.raises(KolorsError) as e:
        check_model_folder(root)
    message = str(e.value)
    assert "missing unet/, vae/config.json" in message
    assert "found" in message and "text_encoder/" in message and "model_index.json" in message


# ---------------------------------------------------------------------------------------------------- variants


def test_variant_selection(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    for name in [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.safetensors",
    ]:
        (folder / name).write_bytes(b"")
    assert [f.name for f in weight_files(folder)] == ["diffusion_pytorch_model.safetensors"]
    assert [f.name for f in weight_files(folder, "fp16")] == ["diffusion_pytorch_model.fp16.safetensors"]
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    assert [f.name for f in weight_files(folder)] == ["diffusion_pytorch_model.bin"]  # plain before fp16
    with pytest.raises(
        KolorsError, match="'bf16' variant.*found: diffusion_pytorch_model.bin, diffusion_pytorch"
    ):
        weight_files(folder, "bf16")


def test_fp16_only_folder_falls_back_to_fp16(tiny_model_dir_fp16):
    files = weight_files(tiny_model_dir_fp16 / "text_encoder")
    assert len(files) > 1 and all(".fp16-" in f.name for f in files)
    index = json.loads(
        (tiny_model_dir_fp16 / "text_encoder" / "model.safetensors.index.fp16.json").read_text()
    )
    assert {f.name for f in files} == set(index["weight_map"].values())


# ---------------------------------------------------------------------------------------------------- hub

# The real Kolors-diffusers listing, plus files a careless pattern would also fetch.
REPO_FILES = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16-00001-of-00003.safetensors",
    "text_encoder/model.fp16-00002-of-00003.safetensors",
    "text_encoder/model.fp16-00003-of-00003.safetensors",
    "text_encoder/model.safetensors.index.fp16.json",
    "text_encoder/pytorch_model.fp16-00001-of-00002.bin",
    "text_encoder/pytorch_model.bin.index.fp16.json",
    "tokenizer/tokenizer.model",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.txt",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.fp16.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.onnx",
]


@pytest.fixture
def hub(monkeypatch, tiny_model_dir):
    """snapshot_download and the repo listing replaced: records the allow_patterns, lists REPO_FILES."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = {}

    def snapshot_download(repo_id, **kwargs):
        calls.update(kwargs, repo_id=repo_id)
        return str(tiny_model_dir)

    def list_repo_files(self, repo_id, revision=None, **kwargs):
        calls["listed"] = repo_id
        return list(REPO_FILES)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return calls


def fetched(patterns: list[str]) -> list[str]:
    from fnmatch import fnmatch

    return sorted(f for f in REPO_FILES if any(fnmatch(f, p) for p in patterns))


def test_hub_downloads_only_the_needed_files(hub, tiny_model_dir):
    assert resolve_model("Kwai-Kolors/Kolors-diffusers") == tiny_model_dir
    assert (
        hub["repo_id"] == "Kwai-Kolors/Kolors-diffusers" and hub["listed"] == "Kwai-Kolors/Kolors-diffusers"
    )
    files = fetched(hub["allow_patterns"])
    assert files == sorted(
        [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.fp16-00001-of-00003.safetensors",
            "text_encoder/model.fp16-00002-of-00003.safetensors",
            "text_encoder/model.fp16-00003-of-00003.safetensors",
            "text_encoder/model.safetensors.index.fp16.json",
            "tokenizer/tokenizer.model",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.txt",
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",  # plain weights exist for the VAE: preferred
        ]
    )


def test_hub_variant_is_exact(hub):
    resolve_model("Kwai-Kolors/Kolors-diffusers", variant="fp16")
    files = fetched(hub["allow_patterns"])
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in files
    assert "vae/diffusion_pytorch_model.safetensors" not in files
    assert not [f for f in files if f.endswith((".bin", ".onnx"))]


def test_hub_offline_uses_patterns_without_listing(hub):
    resolve_model("Kwai-Kolors/Kolors-diffusers", local_files_only=True)
    assert "listed" not in hub and hub["local_files_only"] is True
    files = fetched(hub["allow_patterns"])
    assert (
        "unet/diffusion_pytorch_model.fp16.safetensors" in files
        and "vae/diffusion_pytorch_model.onnx" not in files
    )
