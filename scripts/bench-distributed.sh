#!/usr/bin/env bash
# Data-parallel training on this machine: one process with the whole batch against two
# processes with half of it each (one compute thread per process, `train --launch-local`), for
# the demo's model and for 125m, and the all-reduce time per step. Prints a markdown table.
#
#   scripts/bench-distributed.sh [STEPS_DEMO] [STEPS_125M]
#
# Uses target/release/bit-ttt-train (cargo build --release -p bit-ttt-train), or $BIT_TTT_TRAIN.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIT_TTT_TRAIN:-target/release/bit-ttt-train}
steps_demo=${1:-40}
steps_125m=${2:-4}
[ -x "$bin" ] || { echo "no $bin: cargo build --release -p bit-ttt-train" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
data=data/moby_dick.txt
"$bin" tokenizer --data "$data" --vocab-size 2048 --out "$work/tok.json" >/dev/null

# One run: prints "tokens/s all-reduce-ms" (all-reduce "-" for one process).
measure() {
    local name=$1 processes=$2 batch=$3 steps=$4
    shift 4
    local out
    # --stop-at: no final evaluation of the whole validation split, a checkpoint instead.
    out=$("$bin" train --out "$work/$name" --data "$data" --tokenizer "$work/tok.json" \
        --launch-local "$processes" --batch-size "$batch" --steps $((steps + 1)) \
        --stop-at "$steps" --eval-every 0 --checkpoint-every 0 --warmup-steps 1 \
        --progress quiet "$@" 2>/dev/null)
    local tps reduce
    tps=$(tail -1 "$work/$name/metrics.csv" | cut -d, -f5)
    reduce=$(grep -o 'all-reduce [0-9.]* ms/step' <<<"$out" | cut -d' ' -f2 || true)
    echo "$tps ${reduce:--}"
}

demo_model=(--preset tiny --d-model 128 --n-layers 4 --n-heads 4 --d-ffn 384 --seq-len 64)
big_model=(--preset 125m --seq-len 128)

echo "| model | global batch | processes | tokens/s | all-reduce ms/step | speed-up |"
echo "|---|---|---|---|---|---|"
for spec in "demo 16 $steps_demo" "125m 4 $steps_125m"; do
    read -r model batch steps <<<"$spec"
    if [ "$model" = demo ]; then args=("${demo_model[@]}"); else args=("${big_model[@]}"); fi
    read -r one _ <<<"$(measure "$model-1" 1 "$batch" "$steps" "${args[@]}")"
    read -r two reduce <<<"$(measure "$model-2" 2 $((batch / 2)) "$steps" "${args[@]}")"
    echo "| $model | $batch × ${args[-1]} | 1 | $one | - | 1.00 |"
    echo "| $model | $batch × ${args[-1]} | 2 | $two | $reduce | $(awk "BEGIN {printf \"%.2f\", $two / $one}") |"
done
