"""The benchmark tools: fake weights both libraries load, the shared harness, the whole-generation command.

Smoke tests on tiny sizes; nothing here asserts a time.
"""

from __future__ import annotations

import json
import mmap
import re
from functools import partial

import numpy as np
import pytest
import torch

from bench import common
from bench.fake_weights import make_fake_model, random_tensor, split_shards, write_safetensors
from tests.reference import require_reference


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    """A tiny random-weight Kolors folder in the real fp16 layout, written by bench/fake_weights.py."""
    require_reference()
    return make_fake_model(tmp_path_factory.mktemp("fake") / "Kolors-fake", scale="tiny")


def test_fake_weights_has_the_real_file_layout(fake_dir):
    names = {p.relative_to(fake_dir).as_posix() for p in fake_dir.rglob("*") if p.is_file()}
    assert {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer.model",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.safetensors.index.fp16.json",
        *(f"text_encoder/model.fp16-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
    } <= names
    assert not any(name.endswith(".partial") for name in names)
    index = json.loads((fake_dir / "text_encoder/model.safetensors.index.fp16.json").read_text())
    assert {"output_layer.weight", "rotary_pos_emb.inv_freq"} <= set(index["weight_map"])
    assert len(set(index["weight_map"].values())) == 3


def test_diffusers_loads_fake_weights_with_the_written_values(fake_dir):
    from diffusers import KolorsPipeline

    pipe = KolorsPipeline.from_pretrained(fake_dir, variant="fp16", torch_dtype=torch.float32)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        for key, tensor in list(model.state_dict().items())[:: max(1, len(model.state_dict()) // 12)]:
            expected = random_tensor(key, tuple(tensor.shape)).half().float()
            assert torch.equal(tensor, expected), key
    # Values stay in a trained network's range: finite, norms near one.
    assert pipe.unet.conv_in.weight.abs().max() < 1
    assert torch.allclose(pipe.text_encoder.encoder.final_layernorm.weight, torch.ones(1), atol=0.2)


def test_kolors_and_diffusers_give_the_same_image_on_fake_weights(fake_dir, capsys):
    from bench.bench_generate import main

    main(
        ["--model", str(fake_dir), "--size", "64", "--steps", "3", "--dtype", "float32"]
        + ["--warmup", "0", "--repeats", "1", "--processes", "one"]
    )
    out = capsys.readouterr().out
    assert "ratio diffusers/kolors" in out and "cpu" in out
    diff = float(re.search(r"max abs diff ([0-9.e-]+)", out).group(1))
    assert diff < 1e-3, out  # same seed, same sampler: the same image in float32


@pytest.mark.slow  # several fresh processes, each importing torch and diffusers: minutes on 2 cores
def test_generate_in_alternating_processes(fake_dir, capsys):
    """The full-size mode: every run in a fresh process, the sides alternating, the runs merged per side."""
    from bench.bench_generate import main

    main(
        ["--model", str(fake_dir), "--size", "64", "--steps", "2", "--dtype", "float32"]
        + ["--warmup", "0", "--repeats", "2", "--processes", "two"]
    )
    out = capsys.readouterr().out
    assert "each run in its own process, sides alternating" in out
    assert out.count("round 1: diffusers loaded") == 1 and out.count("round 2: kolors loaded") == 1
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.startswith(("diffusers ", "kolors "))
    }
    assert len(rows["diffusers"]) >= 3 and len(rows["kolors"]) >= 3  # the median, then two runs each
    assert float(re.search(r"max abs diff ([0-9.e-]+)", out).group(1)) < 1e-3


@pytest.mark.slow  # several fresh processes, each importing torch and diffusers: minutes on 2 cores
def test_memory_image_to_image_on_fake_weights(fake_dir, capsys, tmp_path):
    """bench_memory --strength: every side runs image-to-image from the same picture in its own process; the
    low-memory image equals the normal one, kolors' equals diffusers' (float32), and both differ from the
    text-to-image run's (the picture was used)."""
    from bench.bench_memory import main

    args = ["--model", str(fake_dir), "--size", "64", "--steps", "4", "--dtype", "float32", "--keep-images"]
    main(args + [str(tmp_path / "i2i"), "--strength", "0.5"])
    out = capsys.readouterr().out
    assert "image-to-image, strength 0.5" in out
    assert "low-memory image identical to normal mode: True" in out
    assert float(re.search(r"kolors vs diffusers max abs diff ([0-9.e-]+)", out).group(1)) < 1e-3
    main(args + [str(tmp_path / "t2i")])
    for side in ("diffusers", "kolors"):
        i2i, t2i = (np.load(tmp_path / kind / f"{side}-0.npy") for kind in ("i2i", "t2i"))
        assert np.abs(i2i - t2i).max() > 0.05
    with pytest.raises(SystemExit):  # 2 x 0.3 leaves no step
        main(["--model", str(fake_dir), "--steps", "2", "--strength", "0.3"])


def test_child_killed_by_a_signal_is_reported(tmp_path):
    """A child the OOM killer ends (SIGKILL) is a result for a side allowed to die, and a clear stop otherwise."""
    script = tmp_path / "die.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert common.run_child(str(script), [], "diffusers", tmp_path / "out.json") == {"killed": "SIGKILL"}
    runs = common.alternate_children(str(script), [], ["diffusers"], 0, 2, tmp_path, may_die=["diffusers"])
    assert runs == {"diffusers": [{"killed": "SIGKILL"}] * 2}
    with pytest.raises(SystemExit, match="kolors was killed by SIGKILL"):
        common.alternate_children(str(script), [], ["kolors"], 0, 1, tmp_path)


def test_memory_reports_a_killed_diffusers_against_the_machine(fake_dir, capsys, monkeypatch):
    """When diffusers does not fit (killed), bench_memory still reports kolors' sides, bounding the ratio by
    the machine's memory."""
    import bench.bench_memory as bench_memory

    real = bench_memory.alternate_children

    def diffusers_killed(script, argv, sides, *args, **kwargs):
        runs = real(script, argv, [s for s in sides if s != "diffusers"], *args, **kwargs)
        return {"diffusers": [{"killed": "SIGKILL"}]} | runs

    monkeypatch.setattr(bench_memory, "alternate_children", diffusers_killed)
    bench_memory.main(["--model", str(fake_dir), "--size", "64", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "diffusers         killed in every run, by the OOM killer" in out
    assert "diffusers: killed in 1 of 1 runs" in out
    assert re.search(r"kolors-low / diffusers < 0\.\d\d \(goal <= 0.4: met\)", out)
    assert "low-memory image identical to normal mode: True" in out and "killed (> " in out


def test_vae_decode_matches_on_fake_weights(fake_dir, capsys):
    from bench.bench_vae import main

    main(["--model", str(fake_dir), "--size", "64", "--warmup", "0", "--repeats", "1", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "ratio diffusers/kolors" in out
    assert float(re.search(r"max \|kolors - diffusers\| ([0-9.e-]+)", out).group(1)) < 0.1
    errors = dict(re.findall(r"(diffusers|kolors) vs float32: rms ([0-9.e-]+)", out))
    assert float(errors["kolors"]) <= 1.25 * float(errors["diffusers"])  # bf16, not worse than diffusers'


@pytest.mark.slow  # several fresh processes, each importing torch and diffusers: minutes on 2 cores
def test_load_cold_empties_the_page_cache_before_every_load(fake_dir, capsys, monkeypatch):
    """--cold: each side's load, in its own process, after the page cache is emptied (stubbed here: emptying
    it needs root and would slow every other test on the machine)."""
    from bench import bench_load

    dropped = []
    monkeypatch.setattr(bench_load, "can_drop_page_cache", lambda: True)
    monkeypatch.setattr(bench_load, "drop_page_cache", lambda: dropped.append(True))
    bench_load.main(["--model", str(fake_dir), "--warmup", "0", "--repeats", "1", "--cold"])
    out = capsys.readouterr().out
    assert len(dropped) == 2  # one per load: diffusers, then kolors
    assert "emptied before each load (--cold)" in out and "| load, cold, bfloat16, cpu |" in out
    assert re.search(r"time kolors/diffusers: [0-9.]+", out)

    monkeypatch.setattr(bench_load, "can_drop_page_cache", lambda: False)
    with pytest.raises(SystemExit):
        bench_load.main(["--model", str(fake_dir), "--cold"])
    assert "needs root" in capsys.readouterr().err


def test_write_safetensors_round_trips_in_blocks(tmp_path):
    from safetensors.torch import load_file

    shapes = {"a.weight": (5, 3), "b.bias": (4,), "c.weight": (2, 2, 3, 3)}
    values = {k: torch.randn(s) for k, s in shapes.items()}

    def blocks(key):  # rows one at a time, as the writer gets them for big tensors
        yield from values[key].split(1) if values[key].dim() > 1 else [values[key]]

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        path = tmp_path / f"x-{dtype}.safetensors"
        size = write_safetensors(path, shapes, dtype, blocks)
        loaded = load_file(path)
        assert (
            list(loaded) == sorted(shapes)
            and size == sum(v.numel() for v in values.values()) * loaded["a.weight"].element_size()
        )
        for key, tensor in values.items():
            assert torch.equal(loaded[key], tensor.to(dtype)), (key, dtype)
    assert not list(tmp_path.glob("*.partial"))


def test_split_shards_keeps_order_and_fills_every_shard():
    shapes = {"big": (1000, 1000), "s1": (3,), "s2": (3,), "mid": (500, 500)}
    shards = split_shards(shapes, 3)
    assert len(shards) == 3 and all(shards)
    assert [k for shard in shards for k in shard] == list(shapes)


def test_alternate_interleaves_and_returns_medians():
    calls = []

    def contender(name, value):
        def run():
            calls.append(name)
            return value

        return run

    results = common.alternate(
        {"diffusers": contender("d", 1), "kolors": contender("k", 2)}, warmup=1, repeats=3, verbose=False
    )
    assert calls == ["d", "k", "k", "d", "d", "k", "k", "d"]  # the order flips every round
    for result in results.values():
        assert len(result.warmup_times) == 1 and len(result.times) == 3
        assert min(result.times) <= result.median <= max(result.times)
        assert result.peak_memory > 0
    assert results["kolors"].output == 2


def test_memory_watch_sees_a_transient_allocation():
    with common.MemoryWatch(torch.device("cpu")) as mem:
        # 64 MiB of fresh pages, touched: straight from the kernel, as malloc may instead reuse freed memory
        # that is still resident (what an earlier test left freed decides how much)
        region = mmap.mmap(-1, 64 * 1024**2)
        region.write(b"x" * len(region))
        region.close()
    if mem.reset_ok:  # where the kernel cannot reset the peak it counts from process start: still >= start
        assert mem.peak - mem.start >= 48 * 1024**2
    assert mem.peak >= mem.start


def test_report_names_machine_sides_and_ratio(capsys):
    results = {
        n: common.Result(n, [0.5], [t, t, t], peak_memory=2**30)
        for n, t in (("diffusers", 2.0), ("kolors", 1.0))
    }
    text = common.report("x", results, dtype=torch.bfloat16, shapes="2x4x64x64", goal=1.3)
    for line in ("cpu", "torch", "command", "bfloat16", "2x4x64x64", "peak RSS", "1.00 GiB"):
        assert line in text
    assert "ratio diffusers/kolors: 2.00x  (goal >= 1.3x: met)" in text
    assert common.speed_row("g", results, goal=3).endswith("| 2.00x | not met |")


def test_full_size_keys_and_shapes_match_kolors_models():
    """Nothing full-size is written here: the keys and shapes fake_weights would write (diffusers' models on
    meta) are checked against kolors' own models on meta, as its strict loading checks them."""
    from bench.fake_weights import COMPONENTS, scaled_config, tensor_shapes
    from kolors.config import load_config
    from kolors.models.text_encoder import ChatGLMModel, TextEncoderConfig, checkpoint_keys_transform
    from kolors.models.unet import UNet2DConditionModel, UNetConfig
    from kolors.models.vae import AutoencoderKL, VAEConfig
    from kolors.weights import build_on_meta

    reference = require_reference()
    models = {
        "text_encoder": (ChatGLMModel, TextEncoderConfig),
        "unet": (UNet2DConditionModel, UNetConfig),
        "vae": (AutoencoderKL, VAEConfig),
    }
    for component in COMPONENTS:
        written = tensor_shapes(component, scaled_config(reference, component, "full"))
        module, config_class = models[component]
        config = load_config(config_class, reference / component / "config.json")
        ours = {k: tuple(v.shape) for k, v in build_on_meta(partial(module, config)).state_dict().items()}
        if component == "text_encoder":
            assert len(written) == 200
            written = {
                k: tuple(v.shape)
                for k, v in checkpoint_keys_transform(
                    {k: torch.empty(s, device="meta") for k, s in written.items()}
                ).items()
            }
        assert written == ours, component


@pytest.mark.parametrize("quant", [None, "int8"])
def test_bench_text_encoder_smoke(fake_dir, monkeypatch, capsys, quant):
    """Both comparisons run end to end on the tiny text encoder (the --device the test machine has)."""
    import sys

    from bench import bench_text_encoder

    argv = ["bench_text_encoder.py", "--config", str(fake_dir / "text_encoder" / "config.json")]
    argv += [
        "--tokenizer",
        str(fake_dir / "tokenizer"),
        "--dtype",
        "float32",
        "--warmup",
        "0",
        "--repeats",
        "1",
    ]
    argv += ["--device", "cpu", *(["--quant", quant] if quant else [])]
    monkeypatch.setattr(sys, "argv", argv)
    bench_text_encoder.main()
    out = capsys.readouterr().out
    if quant:
        assert "int8 against float32" in out and "cosine" in out
    else:
        assert "ratio diffusers/kolors" in out
        diff = float(re.search(r"max \|diff\|   : prompt_embeds (\S+)", out).group(1))
        assert diff < 1e-4  # float32: the same embeddings as diffusers'
