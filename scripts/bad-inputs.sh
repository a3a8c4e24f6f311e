#!/usr/bin/env bash
# Runs the command line on bad inputs (files, flags, checkpoints, models) and prints a Markdown
# table: the input, the exit code and the first line of what it printed on stderr. Every row
# must exit 1 (or 2, clap's usage errors) with a message, never a panic (101) or a signal; the script
# exits 1 if one does not.
#
#   scripts/bad-inputs.sh [path/to/bit-ttt-train]   (default: target/release/bit-ttt-train)
set -uo pipefail
bin=${1:-target/release/bit-ttt-train}
bin=$(realpath "$bin")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# Fixtures: a small corpus, files that are not, a trained tiny model and its packed file.
python3 - <<'EOF'
import random
random.seed(3)
words = "the whale sea ship captain white boat harpoon deck wind and of a to in was his".split()
open("corpus.txt", "w").write(" ".join(random.choice(words) for _ in range(3000)))
open("few.txt", "w").write("Call me Ishmael.")
open("empty.txt", "w").write("")
open("latin1.txt", "wb").write(b"na\xefve caf\xe9")
EOF
tiny=(--preset tiny --seq-len 16 --batch-size 4 --vocab-size 300 --eval-every 2 --eval-batches 2 --progress quiet)
"$bin" train --out run --data corpus.txt "${tiny[@]}" --steps 4 --checkpoint-every 2 >/dev/null 2>&1 \
    || { echo "could not train the fixture model" >&2; exit 1; }
"$bin" export --model run >/dev/null 2>&1
cp -r run nan-run && python3 - <<'EOF'
import json, struct
p = "nan-run/model.safetensors"
b = bytearray(open(p, "rb").read())
n = struct.unpack("<Q", b[:8])[0]
start = json.loads(b[8:8 + n])["norm.gamma"]["data_offsets"][0] + 8 + n
b[start:start + 4] = struct.pack("<f", float("nan"))
open(p, "wb").write(b)
EOF
cp -r run big-run && sed -i 's/"d_model": 64/"d_model": 100000000/' big-run/config.json
cp -r run eps-run && sed -i 's/"norm_eps": [0-9.e-]*/"norm_eps": 0.0/' eps-run/config.json
head -c 1000 run/model.packed.safetensors > short.packed.safetensors
cp -r run broken-ckpt && : > broken-ckpt/checkpoints/step-000004/optimizer.mpk
cp -r run all-broken && for d in all-broken/checkpoints/step-*; do : > "$d/model.mpk"; done
echo '{ not json' > tok-bad.json

bad=0
echo "| input | exit | message (first line of stderr) |"
echo "|---|---|---|"
row() {
    local label=$1
    shift
    local err code
    err=$("$bin" "$@" 2>&1 >/dev/null)
    code=$?
    local first
    # The error line (progress lines may come before it), else the first line.
    first=$(grep -m 1 '^error:' <<<"$err" | cut -c1-220)
    [ -z "$first" ] && first=$(head -n 1 <<<"$err" | cut -c1-220)
    if grep -q panicked <<<"$err" || [ "$code" -ge 101 ] || [ "$code" -eq 0 ]; then
        first="UNEXPECTED: $first"
        bad=1
    fi
    printf '| %s | %s | %s |\n' "$label" "$code" "${first//|/\\|}"
}
row "train --data missing.txt" train --out x1 --data missing.txt "${tiny[@]}"
row "train --data empty.txt" train --out x1 --data empty.txt "${tiny[@]}"
row "train --data latin1.txt" train --out x1 --data latin1.txt "${tiny[@]}"
row "train --vocab-size 100" train --out x1 --data corpus.txt "${tiny[@]}" --vocab-size 100
row "train --seq-len 100000" train --out x1 --data corpus.txt "${tiny[@]}" --seq-len 100000
row "train --lr 0" train --out x1 --data corpus.txt "${tiny[@]}" --lr 0
row "train --d-model 100000000" train --out x1 --data corpus.txt "${tiny[@]}" --d-model 100000000
row "train --d-model 65536 --n-heads 4 (beyond memory)" train --out x1 --data corpus.txt "${tiny[@]}" --d-model 65536 --n-heads 4
row "train --mixer lstm" train --out x1 --data corpus.txt "${tiny[@]}" --mixer lstm
row "train --preset huge" train --out x1 --data corpus.txt --preset huge
row "train --tokenizer missing.json" train --out x1 --data corpus.txt "${tiny[@]}" --tokenizer missing.json
row "train --tokenizer (not JSON)" train --out x1 --data corpus.txt "${tiny[@]}" --tokenizer tok-bad.json
row "train on a directory holding a run (no --resume)" train --out run --data corpus.txt "${tiny[@]}"
row "train --resume (no run)" train --out nothing --resume
row "train --resume --lr 0.5 (changed setting)" train --out run --resume --lr 0.5 --steps 6
row "train --resume --preset 125m (changed model)" train --out run --resume --preset 125m --extend
row "train --resume, every checkpoint broken" train --out all-broken --resume --steps 6 --extend
row "train --extend without --resume" train --out x1 --data corpus.txt "${tiny[@]}" --extend
row "demo --data few.txt (too short)" demo --out x2 --data few.txt --vocab-size 300
row "demo --prompt ''" demo --out x2 --data corpus.txt --vocab-size 300 --prompt ""
row "demo --steps 0" demo --out x2 --data corpus.txt --vocab-size 300 --steps 0
row "demo --resume (no run)" demo --out nothing --resume
row "generate --model missing" generate --model missing --prompt x
row "generate --top-p 1.5" generate --model run --prompt x --top-p 1.5
row "generate --top-p NaN" generate --model run --prompt x --top-p NaN
row "generate --temperature NaN" generate --model run --prompt x --temperature NaN
row "generate --seed abc" generate --model run --prompt x --seed abc
row "generate --prompt ''" generate --model run --prompt ""
row "generate, model with a NaN weight" generate --model nan-run --prompt x
row "generate, config.json with d_model 1e8" generate --model big-run --prompt x
row "generate, config.json with norm_eps 0" generate --model eps-run --prompt x
row "generate, packed file cut to 1000 bytes" generate --model short.packed.safetensors --prompt x --tokenizer run/tokenizer.json
row "generate --n-gpu-layers 2 on ndarray" generate --model run --prompt x --n-gpu-layers 2
row "generate --n-gpu-layers lots" generate --model run --prompt x --device wgpu --n-gpu-layers lots
row "generate --device wgpu (not compiled in / no adapter)" generate --model run --prompt x --device wgpu
row "eval --model missing" eval --model missing --data corpus.txt
row "eval --data empty.txt" eval --model run --data empty.txt
row "export over the model's own weights" export --model run --out run/model.safetensors
row "bench --n-gpu-layers 1 (no GPU device)" bench --n-gpu-layers 1
row "bench --gpu-memory 1GiB alone" bench --gpu-memory 1GiB
row "generate --device tpu" generate --model run --prompt x --device tpu
# A broken latest checkpoint is not an error: the resume falls back (a warning on stderr).
err=$("$bin" train --out broken-ckpt --resume --steps 6 --extend 2>&1 >/dev/null); code=$?
printf '| %s | %s | %s |\n' "train --resume, latest checkpoint broken (falls back)" "$code" "$(grep -m 1 '^warning:' <<<"$err" | cut -c1-220)"
if grep -q panicked <<<"$err" || [ "$code" -ne 0 ]; then bad=1; fi
exit $bad
