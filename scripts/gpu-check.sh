#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU and no Rust toolchain.
#
#   scripts/gpu-check.sh build   # here: release binaries with the cuda backend, into .gpu/
#   scripts/gpu-check.sh run     # there (with .gpu/ carried): the checks; log in $OUT or /tmp
#
# What it checks, each against the CPU (ndarray) on the same machine:
# 1. examples/backend_swap: one random model's logits and forward time on ndarray and cuda,
#    for the training form and for the packed file (2-bit weights made resident on the device
#    once at load by TernaryBackend::upload_ternary);
# 2. the command line on cuda: a short demo training run, its packed export, and generate /
#    eval on both the model directory and the packed file, on cuda and on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-run}" = build ]; then
    set -e
    cargo build --release -p bit-ttt-train -p bit-ttt \
        --features bit-ttt-train/cuda,bit-ttt/cuda --bin bit-ttt-train --example backend_swap
    mkdir -p .gpu
    release="${CARGO_TARGET_DIR:-target}/release"
    cp "$release/bit-ttt-train" "$release/examples/backend_swap" .gpu/
    strip .gpu/bit-ttt-train .gpu/backend_swap
    # Compressed, the two fit what a device call carries (64 MiB).
    xz -f -T2 -6 .gpu/bit-ttt-train .gpu/backend_swap
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
chmod +x "$work"/bit-ttt-train "$work"/backend_swap
bin=$work/bit-ttt-train
step() { echo; echo "=== $1 ($(date +%T))"; }
{
    step "machine"
    nvidia-smi -L
    nproc
    step "backend_swap: ternary TTT-Linear, 128 tokens"
    "$work"/backend_swap ttt_linear 128
    step "backend_swap: ternary attention, 512 tokens"
    "$work"/backend_swap attention 512
    step "demo on cuda (200 steps)"
    time $bin demo --device cuda --steps 200 --sample-tokens 40 --out "$work/demo"
    step "export"
    $bin export --model "$work/demo"
    packed="$work/demo/model.packed.safetensors"
    # The last 60 kB of the book: a quick, fixed evaluation text.
    tail -c 60000 data/moby_dick.txt > "$work/tail.txt"
    for device in cuda ndarray; do
        for model in "$work/demo" "$packed"; do
            step "generate --device $device --model ${model#"$work"/}"
            $bin generate --device $device --model "$model" --prompt "Call me Ishmael" \
                --max-tokens 40 --temperature 0 \
                || echo "(generate failed: exit $?)"
            step "eval --device $device --model ${model#"$work"/}"
            $bin eval --device $device --model "$model" --data "$work/tail.txt" --seq-len 64 \
                || echo "(eval failed: exit $?)"
        done
    done
    step "done"
} 2>&1 | tee "$log"
rm -rf "$work"
