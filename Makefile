# Two entry points do all the set-up on a fresh clone:
#   make demo   -- the main job on an embedded default model (no download)
#   make test   -- lint + the test suite (the library's tests/ and the scenes package's scenes/tests/)
#   make test-latest -- the correctness core on the newest transformers release (a release routine, not set-up)
# `make install` installs the library and, beside it, the scenes package (scenes/: the benchmark, its trainer
# and the trained model that `make demo` uses), both editable.
# torch is installed first and pinned, so pip never swaps in a different (e.g. CUDA) build; everything
# else comes from requirements.lock, so a fresh machine gets exactly the stack CI tested.
# `make lock` refreshes the lock (pip-tools, newest versions inside pyproject.toml's ranges).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
PIP    := pip==26.3
LOCK   := requirements.lock
PIP_TOOLS := pip-tools==7.6.2

$(BIN)/.st3-installed: pyproject.toml scenes/pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(PIP)"
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip install -q --no-deps -e scenes/
	touch $@

.PHONY: install demo test test-all test-latest lint lock
install: $(BIN)/.st3-installed

demo: install
	$(BIN)/st3 demo

lint: install
	$(BIN)/ruff check .

# `make test`: everything but the `slow` family x method cross product (a few minutes on 2 cores);
# `make test-all` adds it (CI runs both parts).
test: lint
	$(BIN)/python -m pytest -q -m "not slow"

test-all: lint
	$(BIN)/python -m pytest -q

# The correctness core on the newest transformers release, even outside pyproject.toml's range (.ci/latest;
# docs/transformers.md: the routine for a new release).
test-latest:
	.ci/latest

# torch stays out of the lock (it is installed first, CPU or CUDA build by TORCH); its own dependencies
# are pinned in it, resolved against $(TORCH).
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q "$(PIP)" "$(PIP_TOOLS)"
	echo "$(TORCH)" > .venv-lock/torch.txt
	.venv-lock/bin/pip-compile --quiet --upgrade --strip-extras --extra cli --extra dev --no-emit-index-url \
		--no-emit-find-links --unsafe-package torch -c .venv-lock/torch.txt -o $(LOCK) pyproject.toml
