# Two entry points do all the set-up on a fresh clone:
#   make demo   -- the main job on an embedded default model (no download)
#   make test   -- lint + the test suite
# torch is installed first and pinned, so pip never swaps in a different (e.g. CUDA) build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

$(BIN)/.st3-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

.PHONY: install demo test lint
install: $(BIN)/.st3-installed

demo: install
	$(BIN)/st3 demo

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q
