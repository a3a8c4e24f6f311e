#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU and no Rust toolchain.
#
#   scripts/gpu-check.sh build   # here: release binaries with the cuda backend, into .gpu/
#   scripts/gpu-check.sh run     # there (with .gpu/ carried): the checks; log in $OUT or /tmp
#   GPU_CHECK_QUICK=1 scripts/gpu-check.sh run   # the same steps at toy sizes on wgpu: a
#                                                # rehearsal on a machine without a GPU
#
# What it checks (each step under its own time limit, so one hang cannot take the whole run):
# 1. examples/gpu_bench on cuda: the CubeCL kernels against the CPU reference (codes, scales and
#    outputs bit for bit, odd shapes); GEMV GB/s at 2560x6912, 4096x11008 and 8192x8192 next to
#    a copy kernel's GB/s in the same run; decode tokens/s of the 125m and 1b presets with packed
#    weights next to the same model's f32 Burn path, and the kernel launches per token;
# 2. the model split between GPU and CPU (bench --n-gpu-layers): the 1b preset over N, and a
#    random 70B-shaped model (about 20 GB packed, drawn in memory) with --gpu-memory 8GiB and
#    auto, tokens/s measured next to predicted;
# 3. training tokens/s of the 125m preset on cuda, ternary (stopped halfway and resumed) and
#    f32, from the steady-state rows of metrics.csv;
# 4. examples/backend_swap: one random model's logits and forward time on ndarray and cuda,
#    for the training form and for the packed file;
# 5. the command line on cuda: a short demo run, its packed export, generate and eval of the
#    packed file on cuda and on the CPU.
# Every result is a JSON line (grep '^{' the log) or a table row.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-run}" = build ]; then
    set -e
    cargo build --release -p bit-ttt-train -p bit-ttt \
        --features bit-ttt-train/cuda,bit-ttt-train/wgpu,bit-ttt/cuda --bin bit-ttt-train --example backend_swap --example gpu_bench
    rm -rf .gpu
    mkdir -p .gpu
    release="${CARGO_TARGET_DIR:-target}/release"
    cp "$release/bit-ttt-train" "$release/examples/backend_swap" "$release/examples/gpu_bench" .gpu/
    strip .gpu/bit-ttt-train .gpu/backend_swap .gpu/gpu_bench
    # Compressed, the three fit what a device call carries (64 MiB).
    xz -f -T2 -6 .gpu/bit-ttt-train .gpu/backend_swap .gpu/gpu_bench
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    ls -l .gpu
    exit 0
fi

# libcuda and nvrtc are loaded at run time; this names the CUDA version cudarc binds to.
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
# nvrtc from the image's Python packages, where the system has none on its search path.
for d in /usr/local/cuda/lib64 /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu*/lib \
         /opt/torch/.venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
log="${OUT:-/tmp}/gpu-check.log"
work=$(mktemp -d)
for f in .gpu/*.xz; do
    out="$work/$(basename "$f" .xz)"
    xz -dc "$f" > "$out" 2>/dev/null \
        || python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$out"
done
chmod +x "$work"/bit-ttt-train "$work"/backend_swap "$work"/gpu_bench
bin=$work/bit-ttt-train
step() { echo; echo "=== $1 ($(date +%T))"; }
# Steady-state training tokens/s from a run's metrics.csv (step,lr,train_loss,val_loss,
# tokens_per_s,elapsed_s): tokens between the middle row and the last over the time between them,
# so kernel compilation and autotuning in the first steps do not count.
train_rate() {
    awk -F, -v tps="$2" -v what="$3" -v dev="$device" 'NR > 1 { s[NR] = $1; e[NR] = $6; n = NR }
        END { m = int(n * 3 / 4); t = (s[n] - s[m]) * tps / (e[n] - e[m]);
              printf "{\"section\":\"train\",\"backend\":\"%s\",\"run\":\"%s\",\"steps\":%d,\"steady_steps\":%d,\"tokens_per_s\":%.1f}\n", dev, what, s[n], s[n] - s[m], t }' "$1/metrics.csv"
}
if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
    # lavapipe trains the demo's model at ~100 tokens/s: 2 steps and its evaluation take minutes.
    device=wgpu; bench_args=(wgpu --quick); preset=tiny; seq=32; batch=4; steps=8; demo_steps=2
    demo_limit=400; eval_bytes=4000
    split_small=(--preset tiny --n-gpu-layers 0,1,2 --decode-tokens 8 --bandwidth-mib 64)
    split_large=(--preset tiny --n-gpu-layers auto --gpu-memory 300KiB --decode-tokens 8 --bandwidth-mib 64)
else
    device=cuda; bench_args=(cuda); preset=125m; seq=256; batch=8; steps=32; demo_steps=100
    demo_limit=90; eval_bytes=60000
    split_small=(--preset 1b --n-gpu-layers 0,6,12,18,24 --decode-tokens 32 --threads 16)
    split_large=(--preset 70b --n-gpu-layers auto --gpu-memory 8GiB --decode-tokens 16 --threads 16)
fi
tokens_per_step=$((seq * batch))
{
    step "machine"
    nvidia-smi -L
    nproc
    step "gpu_bench ${bench_args[*]}: kernels, GEMV bandwidth, decode"
    timeout 240 "$work"/gpu_bench "${bench_args[@]}" || echo "(gpu_bench failed: exit $?)"

    step "split between $device and the CPU: ${split_small[*]}"
    timeout 150 $bin bench --device $device "${split_small[@]}" || echo "(split bench failed: exit $?)"
    step "split between $device and the CPU: ${split_large[*]}"
    timeout 240 $bin bench --device $device "${split_large[@]}" || echo "(split bench failed: exit $?)"
    if [ "$device" = cuda ]; then
        step "split by the free memory the driver reports: --preset 1b --n-gpu-layers auto"
        timeout 120 $bin bench --device cuda --preset 1b --n-gpu-layers auto --decode-tokens 16 \
            --threads 16 || echo "(split bench failed: exit $?)"
    fi

    step "train $preset on $device: ternary, stopped halfway and resumed; then f32"
    # The book is the corpus.
    common=(--device $device --data data/moby_dick.txt --vocab-size 2048 --preset $preset
            --seq-len $seq --batch-size $batch --steps $steps --eval-every 0 --eval-batches 2
            --checkpoint-every 0 --progress lines)
    timeout 150 $bin train "${common[@]}" --out "$work/t-ternary" --stop-at $((steps / 2)) \
        && timeout 120 $bin train --device $device --out "$work/t-ternary" --resume --progress lines \
        && train_rate "$work/t-ternary" $tokens_per_step ternary \
        || echo "(ternary training failed)"
    timeout 150 $bin train "${common[@]}" --out "$work/t-f32" --ternary false \
        --tokenizer "$work/t-ternary/tokenizer.json" \
        && train_rate "$work/t-f32" $tokens_per_step f32 \
        || echo "(f32 training failed)"

    step "backend_swap: ternary TTT-Linear, 128 tokens"
    timeout 90 "$work"/backend_swap ttt_linear 128
    step "demo on $device ($demo_steps steps), export"
    timeout $demo_limit $bin demo --device $device --steps $demo_steps --sample-tokens 40 --out "$work/demo"
    timeout 60 $bin export --model "$work/demo"
    packed="$work/demo/model.packed.safetensors"
    # The end of the book (60 kB on a GPU): a quick, fixed evaluation text.
    tail -c $eval_bytes data/moby_dick.txt > "$work/tail.txt"
    for d in $device ndarray; do
        step "generate and eval --device $d --model the packed file"
        timeout 60 $bin generate --device $d --model "$packed" --prompt "Call me Ishmael" \
            --max-tokens 40 --temperature 0 \
            || echo "(generate failed: exit $?)"
        timeout 60 $bin eval --device $d --model "$packed" --data "$work/tail.txt" --seq-len 64 \
            || echo "(eval failed: exit $?)"
    done
    step "done"
} 2>&1 | tee "$log"
rm -rf "$work"
