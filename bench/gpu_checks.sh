#!/usr/bin/env bash
# Everything that needs a CUDA machine, in one command: build the extension with its CUDA
# kernels, run the GPU tests, a compute-sanitizer memcheck of the cuda backend, and the per-layer
# benchmarks on CUDA. Logs and tables go to $OUT (default gpu-results/); a summary line per step
# is printed last.
#
#   bash bench/gpu_checks.sh                # build tests sanitize bench
#   bash bench/gpu_checks.sh build bench    # some steps only (build is needed once per machine)
#
# Environment: PYTHON (default python3, the interpreter that holds torch there),
# TORCH_CUDA_ARCH_LIST (default 9.0: H100/H200), MAX_JOBS (default 16), BATCHES (default "32 256"),
# STEP_TIMEOUT (default 480 s: a step that hangs is stopped and its log kept), WORKERS (pytest
# processes for the GPU test matrix, default 8; needs pytest-xdist).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
BATCHES=${BATCHES:-32 256}
WORKERS=${WORKERS:-8}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
mkdir -p "$OUT"
SUMMARY=()

# step NAME COMMAND...: runs COMMAND with its output in $OUT/NAME.log; records rc, time, last line.
step() {
  local name=$1 start rc
  shift
  start=$(date +%s)
  echo "== $name: $*"
  timeout "${STEP_TIMEOUT:-480}" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  SUMMARY+=("$name: rc=$rc, $(($(date +%s) - start)) s, $(tail -n 1 "$OUT/$name.log")")
  return $rc
}

build() {
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
  "$PY" -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" \
    >"$OUT/versions.txt" 2>&1
  step build "$PY" -m pip install --no-build-isolation --no-deps -v -e . ||
    step build-cpu-only env CONDCONV_SKIP_CUDA=1 "$PY" -m pip install --no-build-isolation \
      --no-deps -e .
  step backends "$PY" -c "import condconv_kernels as cc; print(cc.available_backends('cuda'))"
}

tests() {
  # The matrix compiles a Triton variant per shape, dtype and stride pattern: one configuration
  # each (autotuning off) and WORKERS processes compiling side by side keep that to minutes.
  # The batch-256 cases then run again autotuned, as the benchmarks do.
  step test-gpu env CONDCONV_TRITON_AUTOTUNE=0 "$PY" -m pytest tests/test_gpu.py -q -rs \
    -n "$WORKERS" -p no:cacheprovider
  step test-gpu-autotuned "$PY" -m pytest tests/test_gpu.py -q -rs -k "batch_256 or graph"
  step test-timm "$PY" -m pytest tests/test_integration.py -q -rs -k timm
}

sanitize() {
  # Forward and backward of the cuda backend on a dense, a pointwise, a grouped and a depthwise
  # layer, under memcheck (out-of-bounds and misaligned accesses, launch errors).
  step sanitize compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -c '
import torch, condconv_kernels as cc
torch.manual_seed(0)
for cin, cout, k, s, groups, dtype in [(8, 16, 3, 2, 1, torch.float32), (16, 24, 1, 1, 1, torch.float16),
                                       (8, 8, 3, 1, 2, torch.bfloat16), (16, 16, 5, 2, 16, torch.float32)]:
    x = torch.randn(3, cin, 11, 13, device="cuda", dtype=dtype, requires_grad=True)
    r = torch.rand(3, 4, device="cuda", requires_grad=True)
    w = torch.randn(4, cout, cin // groups, k, k, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(4, cout, device="cuda", dtype=dtype, requires_grad=True)
    y = cc.condconv2d(x, r, w, b, s, "same", 1, groups, backend="cuda")
    torch.autograd.grad(y, [x, r, w, b], torch.randn_like(y))
torch.cuda.synchronize()
print("memcheck run finished")'
}

bench() {
  local b
  step model-amp "$PY" bench/bench_model.py --device cuda --batch 1,256 --amp bfloat16 \
    --channels-last --out "$OUT/cuda-model-amp.md"
  step model-amp-train "$PY" bench/bench_model.py --device cuda --batch 256 --amp bfloat16 \
    --channels-last --backward --out "$OUT/cuda-model-amp-train.md"
  for b in $BATCHES; do
    step "bench-b$b" "$PY" bench/bench_layers.py --device cuda --batch "$b" --roofline \
      --out "$OUT/cuda-layers-b$b.md"
    step "bench-b$b-bf16" "$PY" bench/bench_layers.py --device cuda --batch "$b" --roofline \
      --dtype bfloat16 --out "$OUT/cuda-layers-b$b-bfloat16.md"
    step "bench-b$b-fwdbwd" "$PY" bench/bench_layers.py --device cuda --batch "$b" --backward \
      --out "$OUT/cuda-layers-b$b-fwdbwd.md"
  done
}

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build tests sanitize bench)
for s in "${STEPS[@]}"; do
  case $s in
    build | tests | sanitize | bench) $s ;;
    *) echo "unknown step '$s' (build, tests, sanitize, bench)" >&2; exit 2 ;;
  esac
done
echo
printf '%s\n' "${SUMMARY[@]}"
for f in "$OUT"/cuda-layers-*.md; do
  [ -f "$f" ] && echo "$f: $(grep geomean "$f")"
done
for f in "$OUT"/cuda-model-*.md; do
  [ -f "$f" ] && grep "^| [0-9]" "$f" | sed "s|^|$(basename "$f"): |"
done
exit 0
