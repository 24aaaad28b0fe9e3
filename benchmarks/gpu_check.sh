#!/usr/bin/env bash
# Standing GPU check for a lent H100/H200 (see /work/.library/device/README.md). From the repo root:
#   device run: command="GPU_CHECK_STAGES=\"1 2 3 4\" bash benchmarks/gpu_check.sh", carry=[".whl"] (if wheels
#   are needed), timeout_s=590; then the same with GPU_CHECK_STAGES=5 (stage 5 alone: 540 s)
# Dry run on CPU (GPU stages skip): OUT=/tmp/x GPU_CHECK_BENCH_ARGS="--quick --reps 1" bash benchmarks/gpu_check.sh
# Stages, each under its own timeout so one hang cannot eat the lease. They sum to 1115 s, over a
# 10-minute device command: run two calls, GPU_CHECK_STAGES="1 2 3 4" then GPU_CHECK_STAGES=5
# (a space-separated list of the stages to run; unset = all; stage 0 always runs):
#   0. install carried wheels (.whl/*.whl, cp312) and make `megavla` importable (editable, offline)
#   1. GPU kernel tests: pytest -m gpu tests/test_kernels_*.py (full shapes, fp32 + bf16)   150 s
#   2. kernel benchmark without torch.compile (always yields a table), then with it          45 + 110 s
#   3. train step: 1b preset, bf16, plain PyTorch and DeepSpeed ZeRO-2 on 1 GPU; MFU from the
#      FLOPs of the batch actually run (goal >= 40 %)                                          130 s
#   4. launch -> first step -> steady state (benchmarks/launch.py, 1 process) and the reader
#      per worker vs decode-only (benchmarks/loader.py), into perf.log                         70 + 70 s
#   5. torch.compile (benchmarks/compile.py): small, eager vs train.compile=blocks / full step
#      time and first-compile time, sample_actions eager vs compiled, appended to perf.log        540 s
# Everything lands in $OUT (at most 8 files come back): gpu_check.log env.txt kernel_tests.log
# kernels_bench.log kernels_table_nocompile.md kernels_table.md train_step.log perf.log.
set -uo pipefail
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXX)}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=python3
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:-}  # e.g. "--quick --reps 1" for a dry run of this script on CPU
log() { echo "[gpu_check $(date -u +%T)] $*" | tee -a "$OUT/gpu_check.log"; }
want() { [ -z "${GPU_CHECK_STAGES:-}" ] || [[ " $GPU_CHECK_STAGES " == *" $1 "* ]]; }

log "start in $(pwd), OUT=$OUT"
{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name())"; git log -1 --oneline 2>/dev/null; } > "$OUT/env.txt" 2>&1

if compgen -G ".whl/*.whl" > /dev/null; then
  log "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$OUT/gpu_check.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || log "wheel install FAILED"
fi
# kernels/ is installed as megavla.kernels via package_dir, so PYTHONPATH=. is not enough
if $PY -c "import megavla.kernels, sys; sys.exit(not megavla.kernels.__file__.startswith('$(pwd)/'))" 2>/dev/null; then
  log "megavla already importable from this tree"
elif ! $PY -m pip install -q --no-deps --no-index --no-build-isolation -e . >> "$OUT/gpu_check.log" 2>&1; then
  log "editable install failed; assembling megavla under /tmp/megavla_pkg instead"
  rm -rf /tmp/megavla_pkg && mkdir -p /tmp/megavla_pkg && cp -r megavla /tmp/megavla_pkg/
  for sub in kernels launch data_shards; do ln -sfn "$(pwd)/$sub" "/tmp/megavla_pkg/megavla/$sub"; done
  export PYTHONPATH=/tmp/megavla_pkg${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import megavla.kernels as k; print('megavla.kernels from', k.__file__)" 2>&1 | tee -a "$OUT/gpu_check.log"

if want 1; then
log "stage 1: GPU kernel tests"
timeout 150 $PY -m pytest tests/test_kernels_triton.py tests/test_kernels_attention.py -m gpu -q -rs \
  -p no:cacheprovider > "$OUT/kernel_tests.log" 2>&1
log "kernel tests rc=$? ($(tail -1 "$OUT/kernel_tests.log"))"
fi

if want 2; then
log "stage 2a: kernel benchmark, no torch.compile"
timeout 45 $PY benchmarks/kernels.py $BENCH_ARGS --no-compile --out "$OUT/kernels_table_nocompile.md" >> "$OUT/kernels_bench.log" 2>&1
log "benchmark (no compile) rc=$?"
log "stage 2b: kernel benchmark with torch.compile"
timeout 110 $PY benchmarks/kernels.py $BENCH_ARGS --out "$OUT/kernels_table.md" >> "$OUT/kernels_bench.log" 2>&1
log "benchmark (compile) rc=$?"
fi

if want 3; then
log "stage 3: training-step benchmark (1b, bf16, 1 GPU)"
if [ -n "$BENCH_ARGS" ]; then TS_ARGS="--presets tiny --stages -1 --steps 1 --batch 2 --nproc 1"
else TS_ARGS="--presets 1b --stages -1 2 --steps 5 --batch 16 --nproc 1"; fi
timeout 130 $PY benchmarks/train_step.py $TS_ARGS > "$OUT/train_step.log" 2>&1
log "train_step rc=$? ($(grep -c '^| ' "$OUT/train_step.log") table lines)"
fi

if want 4; then
log "stage 4: launch cost and reader throughput"
{ echo "== benchmarks/launch.py --nproc 1"; timeout 70 $PY benchmarks/launch.py --nproc 1 --rounds 1 --steps 10 2>&1
  echo "rc=$?"; echo "== benchmarks/loader.py"
  if [ -n "$BENCH_ARGS" ]; then LD_ARGS="--quick"; else LD_ARGS="--rounds 1 --batches 30 --workers 0 1 2"; fi
  OMP_NUM_THREADS=1 timeout 70 $PY benchmarks/loader.py $LD_ARGS 2>&1; echo "rc=$?"; } > "$OUT/perf.log"
log "perf rc=$? ($(grep -c '^| ' "$OUT/perf.log") table lines)"
fi

if want 5; then
log "stage 5: torch.compile, eager vs compiled (train step, sample_actions)"
if [ -n "$BENCH_ARGS" ]; then CP_ARGS="--presets tiny --modes full --steps 1 --rounds 2 --repeats 1 --cold-presets"
else CP_ARGS="--presets small --modes blocks full --steps 5 --rounds 4 --batch 16 --repeats 5 --cold-presets"; fi
{ echo "== benchmarks/compile.py $CP_ARGS"; timeout 540 $PY benchmarks/compile.py $CP_ARGS 2>&1; echo "rc=$?"; } >> "$OUT/perf.log"
log "compile benchmark $(tail -1 "$OUT/perf.log")"
fi
log "done"
