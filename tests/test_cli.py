"""The `kolors generate` command on the tiny model: PNGs with A1111 parameters, one-line errors, no partial files."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from kolors import KolorsPipeline
from kolors.cli import main
from kolors.request import read_parameters


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_writes_png_with_parameters(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ladybug.png"
    code, stdout, _ = run(
        [
            "generate",
            "一张瓢虫的照片，微距",
            "--model",
            str(tiny_model_dir),
            "--steps",
            "3",
            "--seed",
            "66",
            "--width",
            "64",
            "--height",
            "48",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--output",
            str(out),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0 and str(out) in stdout
    assert Image.open(out).size == (64, 48)
    assert read_parameters(out) == (
        "一张瓢虫的照片，微距\nNegative prompt: \nSteps: 3, Sampler: euler, CFG scale: 5.0, Seed: 66, "
        f"Size: 64x48, Model: {tiny_model_dir.name}"
    )
    # The recorded parameters reproduce the image through the Python API.
    pipe = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    again = pipe("一张瓢虫的照片，微距", height=48, width=64, num_inference_steps=3, seed=66).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(out)))


def test_several_images_each_with_its_own_seed(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code, _, _ = run(
        [
            "generate",
            "a cat",
            "--model",
            str(tiny_model_dir),
            "--steps",
            "2",
            "--seed",
            "10",
            "--num-images",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--dtype",
            "float32",
            "--sampler",
            "dpmpp-2m",
            "--output",
            str(out),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0
    params = [read_parameters(tmp_path / f"cat-{i}.png") for i in (0, 1)]  # file i has seed + i, as in batch
    assert "Seed: 10," in params[0] and "Seed: 11," in params[1] and "Sampler: dpmpp-2m" in params[0]


def test_random_seed_is_recorded(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run(
        [
            "generate",
            "a cat",
            "--model",
            str(tiny_model_dir),
            "--steps",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--dtype",
            "float32",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0
    (png,) = list(tmp_path.glob("kolors-*.png"))
    seed = png.stem.split("-")[1]
    assert f"Seed: {seed}," in read_parameters(png)


def test_image_to_image(tiny_model_dir, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(init)
    out = tmp_path / "out.png"
    code, _, _ = run(
        [
            "generate",
            "a cat",
            "--model",
            str(tiny_model_dir),
            "--steps",
            "4",
            "--image",
            str(init),
            "--strength",
            "0.5",
            "--seed",
            "1",
            "--dtype",
            "float32",
            "--output",
            str(out),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0 and Image.open(out).size == (56, 40)
    assert "Denoising strength: 0.5" in read_parameters(out)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--width", "1001"], "width 1001 is not a multiple of 8; use 1000 or 1008"),
        (["--steps", "0"], "steps must be"),
        (["--strength", "2"], "strength must be between 0 and 1"),
        (["--guidance", "nan"], "guidance scale must be a finite number"),
        (["--sampler", "plms"], "unknown sampler 'plms'; choose one of: euler, euler-a, heun, dpmpp-2m"),
        (["--image", "missing.png"], "image file not found"),
        (["--image", "NOTANIMAGE"], "cannot decode image"),
        (["--model", "NOMODEL"], "is incomplete: missing"),
        (["--output", "out.jpg"], "must end in .png"),
        (["--output", "adir.png"], "output adir.png is a folder"),
        (["--output", "locked/out.png"], "cannot write to the output folder locked"),
        (["--seed", "-5"], "seed must be a whole number between 0 and 4294967295, not -5"),
        (["--image", "init.png", "--width", "60"], "width 60 is not a multiple of 8"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_file(
    tiny_model_dir, tmp_path, capsys, monkeypatch, extra, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "NOTANIMAGE").write_bytes(b"this is not an image")
    (tmp_path / "NOMODEL").mkdir()
    (tmp_path / "NOMODEL" / "unet").mkdir()
    (tmp_path / "adir.png").mkdir()
    (tmp_path / "locked").mkdir(mode=0o500)
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    if extra[-1] == "locked/out.png" and os.access(tmp_path / "locked", os.W_OK):
        pytest.skip("running as root: a read-only folder is still writable")
    args = [
        "generate",
        "a cat",
        "--model",
        str(tiny_model_dir),
        "--steps",
        "1",
        "--width",
        "64",
        "--height",
        "64",
        "--dtype",
        "float32",
        "--output",
        "out.png",
        "--quiet",
        *extra,
    ]
    code, _, err = run(args, capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("out*.png")) and not list(tmp_path.glob(".*tmp"))


def test_console_script_error_has_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kolors.cli",
            "generate",
            "a cat",
            "--model",
            "Kwai-Kolors/Kolors-diffusers",
            "--output",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "cannot reach the model hub" in proc.stderr and "local" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.png").exists()


def test_download_prints_the_checked_snapshot(tiny_model_dir, capsys, monkeypatch):
    import kolors.pipeline

    asked = {}

    def fake_resolve(model, variant=None):
        asked.update(model=model, variant=variant)
        return tiny_model_dir

    monkeypatch.setattr(kolors.pipeline, "resolve_model", fake_resolve)
    monkeypatch.setattr("kolors.cli.check_hub", lambda model: None)  # the hub "answers" (no network here)
    code, out, _ = run(["download", "Kwai-Kolors/Kolors-diffusers", "--variant", "fp16"], capsys)
    assert code == 0 and out.strip() == str(tiny_model_dir)
    assert asked == {"model": "Kwai-Kolors/Kolors-diffusers", "variant": "fp16"}


def test_download_offline_without_cache_is_one_line(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: an earlier test may have imported it already, and
    # then the listing would try the network (seconds of retries) before failing the same way.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    code, _, err = run(["download", "Kwai-Kolors/Kolors-diffusers"], capsys)
    assert code == 2 and "cannot reach the model hub" in err and err.count("\n") == 1


def test_output_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from kolors.pipeline import KolorsPipeline

    def never(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(KolorsPipeline, "from_pretrained", never)
    (tmp_path / "dir.png").mkdir()
    code, _, err = run(["generate", "a cat", "--output", str(tmp_path / "dir.png")], capsys)
    assert code == 2 and "is a folder" in err and err.count("\n") == 1


def test_image_to_image_honours_width_and_height(tiny_model_dir, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(init)
    common = ["generate", "a cat", "--model", str(tiny_model_dir), "--steps", "2", "--image", str(init)]
    common += ["--seed", "1", "--dtype", "float32", "--quiet"]
    code, _, err = run([*common, "--width", "32", "--height", "48", "-o", str(tmp_path / "a.png")], capsys)
    assert code == 0 and Image.open(tmp_path / "a.png").size == (32, 48)
    assert "Size: 32x48" in read_parameters(tmp_path / "a.png")
    # without a size the image's own is kept, and the result is the pipeline's own image-to-image
    code, _, _ = run([*common, "--strength", "0.3", "-o", str(tmp_path / "b.png")], capsys)
    pipe = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    expected = pipe("a cat", image=Image.open(init), strength=0.3, num_inference_steps=2, seed=1).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(expected))


def test_strength_without_an_image_warns(tiny_model_dir, tmp_path, capsys):
    args = ["generate", "a cat", "--model", str(tiny_model_dir), "--steps", "1", "--width", "32"]
    args += [
        "--height",
        "32",
        "--dtype",
        "float32",
        "--quiet",
        "--strength",
        "0.5",
        "-o",
        str(tmp_path / "a.png"),
    ]
    code, _, err = run(args, capsys)
    assert code == 0 and "kolors: warning: --strength applies only to image-to-image" in err


def test_batch_help_lists_only_what_batch_takes(capsys):
    with pytest.raises(SystemExit):
        main(["batch", "--help"])
    text = capsys.readouterr().out
    assert "--image" not in text and "--strength" not in text
    assert "base seed" in text and "random" not in text.split("--seed", 1)[1].split("--", 1)[0]


def test_a_long_prompt_warning_is_one_line(tiny_model_dir, tmp_path, capsys):
    args = ["generate", "cat " * 400, "--model", str(tiny_model_dir), "--steps", "1", "--width", "32"]
    args += ["--height", "32", "--dtype", "float32", "--quiet", "-o", str(tmp_path / "a.png")]
    code, _, err = run(args, capsys)
    assert code == 0
    (line,) = [x for x in err.splitlines() if "tokens" in x]
    assert line.startswith("kolors: warning: prompts longer than") and "warnings.warn" not in err
    assert err.count("\n") == 1, err


def test_no_network_fails_fast_in_one_line(tmp_path, capsys, monkeypatch):
    import socket

    from kolors.pipeline import KolorsPipeline

    def unreachable(*a, **k):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(KolorsPipeline, "from_pretrained", lambda *a, **k: pytest.fail("it tried the hub"))
    for argv in (["generate", "a cat", "-o", str(tmp_path / "a.png")], ["download"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert "HF_HUB_OFFLINE=1" in err and "--model PATH" in err and "Network is unreachable" in err


def test_no_network_uses_a_model_downloaded_before(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The hub's cache layout (refs/main naming a snapshot folder) holding the tiny model: without a network the
    repo id still generates, from the cache, with one line saying so."""
    import shutil
    import socket

    from huggingface_hub import constants

    repo = tmp_path / "cache" / "models--Kwai-Kolors--Kolors-diffusers"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")

    def unreachable(*a, **k):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test, which check_hub sets to 1
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    out = tmp_path / "cat.png"
    argv = ["generate", "a cat", "--steps", "2", "--width", "64", "--height", "64", "--dtype", "float32"]
    code, _, err = run(argv + ["-o", str(out)], capsys)
    assert code == 0 and out.exists(), err
    (line,) = [x for x in err.splitlines() if "hub" in x]
    assert (
        "cannot be reached (Network is unreachable); using Kwai-Kolors/Kolors-diffusers from the cache"
        in line
    )
    assert constants.HF_HUB_OFFLINE  # later lookups in this process go to the cache too


@pytest.mark.parametrize(
    ("component", "field", "value", "message"),
    [
        ("unet", "norm_num_groups", 7, "norm_num_groups=7 must divide every block_out_channels"),
        ("unet", "in_channels", "three", "in_channels must be a whole number, not 'three'"),
        ("vae", "scaling_factor", 0, "scaling_factor=0 must be greater than 0"),
        ("vae", "block_out_channels", [32, "64"], "block_out_channels must be a list of whole numbers"),
        ("text_encoder", "num_layers", -1, "num_layers=-1 must be greater than 0"),
        ("text_encoder", "hidden_size", True, "hidden_size must be a whole number, not True"),
        ("scheduler", "beta_end", "0.012", "beta_end must be a number, not '0.012'"),
    ],
)
def test_a_bad_config_value_is_one_line_naming_the_file_and_field(
    tiny_model_dir, tmp_path, capsys, component, field, value, message
):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    path = model / component / name
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    args = ["generate", "a cat", "--model", str(model), "--steps", "1", "--width", "32", "--height", "32"]
    code, _, err = run([*args, "--dtype", "float32", "--quiet", "-o", str(tmp_path / "a.png")], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err and message in err, err
    assert not (tmp_path / "a.png").exists()
