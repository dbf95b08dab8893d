"""LoRA training against diffusers' UNet2DConditionModel with PEFT's LoRA (the official Kolors script's model), on
the tiny reference model, in float32: the loss and every gradient, ten AdamW steps, a run that learns, a run killed
and resumed, two processes against one, the files both loaders read, and bad input.

The tiny reference's output convolution has random weights (tests/reference.py gives it some so that images
differ), so its epsilon prediction is a large error of norm ~6 per element that the attention LoRA can learn to
cancel: the learnable task of test_a_tiny_model_learns.
"""

from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from kolors import KolorsError, KolorsPipeline
from kolors.adapters.lora_train import TrainableLora, peft_module_name
from kolors.cli import main
from kolors.components import load_unet
from kolors.samplers import load_scheduler_config, train_alphas_cumprod
from kolors.train import LOG_COLUMNS, TrainConfig, diffusion_loss, train_lora
from kolors.train.data import buckets, read_folder
from kolors.train.loop import STATE_FILE, checkpoint_blocks
from tests.test_pipeline import assert_close

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
RANK, ALPHA = 4, 8.0  # scale 2, so the alpha is exercised


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the relative error of a whole tensor (single elements of a small gradient carry float32
    noise of a few 1e-6 of the tensor's largest element, from summation order)."""
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# ------------------------------------------------------------------------------------------------ parity


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread here: the steps are tiny, and on a loaded machine two threads' OpenMP barriers cost
    this file minutes of waiting (measured: the ten AdamW steps took 160 s with two, 2 s of CPU with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unets(tiny_model_dir):
    """Ours with TrainableLora and diffusers' with PEFT's LoraConfig(init_lora_weights="gaussian"), same weights."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    theirs = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").requires_grad_(False)
    theirs.add_adapter(
        LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=ATTENTION)
    )
    ours = load_unet(tiny_model_dir / "unet", dtype=torch.float32, device="cpu")
    lora = TrainableLora(ours, ATTENTION, rank=RANK, alpha=ALPHA)
    peft_modules = {peft_module_name(n) for n, _ in theirs.named_parameters() if "lora_" in n}
    assert set(lora.names) == peft_modules and len(peft_modules) == 136  # 34 attentions x 4
    lora.attach()
    return ours, lora, theirs


def copy_from_peft(lora: TrainableLora, theirs) -> None:
    with torch.no_grad():
        for name, down, up in zip(lora.names, lora.down, lora.up, strict=True):
            down.copy_(theirs.get_submodule(name).lora_A["default"].weight)
            up.copy_(theirs.get_submodule(name).lora_B["default"].weight)


def peft_params(theirs) -> list[torch.nn.Parameter]:
    """PEFT's pairs in TrainableLora's order (down, up per layer interleaved as lora.down, lora.up lists)."""
    modules = [n for n, m in theirs.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    return [theirs.get_submodule(n).lora_A["default"].weight for n in modules] + [
        theirs.get_submodule(n).lora_B["default"].weight for n in modules
    ]


def a_batch(seed: int, b: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    pads = [5, 9][:b]
    embeds = torch.randn(b, 16, 64, generator=g)
    for i, p in enumerate(pads):  # left pads: identical leading rows, as ChatGLM's
        embeds[i, :p] = embeds[i, 0]
    return dict(
        latents=torch.randn(b, 4, 8, 8, generator=g),
        noise=torch.randn(b, 4, 8, 8, generator=g),
        timesteps=torch.randint(0, 1100, (b,), generator=g),
        embeds=embeds,
        pooled=torch.randn(b, 64, generator=g),
        time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64], [96, 64, 16, 0, 64, 64]])[:b],
        pads=pads,
    )


def their_loss(theirs, scheduler, x: dict) -> torch.Tensor:
    """The official script's loss: DDPMScheduler.add_noise, the UNet, MSE to the noise in float32."""
    noisy = scheduler.add_noise(x["latents"], x["noise"], x["timesteps"])
    cond = dict(text_embeds=x["pooled"], time_ids=x["time_ids"])
    pred = theirs(noisy, x["timesteps"], x["embeds"], added_cond_kwargs=cond).sample
    acc = torch.promote_types(
        pred.dtype, torch.float32
    )  # .float() in the script; float64 for the float64 check
    return F.mse_loss(pred.to(acc), x["noise"].to(acc), reduction="mean")


def our_loss(ours, alphas, x: dict) -> torch.Tensor:
    keys = ("latents", "noise", "timesteps", "embeds", "pooled", "time_ids")
    return diffusion_loss(ours, *(x[k] for k in keys), alphas, pads=x["pads"])


@pytest.fixture(scope="module")
def schedules(reference_pipeline, tiny_model_dir):
    from diffusers import DDPMScheduler

    config = load_scheduler_config(tiny_model_dir / "scheduler" / "scheduler_config.json")
    assert config.num_train_timesteps == 1100 and config.beta_schedule == "scaled_linear"
    theirs = DDPMScheduler.from_config(reference_pipeline.scheduler.config)
    alphas = train_alphas_cumprod(config)
    assert torch.equal(alphas, theirs.alphas_cumprod)
    return alphas, theirs


def gradients_against_peft(ours, lora, theirs, scheduler, alphas, x) -> tuple[float, float]:
    """(loss rel, worst gradient rel over every LoRA tensor) for one batch."""
    theirs.zero_grad()
    lora.zero_grad()
    ref = their_loss(theirs, scheduler, x)
    ref.backward()
    loss = our_loss(ours, alphas, x)
    loss.backward()
    worst = 0.0
    for name, down, up in zip(lora.names, lora.down, lora.up, strict=True):
        layer = theirs.get_submodule(name)
        for mine, peft in ((down, layer.lora_A["default"].weight), (up, layer.lora_B["default"].weight)):
            assert peft.grad.abs().max() > 0
            worst = max(worst, rel(mine.grad, peft.grad))
    return rel(loss.detach(), ref.detach()), worst


def test_one_step_loss_and_every_gradient_match_peft(unets, schedules, tiny_model_dir):
    """float64: the same computation (1e-10). float32: the loss to 1e-5; each of the 272 gradient tensors to
    3e-5, the noise floor of float32 here: diffusers' own float32 gradients are up to 1.3e-5 off its float64
    ones on this model."""
    ours, lora, theirs = unets
    alphas, scheduler = schedules
    with torch.no_grad():  # up != 0, so that the downs have gradients too (PEFT's init leaves up at zero)
        for m in theirs.modules():
            if hasattr(m, "lora_B") and "default" in m.lora_B:
                m.lora_B["default"].weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    copy_from_peft(lora, theirs)
    x = a_batch(0)
    x64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}
    theirs64 = copy.deepcopy(theirs).double()
    ours64 = load_unet(tiny_model_dir / "unet", dtype=torch.float64, device="cpu")
    lora64 = TrainableLora(ours64, ATTENTION, rank=RANK, alpha=ALPHA).double()
    lora64.attach()
    copy_from_peft(lora64, theirs64)
    loss64, worst64 = gradients_against_peft(ours64, lora64, theirs64, scheduler, alphas, x64)
    loss32, worst32 = gradients_against_peft(ours, lora, theirs, scheduler, alphas, x)
    print(f"float64: loss rel {loss64:.1e}, worst gradient rel {worst64:.1e}")
    print(f"float32: loss rel {loss32:.1e}, worst gradient rel {worst32:.1e}")
    assert loss64 <= 1e-10 and worst64 <= 1e-10
    assert loss32 <= 1e-5 and worst32 <= 3e-5

    # Gradient checkpointing recomputes the blocks in the backward pass: the same gradients.
    again = load_unet(tiny_model_dir / "unet", dtype=torch.float32, device="cpu")
    checkpointed = TrainableLora(again, ATTENTION, rank=RANK, alpha=ALPHA)
    checkpointed.load_state_dict(lora.state_dict())
    checkpointed.attach()
    checkpoint_blocks(again)
    our_loss(again, alphas, x).backward()
    for a, b in zip(checkpointed.parameters(), lora.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_ten_adamw_steps_follow_peft(unets, schedules):
    ours, lora, theirs = unets
    alphas, scheduler = schedules
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a fresh gaussian init (PEFT's), shared
        for m in theirs.modules():
            if hasattr(m, "lora_A") and "default" in m.lora_A:
                m.lora_A["default"].weight.copy_(
                    torch.randn(m.lora_A["default"].weight.shape, generator=g) / RANK
                )
                m.lora_B["default"].weight.zero_()
    copy_from_peft(lora, theirs)
    opts = [
        torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-4)
        for p in (list(lora.parameters()), peft_params(theirs))
    ]
    for step in range(10):
        x = a_batch(100 + step, b=1)
        losses = []
        computes = (lambda x=x: our_loss(ours, alphas, x), lambda x=x: their_loss(theirs, scheduler, x))
        for opt, compute in zip(opts, computes, strict=True):
            opt.zero_grad()
            loss = compute()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], 1.0)
            opt.step()
            losses.append(loss.detach())
        assert rel(*losses) <= 1e-5, (step, losses)
    worst = 0.0
    for name, down, up in zip(lora.names, lora.down, lora.up, strict=True):
        layer = theirs.get_submodule(name)
        worst = max(worst, rel(down, layer.lora_A["default"].weight), rel(up, layer.lora_B["default"].weight))
    # Every loss above to 1e-5; the weights to 1e-3: Adam divides each gradient by its own running size, so the
    # float32 noise of elements whose gradient is near zero becomes steps of size lr (5e-4 seen here).
    print(f"ten AdamW steps: worst LoRA weight rel {worst:.1e}")
    assert worst <= 1e-3, worst
    assert max(u.abs().max().item() for u in lora.up) > 5e-3  # it moved


# ------------------------------------------------------------------------------------------------ runs


def write_images(folder: Path, n: int = 4, seed: int = 0, captions: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        size = (64 + 32 * (i % 2), 64)  # two aspect ratios: cropped to the 64x64 bucket
        Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"a photo of thing number {i}")
    return folder


def config(data: Path, out: Path, model: Path, **kw) -> TrainConfig:
    base = dict(model=model, rank=4, alpha=4, steps=6, lr=1e-2, resolution=64, batch_size=1, save_every=2,
                device="cpu", progress=False)  # fmt: skip
    return TrainConfig(data, out, **{**base, **kw})


def read_log(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(data, tiny_model_dir, tmp_path_factory):
    """Fifteen steps on four images, batch 4, with a kohya copy and a sample."""
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = config(data, out, tiny_model_dir, steps=15, batch_size=4, lr=3e-2, save_every=5, kohya=True,
                 sample_prompt=("a cat",), sample_every=15, sample_steps=2)  # fmt: skip
    assert train_lora(cfg) == out / "pytorch_lora_weights.safetensors"
    return out


def test_a_tiny_model_learns_and_logs(trained):
    rows = read_log(trained)
    assert tuple(rows[0]) == LOG_COLUMNS and [int(r["step"]) for r in rows] == list(range(1, 16))
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] <= losses[0] / 2, losses
    assert all(float(r["lr"]) == 3e-2 and float(r["seconds"]) > 0 for r in rows)
    assert (trained / "samples" / "step-15-0.png").is_file()
    assert not list(trained.glob(".*.tmp"))


def test_the_trained_lora_loads_in_kolors_and_diffusers_alike(trained, tiny_model_dir, reference_pipeline):
    file = trained / "pytorch_lora_weights.safetensors"
    state = load_file(file)
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    call = dict(
        prompt="a photo of thing number 1", height=64, width=64, num_inference_steps=3, output_type="np"
    )
    ours = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    ours.set_progress_bar_config(disable=True)
    base = ours(**call, generator=torch.Generator().manual_seed(3)).images
    ours.load_lora_weights(file)
    mine = ours(**call, generator=torch.Generator().manual_seed(3)).images
    ref = copy.deepcopy(reference_pipeline)
    ref.load_lora_weights(str(file))
    theirs = ref(**call, generator=torch.Generator().manual_seed(3)).images
    assert_close(mine, theirs)
    assert np.abs(mine - base).max() > 0.02  # the LoRA changes the image
    ours.unload_lora_weights()
    ours.load_lora_weights(trained / "pytorch_lora_weights_kohya.safetensors")
    assert_close(ours(**call, generator=torch.Generator().manual_seed(3)).images, mine, tol=1e-5)


def test_a_text_encoder_lora_trains_and_loads_as_peft_reads_it(
    data, tiny_model_dir, reference_pipeline, tmp_path
):
    """--train-text-encoder: ChatGLM's query_key_value pairs join the UNet's in the file (as the official script's
    PEFT adapter); kolors' loader gives the image diffusers gives with PEFT on its text encoder (the official
    inference's way: diffusers' load_lora_weights reads CLIP text encoders only) and the UNet pairs loaded."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    out = tmp_path / "te"
    train_lora(config(data, out, tiny_model_dir, steps=3, lr=5e-2, train_text_encoder=True))
    state = load_file(out / "pytorch_lora_weights.safetensors")
    te = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    assert len(te) == 2 * 3 and all("query_key_value" in k for k in te)  # three layers, A and B
    assert all(v.abs().max() > 0 for k, v in te.items() if "lora_B" in k)  # trained
    call = dict(
        prompt="a photo of thing number 1", height=64, width=64, num_inference_steps=2, output_type="np"
    )
    ours = KolorsPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32, device="cpu")
    ours.set_progress_bar_config(disable=True)
    ours.load_lora_weights(out / "pytorch_lora_weights.safetensors")
    ref = copy.deepcopy(reference_pipeline)
    ref.load_lora_weights({k: v for k, v in state.items() if k.startswith("unet.")})
    inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=4, target_modules=["query_key_value"]), ref.text_encoder
    )
    set_peft_model_state_dict(ref.text_encoder, te)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert_close(ours(**call, generator=gen()).images, ref(**call, generator=gen()).images)


KILLED_RUN = """
import os, signal, sys, torch
torch.set_num_threads({threads})
from kolors.train import TrainConfig, train_lora
def kill(step, loss):
    if step == 3:  # after the checkpoint of step 2 and the log row of step 3
        os.kill(os.getpid(), signal.SIGKILL)
train_lora(TrainConfig(**{kwargs!r}), on_step=kill)
"""


def test_killed_and_resumed_ends_at_the_same_lora_bit_for_bit(data, tiny_model_dir, tmp_path):
    kwargs = dict(data_dir=str(data), output=str(tmp_path / "killed"), model=str(tiny_model_dir), rank=4,
                  alpha=4, steps=5, lr=1e-2, resolution=64, batch_size=2, save_every=2, flip=True,
                  noise_offset=0.05, min_snr_gamma=5.0, device="cpu", progress=False)  # fmt: skip
    script = KILLED_RUN.format(threads=torch.get_num_threads(), kwargs=kwargs)
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    killed = Path(kwargs["output"])
    assert torch.load(killed / STATE_FILE, weights_only=True)["step"] == 2
    assert [r["step"] for r in read_log(killed)] == ["1", "2", "3"]

    train_lora(TrainConfig(**{**kwargs, "resume": killed}))
    straight = tmp_path / "straight"
    train_lora(TrainConfig(**{**kwargs, "output": straight}))
    a, b = (load_file(d / "pytorch_lora_weights.safetensors") for d in (killed, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_log(killed)] == ["1", "2", "3", "4", "5"]
    assert [r["loss"] for r in read_log(killed)] == [r["loss"] for r in read_log(straight)]


@pytest.mark.slow  # two torchrun processes and a third run: about 40 s on the 2-core test machine
def test_two_processes_equal_one_with_twice_the_batch(data, tiny_model_dir, tmp_path):
    args = ["train-lora", str(data), "--model", str(tiny_model_dir), "--rank", "4", "--alpha", "4", "--steps",
            "3", "--lr", "1e-3", "--resolution", "64", "--device", "cpu", "--quiet", "--flip"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "kolors"]
    run = subprocess.run([*cmd, *args, "-o", str(tmp_path / "ddp"), "--batch-size", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert main([*args, "-o", str(tmp_path / "one"), "--batch-size", "2"]) == 0
    a, b = (load_file(tmp_path / d / "pytorch_lora_weights.safetensors") for d in ("ddp", "one"))
    # Adam divides each gradient by its running size, so an element whose gradient is near zero moves by about
    # +-lr whatever the sign of its rounding noise: a few elements differ by up to lr / 2, the rest to 1e-5.
    loose = sum(int(((a[k] - b[k]).abs() > 1e-5).sum()) for k in a) / sum(v.numel() for v in a.values())
    assert loose < 0.01, loose
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=5e-4)
    la, lb = ([float(r["loss"]) for r in read_log(tmp_path / d)] for d in ("ddp", "one"))
    np.testing.assert_allclose(la, lb, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ data


def test_buckets_are_multiples_of_64_around_the_resolution():
    bs = buckets(1024)
    assert (1024, 1024) in bs and (832, 1216) in bs and (1216, 832) in bs
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024**2 and w * h > 0.8 * 1024**2 for w, h in bs)


def test_captions_from_txt_metadata_or_one_for_all(tmp_path):
    folder = write_images(tmp_path / "a", n=2, captions=False)
    (folder / "metadata.jsonl").write_text(
        '{"file_name": "img0.png", "text": "first"}\n{"file_name": "img1.png", "text": "second"}\n'
    )
    assert [e.caption for e in read_folder(folder)] == ["first", "second"]
    assert [e.caption for e in read_folder(folder, caption="sks dog")] == ["sks dog", "sks dog"]


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_folders_are_one_clear_error(tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KolorsError, match="has no images"):
        read_folder(empty)
    with pytest.raises(KolorsError, match="not found"):
        read_folder(tmp_path / "missing")
    uncaptioned = write_images(tmp_path / "nocap", n=2, captions=False)
    with pytest.raises(KolorsError, match=r"2 of 2 images .* have no caption \(first: img0.png\).*--caption"):
        read_folder(uncaptioned)
    code = main(["train-lora", str(empty), "--model", str(tiny_model_dir), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("kolors: error:") and "has no images" in err and "\n" not in err


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(resolution=1000), "resolution 1000 is not a multiple of 64; use 960 or 1024"),
        (dict(rank=0), "rank must be a whole number >= 1"),
        (dict(lr_schedule="linear"), "unknown lr_schedule"),
        (dict(lr=-1.0), "lr must be a number > 0"),
    ],
)
def test_bad_settings_are_one_clear_error(tmp_path, kw, message):
    with pytest.raises(KolorsError, match=message):
        config(tmp_path, tmp_path / "o", tmp_path, **kw).check()


def test_prior_preservation_adds_the_weighted_class_loss(data, tiny_model_dir, tmp_path):
    """The class batch has its own order and draws: at weight 0 the run is exactly the run without it."""
    classes = write_images(tmp_path / "classes", n=2, seed=9, captions=False)
    runs = {}
    for name, kw in {"none": {}, "zero": dict(prior_loss_weight=0.0), "prior": {}}.items():
        if name != "none":
            kw = dict(class_dir=classes, class_prompt="a photo", **kw)
        train_lora(config(data, tmp_path / name, tiny_model_dir, steps=2, save_every=2, **kw))
        runs[name] = load_file(tmp_path / name / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(runs["none"][k], runs["zero"][k]) for k in runs["none"])
    assert any(not torch.equal(runs["none"][k], runs["prior"][k]) for k in runs["none"])
    losses = {n: float(read_log(tmp_path / n)[0]["loss"]) for n in runs}
    assert losses["zero"] == losses["none"] < losses["prior"]  # subject loss + 0.7 x class loss
    with pytest.raises(KolorsError, match="needs both a folder of class images"):
        config(data, tmp_path / "x", tiny_model_dir, class_dir=classes).check()


def test_a_corrupt_image_is_skipped_with_a_warning_and_counted(tmp_path, tiny_model_dir, capsys):
    """Through the CLI: the warning is one line, the run goes on with the readable images."""
    folder = write_images(tmp_path / "d", n=2)
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "broken.txt").write_text("broken")
    out = tmp_path / "o"
    args = ["train-lora", str(folder), "--model", str(tiny_model_dir), "-o", str(out), "--steps", "1",
            "--resolution", "64", "--rank", "4", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "kolors: warning: skipped 1 of 3 images that could not be read: broken.png" in captured.err
    assert captured.out.strip() == str(out / "pytorch_lora_weights.safetensors")
    assert len(read_log(out)) == 1


def test_resume_with_other_settings_names_them_and_a_used_output_is_kept(
    trained, data, tiny_model_dir, tmp_path
):
    other = config(data, tmp_path / "o", tiny_model_dir, steps=15, batch_size=4, lr=1e-3, save_every=5, rank=8,
                   resume=trained)  # fmt: skip
    with pytest.raises(KolorsError, match=r"other settings: rank 4 \(now 8\); lr 0.03 \(now 0.001\)"):
        train_lora(other)
    before = (trained / STATE_FILE).read_bytes()
    with pytest.raises(KolorsError, match="already holds a training run; pass --resume"):
        train_lora(config(data, trained, tiny_model_dir))
    assert (trained / STATE_FILE).read_bytes() == before


def test_a_full_disk_keeps_the_previous_checkpoint(data, tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # the log at the start, then the LoRA and the state at step 2; the LoRA at step 4 fails
        calls.append(fd)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(
        KolorsError, match=r"could not save the LoRA at step 4 .*No space left.* previous one"
    ):
        train_lora(config(data, out, tiny_model_dir, steps=4))
    state = torch.load(out / STATE_FILE, weights_only=True)
    assert state["step"] == 2
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in state["lora"].items())
    assert not list(out.glob(".*.tmp"))
