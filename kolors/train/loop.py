"""Training a LoRA on Kolors' UNet: the settings (TrainConfig), the loss, the loop, its checkpoints.

What the official Kwai-Kolors DreamBooth-LoRA script computes, on one machine: epsilon MSE over the model's
training timesteps (1100, scaled_linear betas from scheduler_config.json), SDXL size conditioning, PEFT-style LoRA
on the attention projections, AdamW, gradient clipping. The text encoder and the VAE run once, to cache the
captions' embeddings and the images' latent distributions, and leave memory before the UNet trains.

Every random draw of a step (timesteps, noise, the latent sample, the flip) comes from a generator seeded by the
run's seed and the step, and the data order from the seed and the epoch, for the global batch (all processes
together): a run resumed from a checkpoint, or spread over N processes (torchrun), draws what one uninterrupted
process with N times the batch draws. Processes average their gradients (an all-reduce of the LoRA's gradients
after each backward: what DistributedDataParallel does, for a few megabytes of parameters).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import gc
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from tqdm.auto import tqdm

from kolors import samplers
from kolors.adapters.lora_train import UNET_TARGETS, TrainableLora, lora_file
from kolors.components import load_text_encoder, load_unet, load_vae, vae_dtype
from kolors.errors import KolorsError
from kolors.models.tokenizer import ChatGLMTokenizer
from kolors.models.unet import ResnetBlock2D, Transformer2DModel, UNet2DConditionModel
from kolors.pipeline import KolorsPipeline, PromptEmbeds, parse_device
from kolors.train.data import DataOrder, LatentCache, cache_latents, check_resolution, read_folder
from kolors.weights import check_model_folder, resolve_model

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
STATE_FILE = "training_state.pt"
LOG_FILE = "log.csv"
LOG_COLUMNS = ("step", "loss", "lr", "seconds")
LR_SCHEDULES = ("constant", "cosine", "polynomial")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_TOKENS = 256  # Kolors' prompt length (the pipeline's)
TEXT_ENCODER_TARGETS = ("query_key_value",)


@dataclass(frozen=True)
class TrainConfig:
    """One LoRA training run; the CLI's `kolors train-lora` options by the same names."""

    data_dir: str | os.PathLike
    output: str | os.PathLike
    model: str | os.PathLike = "Kwai-Kolors/Kolors-diffusers"
    variant: str | None = None
    rank: int = 16
    alpha: float = 16.0
    steps: int = 1000
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup: int = 0
    resolution: int = 1024
    batch_size: int = 1  # per process; the global batch is batch_size x processes
    grad_accum: int = 1
    seed: int = 0
    caption: str | None = None  # one caption for every image, instead of the .txt files or metadata.jsonl
    flip: bool = False
    target: tuple[str, ...] = UNET_TARGETS
    train_text_encoder: bool = False
    class_dir: str | os.PathLike | None = None
    class_prompt: str | None = None
    prior_loss_weight: float = 0.7
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-4
    save_every: int = 250
    sample_prompt: tuple[str, ...] = ()
    sample_every: int = 250
    sample_steps: int = 25
    resume: str | os.PathLike | None = None
    gradient_checkpointing: bool = False
    dtype: str = "auto"  # bf16 on a GPU, fp32 on a CPU
    device: str = "auto"
    kohya: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", tuple(self.target))
        prompts = (self.sample_prompt,) if isinstance(self.sample_prompt, str) else tuple(self.sample_prompt)
        object.__setattr__(self, "sample_prompt", prompts)

    def check(self) -> None:
        """Every value in range, or one error naming the option and what it takes."""
        whole = {"rank": 1, "steps": 1, "batch_size": 1, "grad_accum": 1, "save_every": 1, "sample_every": 1,
                 "sample_steps": 1, "warmup": 0, "seed": 0}  # fmt: skip
        for name, low in whole.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise KolorsError(f"{name} must be a whole number >= {low}, not {v!r}")
        positive = {"alpha": self.alpha, "lr": self.lr, "max_grad_norm": self.max_grad_norm}
        if self.min_snr_gamma is not None:
            positive["min_snr_gamma"] = self.min_snr_gamma
        for name, v in positive.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise KolorsError(f"{name} must be a number > 0, not {v!r}")
        for name in ("noise_offset", "weight_decay", "prior_loss_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise KolorsError(f"{name} must be a number >= 0, not {v!r}")
        check_resolution(self.resolution)
        if self.lr_schedule not in LR_SCHEDULES:
            raise KolorsError(
                f"unknown lr_schedule {self.lr_schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise KolorsError(f"unknown dtype {self.dtype!r}; choose auto, {', '.join(DTYPES)}")
        if not self.target or not all(isinstance(t, str) and t for t in self.target):
            raise KolorsError(f"target must name at least one module, e.g. to_q; got {self.target!r}")
        if (self.class_dir is None) != (self.class_prompt is None) or self.class_prompt == "":
            raise KolorsError(
                "prior preservation needs both a folder of class images (class_dir) and their prompt (class_prompt)"
            )
        if self.caption is not None and not self.caption.strip():
            raise KolorsError("caption is empty; give a caption or leave it out to use the .txt files")

    def settings(self) -> dict:
        """What decides the trained weights: a resumed run must have the same. The per-process batch is not
        one of them (the global batch is, recorded apart), nor where the files go and how often."""
        skip = {"output", "resume", "save_every", "sample_prompt", "sample_every", "sample_steps", "kohya",
                "progress", "device", "batch_size"}  # fmt: skip
        out = {}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                v = getattr(self, f.name)
                out[f.name] = (
                    list(v) if isinstance(v, tuple) else (str(v) if isinstance(v, os.PathLike) else v)
                )
        return out


# ---------------------------------------------------------------------------------------------------- the loss


def diffusion_loss(
    unet: UNet2DConditionModel,
    latents: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    embeds: Tensor,
    pooled: Tensor,
    time_ids: Tensor,
    alphas_cumprod: Tensor,
    *,
    pads: Sequence[int] | None = None,
    min_snr_gamma: float | None = None,
) -> Tensor:
    """Epsilon MSE of the UNet at `timesteps` on latents noised as diffusers' DDPMScheduler.add_noise, in
    float32, the mean over the batch; with `min_snr_gamma`, each image weighted min(SNR, gamma) / SNR (Hang et al.
    2023). `pads` (each caption's left pad count) lets the cross-attention merge the pad keys: the same function,
    fewer keys (kolors.models.unet)."""
    dtype = unet.conv_in.weight.dtype
    acc = torch.promote_types(dtype, torch.float32)  # float32, or float64 for a float64 model (tests)
    acp = alphas_cumprod.to(latents.device)[timesteps].to(acc)
    a, s = acp.sqrt()[:, None, None, None], (1 - acp).sqrt()[:, None, None, None]
    noisy = (a * latents.to(acc) + s * noise.to(acc)).to(dtype)
    context = (
        unet.prepare_context(embeds.to(dtype), pads=list(pads)) if pads is not None else embeds.to(dtype)
    )
    pred = unet(noisy, timesteps, context, pooled.to(dtype), time_ids.to(dtype))
    per_image = F.mse_loss(pred.to(acc), noise.to(acc), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma is not None:
        snr = acp / (1 - acp)
        per_image = per_image * snr.clamp(max=min_snr_gamma) / snr
    return per_image.mean()


def checkpoint_blocks(unet: nn.Module) -> None:
    """Gradient checkpointing: every resnet and transformer of the UNet keeps only its inputs for the backward
    pass and runs again there (torch.utils.checkpoint). Set on the loaded model's modules; the model file does
    not change, and without gradients (sampling) they run as before."""
    for m in unet.modules():
        if isinstance(m, (ResnetBlock2D, Transformer2DModel)):
            m.forward = functools.partial(_checkpointed, m.forward)


def _checkpointed(forward: Callable, *args):
    if not torch.is_grad_enabled():
        return forward(*args)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)


def lr_lambda(schedule: str, warmup: int, steps: int) -> Callable[[int], float]:
    """diffusers' get_scheduler shapes as a factor of the learning rate: linear warm-up, then constant, a half
    cosine to 0, or a linear ("polynomial", power 1) decay to 1e-7 of it."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1) if schedule == "constant" else step / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if schedule == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return max(1e-7, 1.0 - progress)

    return factor


# ---------------------------------------------------------------------------------------------------- files


def write_atomic(path: Path, data: bytes, what: str, step: int) -> None:
    """`data` into `path` by a temporary file and a rename: a kill or a full disk leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KolorsError(
            f"could not save the {what} at step {step} to {path} ({e.strerror or e}); the previous one, if any, "
            "is intact: free some space and rerun with --resume"
        ) from None


def _tensor_file(state: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return safetensors_bytes(state, metadata=metadata)


def _torch_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def read_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    if not path.is_file():
        raise KolorsError(
            f"--resume {folder}: no {STATE_FILE} there; pass the output folder of a training run"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KolorsError(f"--resume {folder}: {STATE_FILE} is unreadable ({str(e)[:120]})") from None


def check_resumable(config: TrainConfig, state: dict, global_batch: int) -> None:
    saved = {**state["settings"], "global_batch": state["global_batch"]}
    now = {**config.settings(), "global_batch": global_batch}
    differ = [f"{k} {saved.get(k)!r} (now {now[k]!r})" for k in now if saved.get(k) != now[k]]
    if differ:
        raise KolorsError(
            f"--resume {config.resume}: that run was made with other settings: {'; '.join(differ)}; resume with "
            "its settings or train into a new --output"
        )


def _log_rows(path: Path, up_to: int) -> list[list[str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [r for r in rows if r and int(r[0]) <= up_to]


# ---------------------------------------------------------------------------------------------------- the run


@dataclass
class _Captions:
    embeds: Tensor  # (N, T, hidden) in the training dtype, on the CPU
    pooled: Tensor  # (N, hidden)
    pads: list[int]


def _encode_texts(tokenizer, text_encoder, texts: Sequence[str], device) -> _Captions:
    embeds, pooled, pads = [], [], []
    # One text per call: a caption's embedding is then the same bits whatever other captions the data set has
    # (a batched call rounds differently with its other rows), so runs agree that share a caption.
    for text in texts:
        tokens = tokenizer([text], max_length=MAX_TOKENS)
        with torch.inference_mode():
            e, p = text_encoder(
                tokens.input_ids.to(device), tokens.attention_mask.to(device), tokens.position_ids.to(device)
            )
        embeds.append(e.cpu().clone())  # clones: an inference tensor cannot enter the autograd graph
        pooled.append(p.cpu().clone())
        pads += (tokens.attention_mask.shape[1] - tokens.attention_mask.sum(dim=1)).tolist()
    return _Captions(torch.cat(embeds), torch.cat(pooled), pads)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _distributed(device_option: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device): torchrun's environment, the process group started here if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, parse_device(device_option)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_option in ("auto", "cuda")
    device = torch.device("cuda", local) if cuda else parse_device(device_option)
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _average_gradients(params: Sequence[nn.Parameter], world: int) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def step_draws(seed: int, micro: int, global_batch: int, shape: Sequence[int]) -> dict[str, Tensor]:
    """Every random number of micro-step `micro`, for the whole global batch, from its own CPU generator."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * (micro + 1))
    return {
        "u": torch.rand(global_batch, generator=g),  # the timestep, uniform over the training timesteps
        "flip": torch.rand(global_batch, generator=g),
        "eps": torch.randn((global_batch, *shape), generator=g),  # the latent's draw from its distribution
        "noise": torch.randn((global_batch, *shape), generator=g),
        "offset": torch.randn((global_batch, shape[0], 1, 1), generator=g),
    }


def train_lora(config: TrainConfig, *, on_step: Callable[[int, float], None] | None = None) -> Path:
    """Train a LoRA as `config` says; returns OUT/pytorch_lora_weights.safetensors. `on_step(step, loss)` runs
    after each optimizer step (on every process)."""
    config.check()
    rank, world, device = _distributed(config.device)
    main = rank == 0
    dtype = DTYPES.get(config.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    out = Path(config.output).expanduser()
    global_batch = config.batch_size * world

    examples = read_folder(config.data_dir, config.caption)
    prior = (
        None
        if config.class_dir is None
        else read_folder(config.class_dir, config.class_prompt, "class images")
    )
    state = None
    if config.resume is not None:
        state = read_state(Path(config.resume).expanduser())
        check_resumable(config, state, global_batch)
    elif (out / STATE_FILE).is_file():
        raise KolorsError(
            f"{out} already holds a training run; pass --resume {out} to continue it, or another --output"
        )
    if main:
        out.mkdir(parents=True, exist_ok=True)

    root = resolve_model(config.model, variant=config.variant)
    check_model_folder(root)
    scheduler_config = samplers.load_scheduler_config(root / "scheduler" / "scheduler_config.json")
    if scheduler_config.prediction_type != "epsilon":
        raise KolorsError(
            f"this trainer predicts epsilon; the model's scheduler says {scheduler_config.prediction_type}"
        )
    alphas_cumprod = samplers.train_alphas_cumprod(scheduler_config)

    # The frozen parts, once: caption embeddings, then latents; each model leaves memory after its cache.
    tokenizer = ChatGLMTokenizer.from_pretrained(root / "tokenizer")
    text_encoder = load_text_encoder(
        root / "text_encoder", dtype=dtype, device=device, variant=config.variant
    )
    texts = sorted({e.caption for e in examples} | ({config.class_prompt} if prior else set()))
    te_lora, captions, samples = None, None, None
    if (
        config.train_text_encoder
    ):  # the official script's text-encoder LoRA: ChatGLM's fused q, k, v projection
        te_lora = TrainableLora(
            text_encoder, TEXT_ENCODER_TARGETS, rank=config.rank, alpha=config.alpha, component="text_encoder",
            generator=torch.Generator().manual_seed(config.seed + 1),
        )  # fmt: skip
        samples = list(config.sample_prompt) or None
    else:
        captions = _encode_texts(tokenizer, text_encoder, texts, device)
    if config.sample_prompt and te_lora is None:
        s = _encode_texts(tokenizer, text_encoder, [*config.sample_prompt, ""], device)
        n = len(config.sample_prompt)
        samples = [
            PromptEmbeds(
                s.embeds[k : k + 1].to(device),
                s.pooled[k : k + 1].to(device),
                s.embeds[n:].to(device),
                s.pooled[n:].to(device),
                (s.pads[k],),
                (s.pads[n],),
            )  # fmt: skip
            for k in range(n)
        ]
    if te_lora is None:
        text_encoder = nn.Module()  # frees ChatGLM; the sampling pipeline's prompts come encoded
        _free()
    vdtype = vae_dtype(root / "vae", dtype)
    vae = load_vae(root / "vae", dtype=vdtype, device=device, variant=config.variant)
    with torch.inference_mode():
        cache = cache_latents(
            examples, lambda px: vae.encode(px.to(device, vdtype)), config.resolution, config.flip
        )
        if prior is not None:
            prior = cache_latents(
                prior, lambda px: vae.encode(px.to(device, vdtype)), config.resolution, config.flip
            )
    scaling = vae.config.scaling_factor
    if samples is None:
        del vae
        vae = None
        _free()
    caption_index = {t: i for i, t in enumerate(texts)}

    def encode(which: list[int]) -> tuple[Tensor, Tensor, list[int]]:
        """Text states, pooled and pad counts of these captions: cached, or from the training text encoder."""
        if te_lora is None:
            return captions.embeds[which], captions.pooled[which], [captions.pads[j] for j in which]
        tokens = tokenizer([texts[j] for j in which], max_length=MAX_TOKENS)
        mask = tokens.attention_mask
        embeds, pooled = text_encoder(
            tokens.input_ids.to(device), mask.to(device), tokens.position_ids.to(device)
        )
        return embeds, pooled, (mask.shape[1] - mask.sum(dim=1)).tolist()

    unet = load_unet(root / "unet", dtype=dtype, device=device, variant=config.variant)
    lora = TrainableLora(
        unet, config.target, rank=config.rank, alpha=config.alpha,
        generator=torch.Generator().manual_seed(config.seed),
    )  # fmt: skip
    lora.attach()
    if config.gradient_checkpointing:
        checkpoint_blocks(unet)
    loras = [lora] if te_lora is None else [lora, te_lora]
    if te_lora is not None:
        te_lora.attach()
    params = [p for x in loras for p in x.parameters()]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.lr_schedule, config.warmup, config.steps)
    )
    start = 0
    if state is not None:
        for x in loras:
            x.load_peft_state({k: v for k, v in state["lora"].items() if k.startswith(x.component + ".")})
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])
    order = DataOrder(cache.buckets, global_batch, config.seed)
    # Prior preservation (DreamBooth): each micro-batch of the subject's images has one of class images beside it,
    # in its own order and with its own draws, its loss weighted by prior_loss_weight.
    prior_order = None if prior is None else DataOrder(prior.buckets, global_batch, config.seed + 1)

    log_path = out / LOG_FILE
    if main:
        rows = _log_rows(Path(config.resume).expanduser() / LOG_FILE, start) if state is not None else []
        text = "\n".join(",".join(r) for r in [list(LOG_COLUMNS), *rows]) + "\n"
        write_atomic(log_path, text.encode(), "log", start)

    def save(step: int) -> None:
        if not main:
            return
        tensors, header = lora_file(loras)
        write_atomic(out / LORA_FILE, _tensor_file(tensors, header), "LoRA", step)
        if config.kohya:
            kohya = {k: v for x in loras for k, v in x.kohya_state().items()}
            write_atomic(out / KOHYA_FILE, _tensor_file(kohya), "kohya LoRA", step)
        checkpoint = {
            "step": step,
            "lora": tensors,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "settings": config.settings(),
            "global_batch": global_batch,
            "rng": torch.get_rng_state(),  # unused by the loop (its draws are seeded per step); kept for hooks
        }
        write_atomic(out / STATE_FILE, _torch_bytes(checkpoint), "training state", step)

    def sample(step: int) -> None:
        if not main or samples is None:
            return
        pipe = KolorsPipeline(
            tokenizer, text_encoder, unet, vae, scheduler_config, device=device, dtype=dtype
        )
        pipe.set_progress_bar_config(disable=True)
        (out / "samples").mkdir(exist_ok=True)
        for k, embeds in enumerate(samples):
            prompt = dict(prompt=embeds) if isinstance(embeds, str) else dict(prompt_embeds=embeds)
            image = pipe(**prompt, height=config.resolution, width=config.resolution,
                         num_inference_steps=config.sample_steps, seed=config.seed + k).images[0]  # fmt: skip
            image.save(out / "samples" / f"step-{step}-{k}.png")

    bar = tqdm(total=config.steps, initial=start, disable=not (main and config.progress), desc="train-lora")
    for step in range(start, config.steps):
        began = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64)
        for a in range(config.grad_accum):
            micro = step * config.grad_accum + a
            share = slice(rank * config.batch_size, (rank + 1) * config.batch_size)
            total += _micro_step(config, unet, cache, encode, caption_index, order(micro)[share], micro, rank,
                                 global_batch, alphas_cumprod, scaling, device)  # fmt: skip
            if prior_order is not None:
                total += _micro_step(config, unet, prior, encode, caption_index, prior_order(micro)[share],
                                     micro, rank, global_batch, alphas_cumprod, scaling, device,
                                     weight=config.prior_loss_weight, stream=1)  # fmt: skip
        if world > 1:
            _average_gradients(params, world)
            dist.all_reduce(total)
            total /= world
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done, loss = step + 1, float(total) / config.grad_accum
        if main:
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow(
                    [done, f"{loss:.6g}", f"{lr:.6g}", f"{time.perf_counter() - began:.3f}"]
                )
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}")
        if done % config.save_every == 0 or done == config.steps:
            save(done)
        if done % config.sample_every == 0 or done == config.steps:
            sample(done)
        if world > 1:
            dist.barrier()
        if on_step is not None:
            on_step(done, loss)
    bar.close()
    if start >= config.steps:
        save(config.steps)
    return out / LORA_FILE


def _micro_step(config, unet, cache: LatentCache, encode: Callable, caption_index, mine, micro, rank,
                global_batch, alphas_cumprod, scaling, device, weight: float = 1.0, stream: int = 0) -> Tensor:  # fmt: skip
    """Forward and backward of this process's share of one micro-batch; returns its loss times `weight`.
    `stream` 1 draws the class images' random numbers, apart from the subject's."""
    shape = cache.mean[mine[0]].shape[1:]
    draws = step_draws(config.seed + 7_777_777 * stream, micro, global_batch, shape)
    rows = slice(rank * config.batch_size, (rank + 1) * config.batch_size)
    flips = [(draws["flip"][j] < 0.5).item() and config.flip for j in range(global_batch)][rows]
    mean = torch.stack([cache.mean[i][int(f)] for i, f in zip(mine, flips, strict=True)])
    std = torch.stack([cache.std[i][int(f)] for i, f in zip(mine, flips, strict=True)])
    latents = (mean + std * draws["eps"][rows]) * scaling
    noise = draws["noise"][rows]
    if config.noise_offset:
        noise = noise + config.noise_offset * draws["offset"][rows]
    timesteps = (draws["u"][rows] * len(alphas_cumprod)).long().clamp(max=len(alphas_cumprod) - 1)
    which = [caption_index[cache.examples[i].caption] for i in mine]
    embeds, pooled, pads = encode(which)
    loss = diffusion_loss(
        unet,
        latents.to(device),
        noise.to(device),
        timesteps.to(device),
        embeds.to(device),
        pooled.to(device),
        torch.stack([cache.time_ids[i] for i in mine]).to(device),
        alphas_cumprod,
        pads=pads,
        min_snr_gamma=config.min_snr_gamma,
    )
    (loss * weight / config.grad_accum).backward()
    return loss.detach().double().cpu() * weight
