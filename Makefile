# Two commands do everything on a fresh machine: `make demo` (the offline demo) and `make test`.
# Both create .venv and install the project from its own files first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch used by the offline demo, the tests and CI. On a GPU machine, install your
# CUDA build of torch into the venv first (or set TORCH_SPEC): an already-installed torch is kept.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= outputs/demo
STUDY_DIR ?= outputs/study
PYTEST_ARGS ?= -n 2

.PHONY: install test test-slow demo study quality bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/echogen-rl demo --output-dir $(DEMO_DIR) --overwrite

study: install
	$(VENV)/bin/echogen-rl study --output-dir $(STUDY_DIR)

quality: install
	$(VENV)/bin/ruff check $(wildcard echogen_rl rewards recipes tests benchmarks)
	$(VENV)/bin/ruff format --check $(wildcard echogen_rl rewards recipes tests benchmarks)

bench: install
	mkdir -p outputs/bench
	$(PY) benchmarks/rollout.py --threads 1 --out outputs/bench/rollout.json
	$(PY) benchmarks/grounding.py --threads 1 --out outputs/bench/grounding.json

clean:
	rm -rf $(VENV) outputs .pytest_cache
