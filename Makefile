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

# ---- experiments: one target per recipe of palm_jax/recipes.py (`palm-jax recipes` lists them) --------------
# make demo                                  whole pipeline on a CPU in minutes (generated images, or DATA_DIR)
# make cifar10-vgg19 [DATA_DIR=dir] [EPOCHS=n] [BATCH=n] [TRAIN_IMAGES=n] [OUT=dir] [ARGS='--dtype bfloat16']
# Data: DATA_DIR holds train.npz [test.npz] (e.g. ../shared/data/cifar10-jpeg); without it, downloaded once
# into ~/.cache/palm_jax/datasets (PALM_JAX_CACHE; PALM_JAX_DOWNLOAD=0 never downloads; see README "Data").
# A target reruns as a resume: an interrupted run continues from its last checkpoint, a finished one only
# rewrites its report. OUT defaults to runs/<target>[-<DATA_DIR name>][-e<EPOCHS>][-n<TRAIN_IMAGES>][-b<BATCH>]
# (named by the CLI); delete it to start over. Without an accelerator a full-size target says so before
# training, with its estimated time, and runs on.
DATA_DIR ?=
EPOCHS ?=
BATCH ?=
TRAIN_IMAGES ?=
OUT ?=
ARGS ?=
# The recipe names, read from palm_jax/recipes.py by any Python (it imports no JAX).
RECIPES := $(shell $(or $(PYTHON),$(BOOTSTRAP_PYTHON)) -m palm_jax.recipes 2>/dev/null)
EXPERIMENTS := $(filter-out demo,$(RECIPES))
train_args = $(if $(OUT),--out $(OUT)) --resume $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
	$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(BATCH),--batch-size $(BATCH)) \
	$(if $(TRAIN_IMAGES),--train-images $(TRAIN_IMAGES)) $(ARGS)

.PHONY: demo recipes $(EXPERIMENTS)
$(EXPERIMENTS): $(SETUP)
	$(PY) -m palm_jax.cli train --recipe $@ $(train_args)

demo: $(SETUP)
	$(PY) -m palm_jax.cli train --recipe demo $(if $(DATA_DIR),--dataset cifar10) $(train_args)

recipes: $(SETUP)
	$(PY) -m palm_jax.cli recipes
