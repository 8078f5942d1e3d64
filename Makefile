# palm_jax: two commands on a fresh machine.
#   make test            # creates .venv if needed, installs, runs the suite
#   make cifar10-vgg19   # the paper's main experiment (see README)
# PYTHON=/path/to/python uses an environment that already has the dependencies and installs nothing.

VENV ?= .venv
ifeq ($(strip $(PYTHON)),)
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed
else
PY := $(PYTHON)
SETUP :=
endif

# First interpreter >= 3.12 (what the GPU machines run), else any >= 3.10.
BOOTSTRAP_PYTHON ?= $(shell for p in python3.13 python3.12 $$(ls -d $$HOME/.pyenv/versions/3.1[2-9]*/bin/python3 2>/dev/null) python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null && { echo $$p; break; }; done)
# On a machine with an NVIDIA GPU, JAX's CUDA build (plain `pip install jax` is CPU-only).
JAX_CUDA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 'jax[cuda13]==0.11.2')

$(VENV)/.installed: requirements.txt requirements-dev.txt setup.cfg
	@test -n "$(BOOTSTRAP_PYTHON)" || { echo "error: no Python >= 3.10 found; install one or pass PYTHON=/path/to/python"; exit 1; }
	test -x $(VENV)/bin/python || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt $(JAX_CUDA)
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

.PHONY: install test lint
install: $(SETUP)

test: $(SETUP)
	$(PY) -m pytest -q tests

lint: $(SETUP)
	$(PY) -m ruff check .
