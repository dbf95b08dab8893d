#!/usr/bin/env bash
# The CUDA path, checked and measured in one run on a machine with an NVIDIA GPU:
#
#     OUT=/tmp/gpu-logs bash bench/gpu.sh            # logs in $OUT, a summary on stdout
#
# Steps (each with its own time limit; one that fails does not stop the next):
#   tests     tests/test_cuda.py (parity with diffusers on the GPU, low memory, int8/int4, compile, no syncs)
#   weights   full-size fake weights (bench/fake_weights.py) into $MODEL, unless already there
#   generate  1024x1024, 25 steps dpmpp-2m, fp16: diffusers and kolors in one process, alternating
#   memory    one 1024x1024 generation per process: diffusers, its model CPU offload, kolors, kolors low memory
#   unet      one full-size UNet step at 128x128 latents (1024 px) with CFG, fp16, eager and torch.compile
#   encode    encode_prompt at full ChatGLM3 size, fp16, diffusers against kolors
#   quant     the int8 and int4 text encoders against fp16 at full size: time, bytes, deviation
# Adapter steps, not in the default list (ask for them: STEPS="weights controlnet ipadapter train lora" bash bench/gpu.sh):
#   controlnet  one full-size step with a ControlNet at 128x128 latents, fp16: diffusers, kolors, the bare step
#   ipadapter   one full-size step with IP-Adapter-Plus at 128x128 latents, fp16, and the image encoder's time
#   train       LoRA training at 1024x1024, batch 1, bf16, gradient checkpointing: seconds per step, peak memory
#   lora        LoRAs on the full UNet in $MODEL, fp16: switching and loading beside diffusers (a process per
#               side), then the step at 128x128 latents with an unfused and a fused rank-32 LoRA
# Needs a CUDA build of torch, diffusers and transformers (the test extra) and the Kolors reference folder
# ($KOLORS_REFERENCE, default ../shared/kolors-reference). Weights: 17.8 GB in $MODEL (default /dev/shm, or /tmp).
set -u
OUT=${OUT:-bench/out/gpu}
if [ -z "${MODEL:-}" ]; then  # memory-backed when /dev/shm has room: the loads then measure no disk
    MODEL=/tmp/kolors-full
    [ "$(df --output=avail -B1 /dev/shm 2>/dev/null | tail -1)" -gt 20000000000 ] 2>/dev/null && MODEL=/dev/shm/kolors-full
fi
STEPS=${STEPS:-tests weights generate memory unet encode quant}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log to $OUT/NAME.log, print its tail
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "=== $name: rc=$rc in $(($(date +%s) - start)) s (limit $limit s)"
    tail -n "${TAIL:-20}" "$OUT/$name.log"
}

has() { [[ " $STEPS " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >"$OUT/env.log" 2>&1
$PY - >>"$OUT/env.log" 2>&1 <<'EOF'
import diffusers, torch, transformers
print("torch", torch.__version__, "CUDA", torch.version.cuda, "diffusers", diffusers.__version__,
      "transformers", transformers.__version__, torch.cuda.get_device_name())
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.float16) for _ in range(2))
for _ in range(3):
    a @ b
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(10):
    a @ b
end.record()
torch.cuda.synchronize()
print(f"fp16 matmul 8192^3: {10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12:.0f} TFLOP/s")
EOF
cat "$OUT/env.log"

has tests && step tests 180 $PY -m pytest -q -p no:cacheprovider -m "" tests/test_cuda.py tests/test_noise.py
if has weights && [ ! -f "$MODEL/text_encoder/model.safetensors.index.fp16.json" ]; then  # written last
    step weights 150 $PY bench/fake_weights.py "$MODEL"
fi
has generate && step generate 200 $PY bench/bench_generate.py --model "$MODEL" --device cuda --dtype float16 \
    --size 1024 --steps 25 --warmup 1 --repeats 3
has memory && step memory 200 $PY bench/bench_memory.py --model "$MODEL" --device cuda --dtype float16 \
    --size 1024 --steps 2
has unet && step unet 240 $PY bench/bench_unet.py --device cuda --dtype float16 --latent 128 --compile \
    --warmup 3 --repeats 10
has encode && step encode 120 $PY bench/bench_text_encoder.py --device cuda --dtype float16 --warmup 2 --repeats 5
has quant && step quant 240 bash -c 'for q in int8 int4; do "$0" bench/bench_text_encoder.py --device cuda \
    --dtype float16 --quant $q --warmup 2 --repeats 5 || exit; done' "$PY"
has controlnet && step controlnet 300 $PY bench/bench_controlnet.py --device cuda --dtype float16 --latent 128 \
    --warmup 3 --repeats 10
has ipadapter && step ipadapter 300 $PY bench/bench_ip_adapter.py --device cuda --dtype float16 --latent 128 \
    --warmup 3 --repeats 10
has lora && step lora 400 bash -c '"$0" bench/bench_lora.py --model "$1" --part switch --device cuda \
    --dtype float16 --repeats 3 && "$0" bench/bench_lora.py --model "$1" --part step --device cuda \
    --dtype float16 --latent 128 --repeats 5' "$PY" "$MODEL"
has train && step train 400 $PY bench/bench_train_lora.py --device cuda --dtype bfloat16 --resolution 1024 --steps 5
exit 0
