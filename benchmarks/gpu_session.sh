#!/usr/bin/env bash
# The one prepared script a GPU session runs: step times, epoch times and the paper recipe end to end, each
# stage under an explicit time limit; everything lands in $OUT; a short table is printed last.
#
#   bash benchmarks/gpu_session.sh [DATA_DIR]    # DATA_DIR, relative to the repo root: .data/cifar10-jpeg
#
# From a session with a device, the data copied into the git-ignored folder .data/ and carried:
#   mkdir -p .data && cp -r ../shared/data/cifar10-jpeg .data/
#   run(command="bash benchmarks/gpu_session.sh", carry=[".data/cifar10-jpeg"], timeout_s=600)
#
# Installs nothing (python3 there has jax, flax, optax, orbax, chex, torch); palm_jax comes from this checkout
# via PYTHONPATH. Stages, their limits in seconds, and what each leaves in $OUT (default stages: <= 9 min):
#   env     nvidia-smi, versions, commit                                       (session.log)
#   step    benchmarks/step_time.py, all rows: VGG-19, batch 64 and 256, fp32 and bf16, prox / plain / torch
#           STEP_LIMIT=200                                                     step_time.json
#   epoch   benchmarks/epoch_time.py on DATA_DIR (generated images without it), 3 epochs, batch 64, fp32
#           EPOCH_LIMIT=90                                                     epoch_time.json
#   recipe  make cifar10-vgg19: the paper recipe, 160 epochs, train -> prune -> report; needs DATA_DIR.
#           RECIPE_LIMIT=240; stopped there, its metrics still give the epochs done and their seconds
#                                                                              recipe.json (report, metrics, wall)
#   fast    make cifar10-vgg19-fast, if that recipe exists; FAST_LIMIT=120     fast.json
# STAGES picks them (default "env step epoch recipe"; a second session: STAGES="fast"). STEP_ARGS, EPOCH_ARGS,
# RECIPE_TARGET and MAKE_VARS shrink the stages for a dry run on a CPU (command in benchmarks/RESULTS.md).
# Also in $OUT: session.log (all output), stages.tsv (stage, exit status, seconds, limit), summary.md (the table).
set -u
cd "$(dirname "$0")/.."
DATA_DIR=${1:-.data/cifar10-jpeg}
OUT=${OUT:-/tmp/palm_jax_gpu_session}
STAGES=${STAGES:-env step epoch recipe}
STEP_LIMIT=${STEP_LIMIT:-200}
EPOCH_LIMIT=${EPOCH_LIMIT:-90}
RECIPE_LIMIT=${RECIPE_LIMIT:-240}
FAST_LIMIT=${FAST_LIMIT:-120}
PY=${PY:-python3}
STEP_ARGS=${STEP_ARGS:-} EPOCH_ARGS=${EPOCH_ARGS:-} MAKE_VARS=${MAKE_VARS:-}  # extra arguments (dry runs)
RECIPE_TARGET=${RECIPE_TARGET:-cifar10-vgg19}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/palm_jax_xla_cache}  # a rerun skips compiles

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
have_data() { [[ -f "$DATA_DIR/train.npz" ]]; }

stage() {  # stage NAME LIMIT COMMAND...: run under a time limit; log exit status and seconds
  local name=$1 limit=$2 start=$SECONDS status
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout -k 15 "$limit" "$@"
  status=$?
  [[ $status == 124 ]] && echo "=== $name: stopped at its ${limit}s limit"
  echo "=== $name: exit $status after $((SECONDS - start))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$limit" >> "$OUT/stages.tsv"
}

recipe() {  # recipe TARGET LIMIT NAME: one make target in a fresh run folder outside $OUT, collected to NAME.json
  local target=$1 limit=$2 name=$3 runs
  if ! have_data; then echo "=== $name: skipped (no $DATA_DIR/train.npz)"; return; fi
  local has_recipe="import sys; from palm_jax.recipes import RECIPES; sys.exit('$target' not in RECIPES)"
  if ! $PY -c "$has_recipe"; then
    echo "=== $name: skipped (no recipe $target in palm_jax/recipes.py)"; return
  fi
  runs=$(mktemp -d /tmp/palm_jax_runs.XXXX)  # checkpoints are large and deep: never under $OUT
  if command -v make >/dev/null; then
    # OUT= on the command line: the Makefile's OUT (the run folder) must not inherit this script's $OUT
    # shellcheck disable=SC2086
    stage "$name" "$limit" make "$target" PYTHON="$PY" DATA_DIR="$DATA_DIR" OUT="$runs/$target" $MAKE_VARS
  else  # what the make target runs
    stage "$name" "$limit" $PY -m palm_jax.cli train --recipe "$target" --out "$runs/$target" \
      --data-dir "$DATA_DIR"
  fi
  $PY benchmarks/session_summary.py --collect "$runs/$target" "$OUT/$name.json" --stage "$name" \
    --stages "$OUT/stages.tsv"
  rm -rf "$runs"
}

main() {
  echo "=== palm_jax GPU session $(date -u '+%Y-%m-%d %H:%M UTC'); stages: $STAGES; data: $DATA_DIR"
  if has_stage env; then
    nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c 'import sys, jax, flax, optax; print("python", sys.version.split()[0], "jax", jax.__version__,
      "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
    $PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
    git log -1 --format='commit %H %cd' 2>/dev/null; git status --short 2>/dev/null | head -20
  fi
  if has_stage step; then
    # shellcheck disable=SC2086
    stage step "$STEP_LIMIT" $PY benchmarks/step_time.py $STEP_ARGS --out "$OUT/step_time.json"
  fi
  if has_stage epoch; then
    local data_args=()
    have_data && data_args=(--data-dir "$DATA_DIR")
    # shellcheck disable=SC2086
    stage epoch "$EPOCH_LIMIT" $PY benchmarks/epoch_time.py "${data_args[@]}" $EPOCH_ARGS \
      --out "$OUT/epoch_time.json"
  fi
  has_stage recipe && recipe "$RECIPE_TARGET" "$RECIPE_LIMIT" recipe
  has_stage fast && recipe cifar10-vgg19-fast "$FAST_LIMIT" fast
  $PY benchmarks/session_summary.py "$OUT" > "$OUT/summary.md"
  cat "$OUT/summary.md"
}

main 2>&1 | tee -a "$OUT/session.log"
