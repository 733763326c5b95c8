#!/usr/bin/env bash
# One prepared GPU check: everything this package claims on a GPU, measured in one short call.
#
#   bash benchmarks/gpu_suite.sh --prepare   # here, with network: the wheels the GPU machine lacks
#   bash benchmarks/gpu_suite.sh             # there (no network): install, GPU tests, benchmarks, bf16 run
#   bash benchmarks/gpu_suite.sh --dry-run   # anywhere, CPU: the same steps at tiny sizes (CI runs it)
#   bash benchmarks/gpu_suite.sh --report OUT   # here: OUT's JSON -> benchmarks/results/ + RESULTS.md
#
# Steps: install (carried wheels + this working tree, no index), imports, gpu_tests (the `gpu`-marked
# tests: compiled Triton kernel vs the PyTorch oracle, forward, backward, bf16), pooling_speed,
# encode_throughput and train_step (ViT-B/16 + BERT-base, random init), train_bf16 (the trainer under
# `accelerate launch --mixed_precision bf16` on synthetic data). A failing step does not stop the others:
# each is recorded (ok / failed / skipped, with the reason) in $OUT/gpu_suite.json and the closing table,
# and the script exits 1 if any failed. Every JSON goes to $OUT (default outputs/gpu_suite), with the log.
#
# Environment: OUT (output folder, must not hold a finished suite), PYTHON (default python3),
# GPU_SUITE_WHEELS (default .gpu_suite_wheels), GPU_SUITE_BUDGET_S (default 480, dry run 1800: the whole
# run's time; each step's limit is cut to what is left), GPU_SUITE_ONLY (comma-separated steps to run, e.g.
# install,imports,pooling_speed: the others are skipped), GPU_SUITE_PYTHON_VERSION (--prepare: 3.12,
# the GPU machine's).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${GPU_SUITE_WHEELS:-$REPO/.gpu_suite_wheels}"
SUITE_PY="$REPO/benchmarks/gpu_suite.py"
MODE=gpu
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry-run ;;
  --prepare) MODE=prepare ;;
  --report) shift; exec "$PYTHON" "$SUITE_PY" report "$@" ;;
  -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu_suite.sh: unknown argument '$1' (use --dry-run, --prepare, --report OUT, or nothing)" >&2; exit 2 ;;
esac
if [ "$#" -gt 1 ]; then
  echo "gpu_suite.sh: one argument at most, got: $*" >&2
  exit 2
fi

# --- --prepare: download the wheels the GPU machine lacks (it has torch, transformers, accelerate,
# triton, pyarrow, pandas, fsspec, xxhash ... but no datasets, evaluate or faiss). The versions are this
# environment's, the ones the tests pass with; the wheels match the GPU machine's Python.
if [ "$MODE" = prepare ]; then
  pins="$("$PYTHON" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version

names = ("datasets", "evaluate", "dill", "multiprocess", "faiss-cpu")
try:
    print(" ".join(f"{name}=={version(name)}" for name in names))
except PackageNotFoundError as error:
    raise SystemExit(f"gpu_suite.sh --prepare: {error.name} is not installed here; install the package's extras first")
EOF
)"
  rm -rf "$WHEELS"
  mkdir -p "$WHEELS"
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  # shellcheck disable=SC2086  # $pins is a list of requirement words
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version "${GPU_SUITE_PYTHON_VERSION:-3.12}" "${platforms[@]}" -d "$WHEELS" $pins
  size_kib="$(du -sk "$WHEELS" | cut -f1)"
  ls -1 "$WHEELS"
  echo "$WHEELS: $((size_kib / 1024)) MiB (the working tree that travels is limited to 64 MiB)"
  if [ "$size_kib" -gt $((50 * 1024)) ]; then
    echo "gpu_suite.sh --prepare: the wheels take over 50 MiB; drop one from the list above" >&2
    exit 1
  fi
  exit 0
fi

if [ "$MODE" = gpu ] && ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_suite.sh: no CUDA device is visible to $PYTHON; run 'bash benchmarks/gpu_suite.sh --dry-run' for the CPU check" >&2
  exit 2
fi
OUT="${OUT:-$REPO/outputs/gpu_suite}"
if [ -e "$OUT/gpu_suite.json" ]; then
  echo "gpu_suite.sh: $OUT already holds a finished suite (gpu_suite.json); set OUT to another folder or remove it" >&2
  exit 2
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT/gpu_suite.log") 2>&1

# The working tree first on the path (also in the processes accelerate and pytest start); offline.
export PYTHONPATH="$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export REPO PYTHON WHEELS SUITE_PY MODE OUT WORK
if [ "$MODE" = gpu ]; then
  BUDGET="${GPU_SUITE_BUDGET_S:-480}" CAP_SCALE=1
  DEVICE=cuda TOWERS=base
else
  # The CPU check's limits only catch a hang: shared CI cores can be many times slower than idle ones.
  BUDGET="${GPU_SUITE_BUDGET_S:-1800}" CAP_SCALE=5
  DEVICE=cpu TOWERS=tiny
fi
export DEVICE TOWERS
printf 'step\tstatus\tseconds\tdetail\n' >"$WORK/steps.tsv"
echo "gpu_suite: mode $MODE, device $DEVICE, towers $TOWERS, budget ${BUDGET}s, OUT $OUT"

record() {  # NAME STATUS SECONDS DETAIL
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >>"$WORK/steps.tsv"
}

skip_step() {  # NAME REASON
  echo
  echo "=== $1: skipped: $2"
  record "$1" skipped 0 "$2"
}

run_step() {  # NAME CAP_S FUNCTION: FUNCTION in a child bash, limited to CAP_S and to what the budget has left
  local name=$1 cap=$2 fn=$3 left limit start rc=0
  if [ -n "${GPU_SUITE_ONLY:-}" ] && [[ ",$GPU_SUITE_ONLY," != *",$name,"* ]]; then
    skip_step "$name" "not in GPU_SUITE_ONLY=$GPU_SUITE_ONLY"
    return
  fi
  cap=$((cap * CAP_SCALE))
  left=$((BUDGET - SECONDS - 15)) # 15 s kept for the summary
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 5 ]; then # a step the suite owed and did not run is a failure, not a skip
    echo
    echo "=== $name: not run: the suite's ${BUDGET} s budget is spent"
    record "$name" failed 0 "not run: the suite's ${BUDGET} s budget is spent"
    return
  fi
  echo
  echo "=== $name (limit ${limit} s)"
  start=$EPOCHREALTIME
  timeout --kill-after=10 "$limit" bash -euo pipefail -c "$fn" || rc=$?
  local seconds
  seconds="$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
  if [ "$rc" -eq 0 ]; then
    record "$name" ok "$seconds" ""
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" failed "$seconds" "timed out after ${limit} s"
  else
    record "$name" failed "$seconds" "exit status $rc (see gpu_suite.log)"
  fi
}

# --- the steps (each runs in its own bash, so they read only exported variables) --------------------

step_install() {
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  if [ "${#wheels[@]}" -eq 0 ]; then
    echo "no wheels in $WHEELS: run 'bash benchmarks/gpu_suite.sh --prepare' before the call and carry the folder" >&2
    exit 1
  fi
  # --target, not the machine's environment: nothing there is replaced; PYTHONPATH already names it.
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "${wheels[@]}"
  # The package itself, from this working tree, without an index or build isolation (nothing to fetch).
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation --no-cache-dir -e "$REPO"
}

step_imports() {
  "$PYTHON" "$SUITE_PY" env --output "$WORK/env.json" $([ "$MODE" = gpu ] && echo --require-cuda)
}

step_gpu_tests() {
  cd "$REPO"
  "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_sketch.py --junitxml "$WORK/junit.xml"
}

step_pooling_speed() {
  local sizes=()
  [ "$MODE" = gpu ] || sizes=(--quick --batch-size 2 --dim 32 --heads 2 --tokens 36 --sketches 8x3 --warmup 0 --repeats 1)
  "$PYTHON" "$REPO/benchmarks/pooling_speed.py" --device "$DEVICE" "${sizes[@]}" --output "$OUT/pooling_speed.json"
}

model_sizes() {  # the dry run's sizes for the two model-level benchmarks
  [ "$MODE" = gpu ] || echo "--quick --batch-size 2 --warmup 0 --repeats 1"
}

step_encode_throughput() {
  # shellcheck disable=SC2046
  "$PYTHON" "$REPO/benchmarks/encode_throughput.py" --device "$DEVICE" --towers "$TOWERS" $(model_sizes) \
    --output "$OUT/encode_throughput.json"
}

step_train_step() {
  # shellcheck disable=SC2046
  "$PYTHON" "$REPO/benchmarks/train_step.py" --device "$DEVICE" --towers "$TOWERS" $(model_sizes) \
    --output "$OUT/train_step.json"
}

step_train_bf16() {
  local steps=20 batch=32 images=200 extra=() start seconds
  if [ "$MODE" != gpu ]; then
    steps=3 batch=8 images=30 extra=(--use_cpu true)
  fi
  "$PYTHON" "$SUITE_PY" towers --towers "$TOWERS" --output "$WORK/towers"
  start=$EPOCHREALTIME
  "$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
    --dynamo_backend no "$REPO/examples/train_temde.py" \
    --model_config "$WORK/towers/config.json" --image_processor_path "$WORK/towers/image" \
    --tokenizer_path "$WORK/towers/text" --synthetic_images "$images" --max_text_length 24 \
    --output_dir "$WORK/train_bf16" --max_steps "$steps" --per_device_train_batch_size "$batch" \
    --learning_rate 2e-4 --warmup_steps 2 --save_steps 0 --logging_steps 1 --report_to none \
    --disable_tqdm true --mixed_precision bf16 "${extra[@]}"
  seconds="$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }')"
  "$PYTHON" "$SUITE_PY" train-record "$WORK/train_bf16" --output "$OUT/train_bf16.json" \
    --seconds "$seconds" --max-steps "$steps" --towers "$TOWERS"
}

export -f step_install step_imports step_gpu_tests step_pooling_speed model_sizes step_encode_throughput \
  step_train_step step_train_bf16

if [ "$MODE" = gpu ]; then
  run_step install 90 step_install
else
  skip_step install "dry run: uses the installed environment (no carried wheels, no network)"
fi
run_step imports 60 step_imports
run_step gpu_tests 120 step_gpu_tests
run_step pooling_speed 200 step_pooling_speed
run_step encode_throughput 90 step_encode_throughput
run_step train_step 90 step_train_step
run_step train_bf16 150 step_train_bf16

echo
echo "=== summary ($MODE, $SECONDS s)"
"$PYTHON" "$SUITE_PY" summary --steps "$WORK/steps.tsv" --output "$OUT/gpu_suite.json" --mode "$MODE" \
  --env "$WORK/env.json" --junit "$WORK/junit.xml"
