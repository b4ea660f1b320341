# Every target that runs Python depends on the venv; the venv (re)builds when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= data
DEMO_MODEL := $(DATA_DIR)/models/demo

.PHONY: run test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(DEMO_MODEL)/config.json: | $(BIN)/.installed
	$(BIN)/sllmd demo-model $(DEMO_MODEL)

run: $(BIN)/.installed $(DEMO_MODEL)/config.json
	exec $(BIN)/sllmd --config config/sllmd.toml --data-dir $(DATA_DIR) --deploy demo=$(DEMO_MODEL)

lint: $(BIN)/.installed
	$(BIN)/ruff check sllmd tests scripts

test: $(BIN)/.installed lint
	$(BIN)/pytest -q -m "not vllm"

bench: $(BIN)/.installed
	$(BIN)/python scripts/bench_serving.py --json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
