"""The `kolors` command: parse, check, load, generate, save. Bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

from kolors.errors import KolorsError
from kolors.pipeline import DEFAULT_REPO
from kolors.request import MASKED_CONTENT

EXIT_BAD_INPUT = 2


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=DEFAULT_REPO, help="Kolors-diffusers folder or hub repo id (default: %(default)s)"
    )
    p.add_argument(
        "--unet",
        default=None,
        metavar="FILE",
        help="a community fine-tune's single-file UNet (diffusers or original SGM keys) in place of the model's",
    )
    p.add_argument(
        "--variant", default=None, help="weight file variant, e.g. fp16 (default: plain, else fp16)"
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--text-encoder-quant",
        default=None,
        choices=["int8", "int4"],
        help="weight-only quantized text encoder: less memory, slightly different images (experimental)",
    )
    p.add_argument(
        "--low-memory",
        dest="memory",
        action="store_const",
        const="low",
        default="normal",
        help="keep only the running model in memory: the text encoder streamed a layer at a time, on a GPU the "
        "rest parked in host memory between stages (same images, slower per prompt)",
    )
    p.add_argument(
        "--ip-adapter",
        default=None,
        metavar="PATH_OR_REPO",
        help="load a Kolors IP-Adapter-Plus (file, folder or hub repo, e.g. Kwai-Kolors/Kolors-IP-Adapter-Plus) "
        "with its image_encoder/: reference images as prompts",
    )
    p.add_argument(
        "--faceid",
        default=None,
        metavar="PATH_OR_REPO",
        help="load Kolors-IP-Adapter-FaceID-Plus (e.g. Kwai-Kolors/Kolors-IP-Adapter-FaceID-Plus): a face as a prompt",
    )
    p.add_argument(
        "--face-models",
        default=None,
        metavar="DIR",
        help="insightface's antelopev2 models, for --faceid (pip install 'kolors[faceid]'; non-commercial licence)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the UNet: the first step compiles (minutes), so it pays only over many images",
    )


def parse_lora(text: str) -> tuple[str, float]:
    """FILE or FILE:SCALE (a Windows drive's colon is part of FILE)."""
    path, _, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if path and not scale.startswith("\\") else (text, 1.0)
    except ValueError:
        return text, 1.0


def add_generation_options(p: argparse.ArgumentParser, *, batch: bool = False) -> None:
    """The request's options; `batch`: as `kolors batch` reads them (defaults for jobs, text-to-image only)."""
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument(
        "--guidance", type=float, default=5.0, help="classifier-free guidance scale; <= 1 turns it off"
    )
    p.add_argument(
        "--sampler",
        default="euler",
        help="euler (default), euler-a, heun, dpmpp-2m (good at 25 steps), dpmpp-2m-sde, unipc, ddim, "
        "lcm (LCM-distilled models)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        type=parse_lora,
        help="apply a LoRA (safetensors, diffusers/PEFT or kohya keys) at SCALE (default 1); repeat to mix",
    )
    p.add_argument(
        "--schedule",
        default=None,
        choices=["karras", "exponential"],
        help="the sigma schedule, where the sampler's diffusers scheduler has that flag (default: its own)",
    )
    if batch:
        p.add_argument(
            "--seed",
            type=int,
            default=0,
            help="base seed: a job without a seed gets one derived from this and the job (default: 0)",
        )
    else:
        p.add_argument(
            "--seed",
            type=int,
            default=None,
            help="image i gets seed + i (default: random, recorded in the PNG)",
        )
    size = "image-to-image: resize the image to it (default: the image's own size)"
    p.add_argument("--width", type=int, default=None if not batch else 1024, help=None if batch else size)
    p.add_argument("--height", type=int, default=None if not batch else 1024, help=None if batch else size)
    p.add_argument("--num-images", type=int, default=1)
    if batch:
        for name, default, what in (
            ("--max-width", 2048, "pixels"),
            ("--max-height", 2048, "pixels"),
            ("--max-steps", 150, "steps"),
            ("--max-images", 8, "images per job"),
        ):
            p.add_argument(
                name,
                type=int,
                default=default,
                help=f"refuse jobs over this many {what} (default: %(default)s)",
            )
        return
    p.add_argument("--ip-image", default=None, metavar="REF.png", help="reference image for --ip-adapter")
    p.add_argument(
        "--ip-scale", type=float, default=0.5, help="how strongly --ip-image steers (default: %(default)s)"
    )
    p.add_argument(
        "--face", default=None, metavar="FACE.jpg", help="a photo of the face to keep, for --faceid"
    )
    p.add_argument(
        "--face-scale", type=float, default=0.8, help="how strongly --face steers (default: %(default)s)"
    )
    p.add_argument("--image", default=None, help="init image for image-to-image")
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="image-to-image: how much to change (0..1, default 0.3; with a mask 0.9999)",
    )
    p.add_argument("--mask", default=None, help="inpaint: white = repaint, black = keep (needs --image)")
    p.add_argument(
        "--outpaint",
        default=None,
        metavar="L,R,T,B",
        help="extend --image by these pixels left, right, top, bottom and paint the new border",
    )
    p.add_argument("--mask-blur", type=float, default=4.0, help="blur the mask's edge, pixels (default 4)")
    p.add_argument("--mask-invert", action="store_true", help="repaint the black area instead")
    p.add_argument(
        "--masked-content",
        default="original",
        choices=MASKED_CONTENT,
        help="what the sampler starts from under the mask (A1111's; default original)",
    )
    p.add_argument(
        "--inpaint-padding",
        type=int,
        default=None,
        metavar="PX",
        help="inpaint only the box around the mask, padded by PX, at full size (A1111's 'only masked')",
    )
    p.add_argument(
        "--no-paste-back",
        dest="paste_back",
        action="store_false",
        help="keep the model's pixels outside the mask too (default: the original is pasted back there)",
    )


def add_control_options(p: argparse.ArgumentParser) -> None:
    """ControlNet units, repeatable: the k-th --control-image (and scale, preprocessor, window) goes with the k-th
    --controlnet; a single scale, preprocessor, start or end applies to every unit."""
    g = p.add_argument_group("ControlNet (repeat each option for several)")
    g.add_argument("--controlnet", action="append", default=[], help="ControlNet folder or hub repo")
    g.add_argument("--control-image", action="append", default=[], help="its control image")
    g.add_argument("--control-scale", action="append", type=float, default=[], help="weight (default 0.7)")
    g.add_argument(
        "--control-preprocess",
        action="append",
        default=[],
        help="none (default), canny, depth, openpose, dwpose",
    )
    g.add_argument("--control-start", action="append", type=float, default=[], help="fraction of the steps")
    g.add_argument("--control-end", action="append", type=float, default=[], help="fraction of the steps")
    g.add_argument(
        "--control-mode",
        action="append",
        default=[],
        choices=["balanced", "prompt", "control"],
        help="sd-webui-controlnet's: balanced (default), prompt (My prompt is more important), control "
        "(ControlNet is more important)",
    )
    g.add_argument(
        "--control-guess-mode",
        action="store_true",
        help="diffusers' guess mode for every ControlNet: the conditional half alone, weights rising over the "
        "skips (with balanced units)",
    )


def control_units(args: argparse.Namespace) -> tuple:
    """The ControlNet units of the command line, each with its control image read."""
    from kolors.pipeline import load_image
    from kolors.request import ControlUnit

    nets, images = args.controlnet, args.control_image
    if len(images) != len(nets):
        raise KolorsError(
            f"{len(images)} --control-image for {len(nets)} --controlnet; give one control image per ControlNet"
        )
    per_unit = {}
    if args.control_guess_mode and not nets:
        raise KolorsError("--control-guess-mode was given without --controlnet")
    options = (("scale", 0.7), ("preprocess", "none"), ("start", 0.0), ("end", 1.0), ("mode", "balanced"))
    for option, default in options:
        values = getattr(args, f"control_{option}")
        if values and not nets:
            raise KolorsError(f"--control-{option} was given without --controlnet")
        if len(values) > 1 and len(values) != len(nets):
            raise KolorsError(
                f"{len(values)} --control-{option} for {len(nets)} --controlnet; give one, or one per ControlNet"
            )
        per_unit[option] = values * len(nets) if len(values) == 1 else values or [default] * len(nets)
    return tuple(
        ControlUnit(
            model=net,
            image=load_image(image),
            scale=per_unit["scale"][k],
            preprocess=per_unit["preprocess"][k],
            start=per_unit["start"][k],
            end=per_unit["end"][k],
            control_mode=per_unit["mode"][k],
        )
        for k, (net, image) in enumerate(zip(nets, images, strict=True))
    )


def parse_named_controlnet(text: str) -> tuple[str, str]:
    """The server's NAME=PATH (a bare PATH is named by its folder or repo)."""
    name, sep, path = text.partition("=")
    if not sep:
        return text.rstrip("/").split("/")[-1], text
    if not name.strip() or not path.strip():
        raise KolorsError(f"--controlnet {text!r}: give NAME=PATH (a folder or hub repo)")
    return name.strip(), path.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kolors", description="Kolors text-to-image, lean and exact.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt")
    add_generation_options(gen)
    add_model_options(gen)
    gen.add_argument(
        "--output",
        "-o",
        default=None,
        help="PNG path (default: kolors-SEED.png); image i of several gets -i before the extension (-0, -1, ...: "
        "its seed is seed + i), as kolors batch names them",
    )
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    add_control_options(gen)
    dl = sub.add_parser("download", help="download a model into the Hugging Face cache (then usable offline)")
    dl.add_argument("model", nargs="?", default=DEFAULT_REPO)
    dl.add_argument("--variant", default=None, help="weight file variant (default: plain, else fp16)")
    dl.add_argument(
        "--configs-only",
        action="store_true",
        help="only the configs and the tokenizer (about 1 MB): enough for bench/fake_weights.py to make a "
        "random model to try kolors with, without the 18 GB of weights",
    )
    add_batch_parser(sub)
    add_serve_parser(sub)
    add_train_lora_parser(sub)
    return parser


def add_serve_parser(sub) -> None:
    srv = sub.add_parser(
        "serve",
        help="serve the OpenAI and AUTOMATIC1111 image APIs and a web page",
        description="Loads the model once and serves /v1/images/generations and /edits (OpenAI), /sdapi/v1/... "
        "(AUTOMATIC1111), a web page at / and the API docs at /docs, over one job queue.",
    )
    add_model_options(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    srv.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    srv.add_argument(
        "--api-key",
        default=os.environ.get("KOLORS_API_KEY"),
        help="Bearer token every API call must carry (default: $KOLORS_API_KEY); required off localhost",
    )
    srv.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name to answer without an API key besides localhost and loopback addresses (repeatable; "
        "e.g. the machine's name behind a reverse proxy); others are refused against DNS rebinding",
    )
    srv.add_argument(
        "--served-model-name",
        nargs="+",
        default=[],
        metavar="NAME",
        help="names clients may ask for (vLLM's convention); the first is the one answers carry (default: the "
        "model's name). OpenAI's own model names (dall-e-3, gpt-image-1, ...) are always accepted",
    )
    srv.add_argument(
        "--max-decodes", type=int, default=2, help="uploaded images decoded at once; more wait (default: 2)"
    )
    srv.add_argument(
        "--queue-size", type=int, default=64, help="jobs that may wait; more get 429 (default: 64)"
    )
    srv.add_argument(
        "--controlnet",
        action="append",
        default=[],
        help="NAME=PATH: a ControlNet (folder or hub repo) requests may use by NAME; repeatable",
    )
    srv.add_argument("--max-width", type=int, default=2048)
    srv.add_argument("--max-height", type=int, default=2048)
    srv.add_argument("--max-steps", type=int, default=150)
    srv.add_argument("--max-n", type=int, default=8, help="images per request (default: 8)")
    srv.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image upload (default: 20)")
    srv.add_argument(
        "--lora-dir",
        default=None,
        metavar="DIR",
        help="LoRA files requests may use by name: <lora:NAME:SCALE> in a prompt, or OpenAI's loras field",
    )
    srv.add_argument(
        "--preview-every",
        type=int,
        default=1,
        help="a live preview for /sdapi/v1/progress every N steps; 0 turns previews off (default: 1)",
    )
    srv.add_argument(
        "--url-ttl",
        type=float,
        default=3600.0,
        help="seconds a response_format=url image stays (default: 3600)",
    )
    srv.add_argument(
        "--ray",
        nargs="?",
        const=True,
        default=False,
        metavar="ADDRESS",
        help="serve on Ray Serve replicas: a new local instance, or the cluster at ADDRESS (e.g. auto, "
        "head:6379, ray://head:10001)",
    )
    srv.add_argument(
        "--replicas",
        default="1",
        metavar="N|auto",
        help="with --ray: model replicas, or auto to scale between --min-replicas and --max-replicas (default: 1)",
    )
    srv.add_argument("--min-replicas", type=int, default=1, help="with --replicas auto (default: 1)")
    srv.add_argument("--max-replicas", type=int, default=4, help="with --replicas auto (default: 4)")
    srv.add_argument(
        "--gpus-per-replica", type=float, default=0.0, help="with --ray: GPUs each replica holds (default: 0)"
    )
    srv.add_argument(
        "--cpus-per-replica", type=float, default=1.0, help="with --ray: CPUs each replica holds (default: 1)"
    )


def add_batch_parser(sub) -> None:
    bat = sub.add_parser(
        "batch",
        help="generate many images from a jobs file; rerun the same command to resume",
        description="Jobs: a .jsonl file (one request per line: prompt, negative_prompt, seed, steps, guidance, "
        "width, height, sampler, num_images, id), a .csv file with a prompt column, or a text file with one "
        "prompt per line. The options below are the defaults for what a job leaves out; --seed is the base of "
        "the seeds of jobs without one (default 0). Images go to DIR/KEY-N.png, recorded in DIR/manifest.jsonl.",
    )
    bat.add_argument("jobs", help="jobs file: .jsonl, .csv or text")
    bat.add_argument(
        "--output", "-o", required=True, metavar="DIR", help="folder for the PNGs and manifest.jsonl"
    )
    bat.add_argument("--batch-size", type=int, default=1, help="images per pipeline call (default: 1)")
    bat.add_argument(
        "--strict", action="store_true", help="stop at the first bad line instead of skipping it"
    )
    bat.add_argument(
        "--ray",
        nargs="?",
        const=True,
        default=False,
        metavar="ADDRESS",
        help="run on Ray: a new local instance, or the cluster at ADDRESS (e.g. auto, head:6379, ray://head:10001)",
    )
    bat.add_argument(
        "--ray-actors", type=int, default=None, help="Ray actors (default: one per GPU, else per CPUs)"
    )
    bat.add_argument(
        "--ray-cpus-per-actor", type=int, default=4, help="CPUs per actor without GPUs (default: 4)"
    )
    bat.add_argument("--quiet", action="store_true", help="no progress bar")
    add_generation_options(bat, batch=True)
    add_model_options(bat)


def add_train_lora_parser(sub) -> None:
    t = sub.add_parser(
        "train-lora",
        help="train a LoRA on a folder of captioned images (resumable; torchrun for several GPUs)",
        description="DATA_DIR: images with same-name .txt captions, or a metadata.jsonl (file_name, text), or "
        "--caption for all. Writes OUT_DIR/pytorch_lora_weights.safetensors (diffusers' LoRA format, loaded by "
        "kolors --lora and diffusers' load_lora_weights), OUT_DIR/log.csv and a resumable training state. "
        "Several processes: torchrun --nproc-per-node N -m kolors train-lora ...",
    )
    t.add_argument("data_dir", metavar="DATA_DIR")
    t.add_argument("--model", default=DEFAULT_REPO, help="Kolors-diffusers folder or hub repo id")
    t.add_argument("--variant", default=None, help="weight file variant, e.g. fp16")
    t.add_argument("--output", "-o", required=True, metavar="OUT_DIR")
    t.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    t.add_argument(
        "--alpha", type=float, default=16.0, help="LoRA alpha; scale alpha/rank (default: %(default)s)"
    )
    t.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: %(default)s)")
    t.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: %(default)s)")
    t.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine", "polynomial"])
    t.add_argument("--warmup", type=int, default=0, help="warm-up steps (default: %(default)s)")
    t.add_argument("--resolution", type=int, default=1024, help="bucket size in pixels, a multiple of 64")
    t.add_argument("--batch-size", type=int, default=1, help="images per step and process (default: 1)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--caption", default=None, help="one caption for every image")
    t.add_argument("--flip", action="store_true", help="random horizontal flips (both cached)")
    t.add_argument(
        "--target",
        nargs="+",
        default=None,
        metavar="MODULE",
        help="UNet modules to train (default: to_q to_k to_v to_out.0, the official script's)",
    )
    t.add_argument(
        "--train-text-encoder",
        action="store_true",
        help="also a LoRA on ChatGLM's query_key_value (the text encoder then stays in memory)",
    )
    t.add_argument("--class-dir", default=None, help="prior preservation: a folder of class images")
    t.add_argument("--class-prompt", default=None, help="prior preservation: the class images' prompt")
    t.add_argument(
        "--prior-loss-weight", type=float, default=0.7, help="the class loss's weight (default: 0.7)"
    )
    t.add_argument("--min-snr-gamma", type=float, default=None, help="min-SNR loss weighting, e.g. 5")
    t.add_argument("--noise-offset", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default: 1.0)")
    t.add_argument("--save-every", type=int, default=250, help="steps between checkpoints")
    t.add_argument("--sample-prompt", action="append", default=[], help="a prompt to sample (repeatable)")
    t.add_argument("--sample-every", type=int, default=250, help="steps between samples")
    t.add_argument("--resume", default=None, metavar="OUT_DIR", help="continue the run saved in OUT_DIR")
    t.add_argument("--gradient-checkpointing", action="store_true", help="less memory, ~30%% more time")
    t.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    t.add_argument("--kohya", action="store_true", help="also write a kohya-format copy")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def train_lora(args: argparse.Namespace) -> int:
    from kolors.train import TrainConfig
    from kolors.train import train_lora as train

    options = {
        k: getattr(args, k)
        for k in ("data_dir", "model", "variant", "output", "rank", "alpha", "steps", "lr", "lr_schedule",
                  "warmup", "resolution", "batch_size", "grad_accum", "seed", "caption", "flip",
                  "train_text_encoder", "class_dir", "class_prompt", "prior_loss_weight", "min_snr_gamma",
                  "noise_offset", "max_grad_norm", "save_every", "sample_every", "resume",
                  "gradient_checkpointing", "dtype", "device", "kohya")
    }  # fmt: skip
    if args.target:
        options["target"] = tuple(args.target)
    config = TrainConfig(**options, sample_prompt=tuple(args.sample_prompt), progress=not args.quiet)
    config.check()
    check_hub(args.model)
    path = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(path)
    return 0


# from_pretrained keywords beyond model, dtype, device and variant
# (the image-prompt adapters are loaded at start: requests carry reference images, not adapters)
LOAD_OPTIONS = ("text_encoder_quant", "memory", "compile", "unet", "ip_adapter", "faceid", "face_models")


def batch(args: argparse.Namespace) -> int:
    """Exit 0 when every job's images exist, 1 when some line or image failed (reported above the summary)."""
    import signal

    check_image_prompt_options(args)

    from kolors.batch import run as run_batch
    from kolors.request import Limits

    # SIGTERM (a scheduler stopping the job) ends the run as Ctrl-C does: the image being written is dropped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    summary = run_batch(
        args.jobs,
        args.output,
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        variant=args.variant,
        # Model options other parts add (e.g. --text-encoder-quant) pass through when given.
        load_options={k: v for k in LOAD_OPTIONS if (v := getattr(args, k, None)) is not None},
        defaults=dict(
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance=args.guidance,
            sampler=args.sampler,
            schedule=args.schedule,
            width=args.width,
            height=args.height,
            num_images=args.num_images,
            loras=tuple(args.lora),
        ),
        seed=args.seed,
        batch_size=args.batch_size,
        strict=args.strict,
        ray=args.ray,
        ray_actors=args.ray_actors,
        ray_cpus_per_actor=args.ray_cpus_per_actor,
        progress=not args.quiet,
        limits=Limits(args.max_width, args.max_height, args.max_steps, args.max_images),
    )
    return 0 if summary.failed == 0 else 1


def download(args: argparse.Namespace) -> int:
    from kolors.pipeline import KolorsPipeline

    check_hub(args.model)
    if args.configs_only:
        from huggingface_hub import snapshot_download

        print(snapshot_download(args.model, allow_patterns=["*.json", "tokenizer/*"]))
        return 0
    print(KolorsPipeline.resolve(args.model, variant=args.variant))
    return 0


def check_hub(model: str, timeout: float = 3.0) -> None:
    """A hub model without a network fails now, in one line, instead of after ~25 s of the hub client's
    retries; a local folder, or HF_HUB_OFFLINE=1 (the cache only), needs no network. A model downloaded
    before is used from the cache when the hub cannot be reached, as if HF_HUB_OFFLINE=1 had been set."""
    import socket
    from urllib.parse import urlparse

    if Path(model).exists() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as e:
        from huggingface_hub import constants, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
            # The hub client would reach the same cache only after its retries; every later lookup in this
            # process (adapters included) goes straight to the cache.
            os.environ["HF_HUB_OFFLINE"] = "1"
            constants.HF_HUB_OFFLINE = True
            print(
                f"kolors: the Hugging Face hub at {endpoint.hostname} cannot be reached ({e.strerror or e}); "
                f"using {model} from the cache",
                file=sys.stderr,
            )
            return
        raise KolorsError(
            f"cannot reach the Hugging Face hub at {endpoint.hostname} ({e.strerror or e}); if {model} is "
            "downloaded already, run with HF_HUB_OFFLINE=1, or pass --model PATH to a local model folder"
        ) from None


def output_paths(output: str | None, seed: int, n: int) -> list[Path]:
    """The PNG paths, checked writable before any model is loaded: image i of several is NAME-i.png."""
    path = Path(output) if output else Path(f"kolors-{seed}.png")
    if path.suffix.lower() != ".png":
        raise KolorsError(
            f"output {path} must end in .png (the generation parameters are stored in PNG text)"
        )
    if not path.parent.is_dir():
        raise KolorsError(f"output folder {path.parent} does not exist; create it or choose another --output")
    paths = [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]
    for p in paths:
        if p.is_dir():
            raise KolorsError(f"output {p} is a folder; give a file name ending in .png")
    try:  # what save_png will do: a temporary file in that folder, renamed into place
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as e:
        raise KolorsError(
            f"cannot write to the output folder {path.parent} ({e.strerror}); choose another --output"
        ) from None
    return paths


def check_image_prompt_options(args: argparse.Namespace) -> None:
    """Option pairs that need each other, checked before any model is loaded."""
    if getattr(args, "ip_image", None) and not args.ip_adapter:
        raise KolorsError("--ip-image needs an IP-Adapter: add --ip-adapter PATH_OR_REPO")
    if getattr(args, "face", None) and not args.faceid:
        raise KolorsError("--face needs the FaceID adapter: add --faceid PATH_OR_REPO")
    if args.face_models and not args.faceid:
        raise KolorsError("--face-models is for --faceid; add --faceid PATH_OR_REPO")


def generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from kolors.pipeline import KolorsPipeline, load_image, lora_hashes, outpaint_canvas
    from kolors.request import GenerationRequest, check_size, save_png

    check_image_prompt_options(args)
    image = load_image(args.image) if args.image else None
    if (args.mask or args.outpaint) and image is None:
        raise KolorsError(
            f"{'--mask' if args.mask else '--outpaint'} needs --image, the picture to paint into"
        )
    if args.mask and args.outpaint:
        raise KolorsError("--outpaint makes its own mask; give --mask or --outpaint, not both")
    mask = load_image(args.mask) if args.mask else None
    if args.outpaint:
        image, mask = outpaint_canvas(image, *parse_outpaint(args.outpaint))
    ip_image = load_image(args.ip_image) if args.ip_image else None
    face_image = load_image(args.face) if args.face else None
    if image is not None and (args.width or args.height):
        # As the server does: the image is resized to the size asked for (a missing side keeps the image's,
        # rounded down to 8), and the pipeline is given the image alone, so no size changes its conditioning.
        size = (args.width or image.width - image.width % 8, args.height or image.height - image.height % 8)
        check_size(*size)
        image = image.convert("RGB").resize(size, resample=Image.LANCZOS)
    strength = args.strength if args.strength is not None else 0.9999 if mask is not None else 0.3
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=float(args.guidance),
        sampler=args.sampler,
        schedule=args.schedule,
        seed=args.seed,
        width=args.width or 1024,
        height=args.height or 1024,
        num_images=args.num_images,
        image=image,
        strength=strength,
        loras=tuple(args.lora),
        mask=mask,
        mask_blur=args.mask_blur,
        mask_invert=args.mask_invert,
        masked_content=args.masked_content,
        inpaint_padding=args.inpaint_padding,
        paste_back=args.paste_back,
        controlnets=control_units(args),
        control_guess_mode=args.control_guess_mode,
        ip_image=ip_image,
        ip_scale=args.ip_scale,
        face_image=face_image,
        face_scale=args.face_scale,
    )
    request = request.validate().with_seed()
    seed = request.seed
    paths = output_paths(args.output, seed, args.num_images)
    if args.strength is not None and image is None:
        print(
            "kolors: warning: --strength applies only to image-to-image (--image); ignored", file=sys.stderr
        )

    check_hub(args.model)
    pipe = KolorsPipeline.from_pretrained(
        args.model,
        dtype=args.dtype,
        device=args.device,
        variant=args.variant,
        text_encoder_quant=args.text_encoder_quant,
        memory=args.memory,
        compile=bool(args.compile),
        unet=args.unet,
        ip_adapter=args.ip_adapter,
        faceid=args.faceid,
        face_models=args.face_models,
    )
    pipe.set_progress_bar_config(disable=args.quiet)
    images = pipe.generate(request)
    request = lora_hashes(pipe, request)
    for (img, img_seed), path in zip(images, paths, strict=True):
        save_png(img, path, request.infotext(img_seed, pipe.label, size=img.size))
        print(f"{path}  (seed {img_seed})")
    return 0


def parse_outpaint(text: str) -> tuple[int, int, int, int]:
    try:
        sides = tuple(int(v) for v in text.split(","))
    except ValueError:
        sides = ()
    if len(sides) != 4 or min(sides) < 0:
        raise KolorsError(f"--outpaint takes four pixel counts >= 0, L,R,T,B (like 0,256,0,0), not {text!r}")
    return sides


def serve(args: argparse.Namespace) -> int:
    """Check the options, load the model, then listen: a bad option or model fails before the port is taken."""
    try:
        from kolors.serve import ServerConfig, check_bind, run
    except ImportError as e:
        raise KolorsError(
            f"kolors serve needs the server extra ({e.name} is missing): pip install 'kolors[server]'"
        ) from None
    from kolors.pipeline import KolorsPipeline

    config = ServerConfig(
        api_key=args.api_key or None,
        queue_size=args.queue_size,
        max_width=args.max_width,
        max_height=args.max_height,
        max_steps=args.max_steps,
        max_n=args.max_n,
        max_upload_mb=args.max_upload_mb,
        url_ttl=args.url_ttl,
        preview_every=args.preview_every,
        lora_dir=args.lora_dir,
        allowed_hosts=tuple(args.allowed_host),
        served_model_names=tuple(args.served_model_name),
        max_decodes=args.max_decodes,
    )
    config.check()
    check_bind(args.host, config.api_key)
    if not 0 < args.port < 65536:
        raise KolorsError(f"port must be between 1 and 65535, not {args.port}")
    load_options = {k: v for k in LOAD_OPTIONS if (v := getattr(args, k, None)) is not None}
    controlnets = [parse_named_controlnet(text) for text in args.controlnet]
    check_image_prompt_options(args)
    if args.ray is not False:
        return serve_on_ray(args, config, load_options, controlnets)
    check_hub(args.model)
    pipe = KolorsPipeline.from_pretrained(
        args.model, dtype=args.dtype, device=args.device, variant=args.variant, **load_options
    )
    for name, path in controlnets:  # requests name them; loaded before the port is taken
        pipe.load_controlnet(path, name=name)
    run(pipe, config, host=args.host, port=args.port)
    return 0


def serve_on_ray(args: argparse.Namespace, config, load_options: dict, controlnets: list) -> int:
    """`kolors serve --ray`: options and the cluster's address checked before anything starts."""
    from kolors.serve import on_ray

    if args.replicas == "auto":
        replicas = None
    else:
        try:
            replicas = int(args.replicas)
        except ValueError:
            raise KolorsError(f"--replicas must be a whole number or auto, not {args.replicas!r}") from None
    scaling = on_ray.Scaling(
        replicas=replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas if replicas is None else replicas,
        gpus_per_replica=args.gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica,
    )
    scaling.check()
    on_ray.require_serve()
    address = None if args.ray is True else args.ray
    on_ray.check_address(address)
    model = args.model
    if Path(model).is_dir():  # a typo is one line here, not a traceback from every replica
        from kolors.pipeline import KolorsPipeline

        KolorsPipeline.resolve(model)
        model = str(Path(model).resolve())  # replicas start in folders of their own
    else:
        check_hub(model)
    if config.lora_dir is not None:  # requests carry the LoRA files' paths to the replicas
        config = dataclasses.replace(config, lora_dir=str(Path(config.lora_dir).resolve()))
    controlnets = [(name, str(Path(p).resolve()) if Path(p).exists() else p) for name, p in controlnets]
    model_options = dict(
        model=model, dtype=args.dtype, device=args.device, variant=args.variant, **load_options
    )
    on_ray.run(model_options, controlnets, config, scaling, address=address, host=args.host, port=args.port)
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as the CLI's other messages: one line on stderr, without the Python source line behind them."""
    print(f"kolors: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.showwarning = _show_warning
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate(args)
        if args.command == "download":
            return download(args)
        if args.command == "batch":
            return batch(args)
        if args.command == "serve":
            return serve(args)
        if args.command == "train-lora":
            return train_lora(args)
    except KolorsError as e:
        print(f"kolors: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("kolors: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
