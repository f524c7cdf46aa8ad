#!/usr/bin/env bash
# Key checks on a GPU or Ascend machine in one short run, written to one folder: each step has a time limit,
# together at most 10 minutes (typically much less).
#
#   bash benchmarks/device_check.sh GPU [OUT_DIR]       # or Ascend; OUT_DIR default: device_check_<date>
#   DEVICE_CHECK_QUICK=1 DEVICE_CHECK_TIME_SCALE=3 bash benchmarks/device_check.sh CPU /tmp/dc   # a dry run on CPU
#
# Installs nothing: needs the project's requirements (MindSpore for the device, numpy, PyYAML, Pillow, pytest).
# Steps (each with its own time limit; a failing step does not stop the others):
#   env        MindSpore version and run_check, the device (nvidia-smi / npu-smi)
#   tests      the device-relevant tests (sliding-window kernels and fallbacks, the lean loop against the
#              per-step loop, real data sinking against the host loop) on the device
#   sink_O2 / sink_O3   train.py with data sinking (sink_size 5), AMP O2 / O3 and dynamic loss scaling,
#              2 epochs of resnet_tiny on generated 32 px images; the log must show finite losses
#   steps      training steps of ResNet-ACmix-26 with the sliding-window attention as 'unfold' and 'lean',
#              and of Swin-ACmix-T (benchmarks/bench_models.py, batch 8, 224 px): img/s; the device memory
#              peak is sampled with nvidia-smi / npu-smi while it runs
#   export     export.py MINDIR of the O2 run's checkpoint, reloaded by eval.py (same top-1 as training)
#   data       benchmarks/bench_data.py --quick (the input pipeline alone)
# Result: OUT_DIR/report.md (one table, then the key lines of each step) and OUT_DIR/<step>.log.
set -u
DEVICE=${1:-GPU}
OUT=${2:-device_check_$(date -u +%Y%m%d_%H%M%S)}
QUICK=${DEVICE_CHECK_QUICK:-0}
SCALE=${DEVICE_CHECK_TIME_SCALE:-1}  # multiplies every time limit (a CPU dry run on a busy machine needs more)
case "$DEVICE" in GPU|Ascend|CPU) ;; *) echo "usage: bash benchmarks/device_check.sh GPU|Ascend [OUT_DIR]" >&2; exit 2;; esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPORT="$OUT/report.md"
DATA="$OUT/data"
PY=${PYTHON:-python}
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export ACMIX_CACHE_DIR="$OUT/cache"

{
  echo "# Device check: $DEVICE"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| step | exit code | seconds |"
  echo "|---|---|---|"
} > "$REPORT"

sample_memory() {  # device memory used (MiB) every second into $1, until killed
  while true; do
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1
    elif command -v npu-smi >/dev/null; then
      npu-smi info 2>/dev/null | awk '/[0-9]+ *\/ *[0-9]+/ {print}' | head -1
    fi
    sleep 1
  done >> "$1"
}

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (limit $(( limit * SCALE )) s)"
  start=$(date +%s)
  timeout "$(( limit * SCALE ))" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "| $name | $rc$([ "$rc" = 124 ] && echo ' (time limit)') | $(( $(date +%s) - start )) |" >> "$REPORT"
  tail -3 "$OUT/$name.log"
  return 0
}

step env 30 bash -c "$PY -c 'import mindspore as ms; print(\"MindSpore\", ms.__version__); ms.set_device(\"$DEVICE\"); ms.run_check()'; \
  (nvidia-smi 2>/dev/null || npu-smi info 2>/dev/null || echo 'no nvidia-smi / npu-smi')"

# pytest runs on MindSpore's default device (the installed backend); the log's first line names it
TESTS="tests/test_local_attention.py tests/test_train_loop.py"
[ "$QUICK" = 1 ] && TESTS="tests/test_train_loop.py"
step tests 120 bash -c "$PY -c 'import mindspore as ms; print(\"tests run on\", ms.get_context(\"device_target\"))' \
  && $PY -m pytest -q -p no:cacheprovider $TESTS"

step make_data 30 "$PY" -c "
import sys; sys.path.insert(0, 'tests')
from conftest import write_generated_split
classes = [f'class_{i}' for i in range(10)]
write_generated_split('$DATA', 'train', classes, 40, seed=0)
write_generated_split('$DATA', 'val', classes, 10, seed=1)"

EPOCHS=2
[ "$QUICK" = 1 ] && EPOCHS=1
for level in O2 O3; do
  step "sink_$level" 80 "$PY" train.py --model resnet_tiny --data_dir "$DATA" --output_dir "$OUT/run_$level" \
    --device_target "$DEVICE" --image_size 32 --crop_pct 1.0 --batch_size 16 --epochs "$EPOCHS" --lr 0.05 \
    --warmup_epochs 0.5 --amp_level "$level" --loss_scale dynamic --loss_scale_value 1024 --data_sink true \
    --sink_size 5 --log_interval 5 --mean "[0.286]" --std "[0.353]" --plot false --overwrite true
done

STEPS_SIZE=224
STEPS_BATCH=8
[ "$QUICK" = 1 ] && STEPS_SIZE=64 && STEPS_BATCH=2  # 64 px: the smallest input of ResNet-ACmix-26 is 49
sample_memory "$OUT/steps_memory.txt" &
SAMPLER=$!
step steps 160 "$PY" benchmarks/bench_models.py --device_target "$DEVICE" --modes train --no_baselines \
  --models resnet26_acmix:attention_impl=unfold resnet26_acmix:attention_impl=lean swin_tiny_acmix \
  --batch_sizes "$STEPS_BATCH" --image_sizes "$STEPS_SIZE" --warmup 2 --repeats 10 --max_seconds 10 \
  --timeout "$(( 60 * SCALE ))" --out "$OUT/steps.md"
kill "$SAMPLER" 2>/dev/null

step export 60 bash -c "$PY export.py --checkpoint '$OUT/run_O2/last.ckpt' --output '$OUT/resnet_tiny.mindir' \
  --batch_size 4 --device_target $DEVICE && $PY eval.py --mindir '$OUT/resnet_tiny.mindir' --data_dir '$DATA' \
  --device_target $DEVICE --json '$OUT/eval_mindir.json'"

step data 40 "$PY" benchmarks/bench_data.py --quick --out "$OUT/data.md"

{
  echo
  echo "## Key lines"
  for name in env tests sink_O2 sink_O3 steps export data; do
    echo
    echo "### $name"
    echo
    echo '```'
    case $name in
      sink_*) grep -E "data sink|img/s|val top-1|finished|rror" "$OUT/$name.log" | tail -8;;
      steps) cat "$OUT/steps.md" 2>/dev/null | grep '^|' | head -12 || tail -5 "$OUT/$name.log"
             echo "device memory peak (MiB, sampled): $(sort -n "$OUT/steps_memory.txt" 2>/dev/null | tail -1)";;
      *) tail -6 "$OUT/$name.log";;
    esac
    echo '```'
  done
} >> "$REPORT"
echo "report: $REPORT"
