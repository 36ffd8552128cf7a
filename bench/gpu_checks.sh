#!/usr/bin/env bash
# Every GPU check of the project, in two calls sized for a 15-minute GPU lease:
#
#   bash bench/gpu_checks.sh first    # at most 8.5 min: give it a 560 s limit
#   bash bench/gpu_checks.sh second   # at most 4 min: give it a 300 s limit
#   bash bench/gpu_checks.sh profile  # at most 4 min: give it a 290 s limit (with the kit)
#
# first:  versions, nvidia-smi, Triton's cache key; the CUDA extension builds in the background
#         (one translation unit per dtype, MAX_JOBS=16) and Triton's cache is filled with every
#         configuration the benchmarks will tune (bench/warm_triton.py), while the triton
#         backend's correctness subset runs (tests/test_gpu.py, autotuning off); the cuda
#         backend's subset; each of the cuda backend's unmeasured Hopper kernels once, in a
#         process of its own with a time limit (bench/hopper_probe.py: the later steps leave
#         out a kernel that crashed or hung there, hopper.env, kept in the kit for the second
#         call); the autotuned launches against the reference on five layers
#         (bench/tuned_check.py: tuning, Triton's launch, the direct launch); the 1x1 passes
#         (forward, grad_x, kernel gradients) of the dense kernels against the static layer and
#         the experimental alternatives (the experts-stationary kernel, batched cuBLAS
#         products, the kernel gradient in the accumulator's layout), each routing gradient
#         against a float64 sum (bench/bench_pointwise.py);
#         whole-model inference at batch 256, static and fused triton captured in a CUDA graph
#         (device time; also with the batched 1x1 forward, with the mix pass and, where the
#         probe passed them, with the three Hopper kernels: fused:triton+cluster); the headline
#         benchmark (the 24 CondConv layers of tf_efficientnet_cc_b0_8e, batch 256, bfloat16,
#         channels_last, forward: triton, cuda, unfused, static, roofline columns, each variant
#         as CUDA graph replays: the device's time); eager inference (ours fused, also with the
#         mix pass, unfused and static, timm's tf_efficientnet_cc_b0_8e and tf_efficientnet_b0);
#         then kit.tgz: the built extension, Triton's compiled kernels and autotune results.
# second: put the first call's kit.tgz back at .gpu-kit/kit.tgz (an ignored path: carry .gpu-kit)
#         and the build and compiled kernels are reused (without it, or with other sources, it
#         rebuilds; the first call's probe, hopper.env, is reused, else it probes): the
#         training step (static, fused triton, fused triton with the mix pass, fused triton with
#         grad_x batched, and fused:triton+cluster where the probe passed the Hopper kernels)
#         captured in a CUDA graph; the forward+backward layer benchmark at batch 256 as CUDA
#         graph replays (device time); host against device time of one layer and the whole
#         model's kernels (bench/gpu_profile.py, one layer); Nsight Compute on each kernel of
#         two layers and on the Hopper kernels (bench/ncu_layers.py); compute-sanitizer memcheck
#         of the cuda backend; eager training-step throughput.
# profile: with the kit as for second: host against device time per call and the kernels each
#         call launches, for five layers and the whole model (bench/gpu_profile.py); Nsight
#         Compute on each kernel of two layers (bench/ncu_layers.py: occupancy, stall reasons,
#         memory and tensor-pipe throughput); the DynamicConv2d and ODConv2d layers (ResNet-18
#         and MobileNetV2 shapes, batch 64, autocast bfloat16) fused against their
#         grouped-convolution form, forward and forward+backward (bench/bench_dynamic.py); the
#         dense kernel gradient with one gradient asked for at a time (bench/kgrad_ablation.py);
#         then the >2^31-element tests up to their first failure, with its traceback.
#
# Output in $OUT (default gpu-results/), at most 8 files: summary.md (each step's status,
# time and cap, the machine's state as it started, and the tables, appended as each step ends,
# printed last), log.txt (all output), results.tgz (the benchmarks' tables and JSON, and the
# autotuner's time of every configuration: bench/tuner_timings.py) and, from the first call,
# kit.tgz. Commit each call's summary as bench/results/gpu-<card>-first.md / -second.md (its
# first lines name the card).
#
# Each step has a hard cap and each call a deadline (FIRST_DEADLINE=510, SECOND_DEADLINE=280,
# PROFILE_DEADLINE=230 s):
# a step that would run past the deadline is cut short or skipped, so a call always ends in
# time with everything done so far in $OUT. A failed step never stops the script, which exits 0.
# GPU_CHECKS_DRY_RUN=1 walks every step on the CPU with small stand-ins (make test runs it).
# Environment: PYTHON (python3), OUT, GPU_KIT_DIR (.gpu-kit), WORKERS (pytest processes, 6),
# TRITON_CACHE_DIR (/tmp/condconv-triton-cache: fixed, since Triton's cache records absolute
# paths), TORCH_CUDA_ARCH_LIST (9.0a: Hopper with its arch-specific instructions, wgmma; the
# build then has the cuda backend's wgmma kernel, CONDCONV_CUDA_CLUSTER=wgmma), MAX_JOBS (16).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=${1:-}
case $MODE in
  first | second | profile) ;;
  *) echo "usage: bash bench/gpu_checks.sh first|second|profile (see the top of this file)" >&2
     exit 2 ;;
esac
PY=${PYTHON:-python3}
DRY=${GPU_CHECKS_DRY_RUN:-0}
WORKERS=${WORKERS:-6}
mkdir -p "${OUT:=gpu-results}" "${GPU_KIT_DIR:=.gpu-kit}"
OUT=$(cd "$OUT" && pwd)
KIT=$(cd "$GPU_KIT_DIR" && pwd)
WORK=$KIT/work
rm -rf "$WORK"
mkdir -p "$WORK/results" "$WORK/build"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/condconv-triton-cache}
export TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
mkdir -p "$TRITON_CACHE_DIR"
START=$(date +%s)
case $MODE in
  first) LIMIT=${FIRST_DEADLINE:-510} ;;
  second) LIMIT=${SECOND_DEADLINE:-280} ;;
  profile) LIMIT=${PROFILE_DEADLINE:-230} ;;
esac
DEADLINE=$((START + LIMIT))
RESERVE=${RESERVE:-25}  # seconds kept for packing the results after the last step
LOG=$OUT/log.txt
SUMMARY=$OUT/summary.md
: >"$LOG"

now() { date +%s; }

# record NAME STATUS SECONDS CAP [FILE]: one line in the summary, then FILE's last lines (or
# all of a table file), the moment a step ends.
record() {
  local name=$1 status=$2 secs=$3 cap=$4 file=${5:-}
  {
    echo "### $name: $status, $secs s (cap $cap s)"
    [ -n "${BUSY:-}" ] && echo "before it: $BUSY"
    # The output's last lines, unless a table from it follows (table).
    if [ -n "$file" ] && [ -s "$file" ] && ! { [ "$status" = ok ] && grep -q '^|' "$file"; }; then
      echo '```'
      grep -v '^\s*$' "$file" | tail -n "${TAIL_LINES:-4}" | sed "s#$ROOT/##g"  # paths relative
      echo '```'
    fi
    echo
  } >>"$SUMMARY"
}

# busy: the load average, the processes on the GPU and its clocks, temperature, power and
# active throttle reasons as a step starts (a benchmark that shared the machine with a step
# before it, or ran on a throttled GPU, says so in the summary).
busy() {
  local apps="" gpu=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    apps=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null |
           tr '\n' ';')
    gpu=$(nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw \
          --format=csv,noheader 2>/dev/null | head -n 1)
    local field reasons=""
    for field in clocks_event_reasons.active clocks_throttle_reasons.active; do
      reasons=$(nvidia-smi --query-gpu=$field --format=csv,noheader 2>/dev/null | head -n 1)
      [[ $reasons == 0x* ]] && break
      reasons=""
    done
    gpu=${gpu:+$gpu, ${reasons:-?}}
  fi
  echo "load $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null), GPU processes: ${apps:-none}${gpu:+, GPU: $gpu (SM and memory clocks, temperature, power, throttle reasons)}"
}

# step NAME CAP COMMAND...: runs COMMAND (a program or a function of this file) under a hard cap,
# shortened to the deadline, its output into the log as it runs (background steps: at their
# end); records the status when it ends. Returns COMMAND's status.
step() {
  local name=$1 cap=$2 left t0 rc status sink=$LOG
  shift 2
  left=$((DEADLINE - RESERVE - $(now)))
  if ((left < 5)); then
    record "$name" "skipped (deadline)" 0 "$cap"
    return 1
  fi
  ((cap > left)) && cap=$left
  [ "${IN_BACKGROUND:-0}" = 1 ] && sink=/dev/null
  t0=$(now)
  BUSY=$(busy)
  echo "== $name (cap $cap s): $*"
  [ "$sink" = "$LOG" ] && printf '\n===== %s (cap %s s): %s\n' "$name" "$cap" "$*" >>"$LOG"
  if declare -F "$1" >/dev/null; then
    timeout -k 10 "$cap" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$WORK/$name.out" >>"$sink"
  else
    timeout -k 10 "$cap" "$@" 2>&1 | tee "$WORK/$name.out" >>"$sink"
  fi
  rc=${PIPESTATUS[0]}
  if [ "$sink" != "$LOG" ]; then
    { printf '\n===== %s (background, cap %s s): %s\n' "$name" "$cap" "$*"
      cat "$WORK/$name.out"; } >>"$LOG"
  fi
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT" ;;
    *) status="FAILED (rc $rc)" ;;
  esac
  record "$name" "$status" $(($(now) - t0)) "$cap" "$WORK/$name.out"
  return "$rc"
}

# background NAME CAP COMMAND...: a step in the background; join NAME waits for it until the
# deadline, then stops it.
declare -A BG_PID
background() {
  local name=$1
  (IN_BACKGROUND=1 step "$@" >/dev/null 2>&1) &
  BG_PID[$name]=$!
  echo "== $name: started in the background"
}
join() {
  local name=$1 pid=${BG_PID[$1]}
  while kill -0 "$pid" 2>/dev/null && (($(now) < DEADLINE - RESERVE)); do sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then
    pkill -TERM -P "$pid" 2>/dev/null
    sleep 2
    pkill -KILL -P "$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
}

# pack_results: results.tgz made again, with the autotuner's time of every configuration it tried
# so far (Triton's <hash>/<kernel>.autotune.json, a few KB each, under results/autotune:
# bench/tuner_timings.py reads them).
pack_results() {
  mkdir -p "$WORK/results/autotune"
  (cd "$TRITON_CACHE_DIR" 2>/dev/null &&  # (not Triton's tmp.* files being written)
    find . -name '*.autotune.json' -not -path '*/tmp.*' -print0 |
    xargs -0 -r cp --parents -t "$WORK/results/autotune" 2>/dev/null)
  tar czf "$OUT/results.tgz" -C "$WORK" results 2>/dev/null
}

# report FILE: a whole report (headings and tables) into the summary and results.tgz.
report() {
  [ -s "$1" ] || return 0
  { cat "$1"; echo; } >>"$SUMMARY"
  pack_results
}

# table FILE: a benchmark's table into the summary and results.tgz.
table() {
  [ -s "$1" ] || return 0
  { sed -n '/^|/,$p' "$1"; echo; } >>"$SUMMARY"
  pack_results
}

# pytest_cmd [N]: pytest with N (default WORKERS) processes where pytest-xdist is there (not in
# the dry run), each with one CPU thread for torch, so that N processes do not each start 16
# OpenMP threads for the ground truths they compute on the CPU, beside the build's and the
# Triton compiles' processes. (The third run's triton-tests took 176 s, one batch-256 test 128 s
# of it, for a reason its log does not show: on a quiet 2-core CPU that test's ground truths take
# 0.3 s and its three Triton compiles 5 s; the step's --durations now lists 12 tests.) Its
# output starts with an assignment: put it after `env` and the step's other assignments.
pytest_cmd() {
  if [ "$DRY" != 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
    echo "OMP_NUM_THREADS=1 $PY -m pytest -q -rfE -p no:cacheprovider -n ${1:-$WORKERS}"
  else
    echo "$PY -m pytest -q -rfE -p no:cacheprovider"
  fi
}

stamp() {  # what the built extension depends on
  { cat setup.py csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/* 2>/dev/null
    "$PY" -c "import torch; print(torch.__version__)"; echo "$TORCH_CUDA_ARCH_LIST"; } |
    sha256sum | cut -c1-16
}

versions() {
  "$PY" - <<'EOF'
import hashlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    from triton.runtime.cache import triton_key
    print("triton", triton.__version__, "| triton_key sha256",
          hashlib.sha256(triton_key().encode()).hexdigest()[:16])
except Exception as exc:  # noqa: BLE001
    print("triton:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name} | sm_{p.major}{p.minor} | {p.multi_processor_count} SMs | "
          f"{p.total_memory / 2**30:.0f} GiB | L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("gpu: none")
EOF
  nvidia-smi 2>&1 | head -n 20 || true
  nvcc --version 2>&1 | tail -n 2 || true
}

build_extension() {  # into $WORK/build, never into the package while tests import it
  if [ "$DRY" = 1 ]; then  # stand-in: the extension this tree already has
    mkdir -p "$WORK/build/lib/condconv_kernels"
    cp condconv_kernels/_C*.so "$WORK/build/lib/condconv_kernels/" && echo "dry run: copied"
    return
  fi
  # Portable CPU code: the second call may run on another machine of the kind.
  CONDCONV_PORTABLE=1 "$PY" setup.py build_ext --build-lib "$WORK/build/lib" \
    --build-temp "$WORK/build/tmp"
}

install_extension() {  # the built _C into the package, atomically; then what it can run
  local so
  so=$(ls "$WORK"/build/lib/condconv_kernels/_C*.so 2>/dev/null | head -n 1)
  if [ -z "$so" ]; then echo "no built extension"; return 1; fi
  if [ "$DRY" != 1 ]; then
    cp "$so" "condconv_kernels/.$(basename "$so").tmp" &&
      mv "condconv_kernels/.$(basename "$so").tmp" "condconv_kernels/$(basename "$so")"
  fi
  stamp >"$WORK/build/stamp"
  "$PY" -c "import condconv_kernels as cc; print('cuda backends:', cc.available_backends('cuda'))"
}

ncu_layers() {  # Nsight Compute on one forward+backward of two layers (bench/ncu_layers.py)
  if [ "$DRY" = 1 ]; then "$PY" bench/ncu_layers.py --skip "${HOPPER_SKIP:-}"; return; fi
  local ncu
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null |
    head -n 1)
  if [ -z "$ncu" ]; then echo "ncu not found"; return 1; fi
  "$ncu" --profile-from-start off --clock-control none --target-processes all \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    "$PY" bench/ncu_layers.py --skip "${HOPPER_SKIP:-}" | tee "$WORK/results/ncu-layers.txt"
}

# probe: the cuda backend's Hopper kernels, each once in a process of its own, then what the
# later steps take from it (probe_env).
probe() {
  "$PY" bench/hopper_probe.py --timeout 20 --env "$WORK/hopper.env" --out "$WORK/results/probe.md"
}

# probe_env: the probe's settings for the later steps (hopper.env: the cluster switch off where
# the clustered kernel crashed or hung; HOPPER_SKIP, the pointwise columns to leave out).
probe_env() {
  if [ -s "$WORK/hopper.env" ]; then
    . "$WORK/hopper.env"
    echo "hopper.env: CONDCONV_CUDA_CLUSTER=${CONDCONV_CUDA_CLUSTER:-default} HOPPER_SKIP=${HOPPER_SKIP:-}" >>"$LOG"
  fi
}

# hopper_also: bench_model's cluster variant (the triton backend with the three Hopper kernels:
# forward and grad_x clustered, the kernel gradient's kernel) beside the graphed variants,
# where the probe passed every kernel (none crashed, hung or went unprobed).
hopper_also() {
  [ -s "$WORK/hopper.env" ] && [ -z "${HOPPER_SKIP:-}" ] && echo "--also fused:triton+cluster"
}

# probe_step: the probe where no verdict is at hand (the first call's, from its kit), then its
# settings.
probe_step() {
  if [ ! -s "$WORK/hopper.env" ]; then
    # every kernel off until the probe writes its verdicts (a probe skipped or killed early)
    "$PY" bench/hopper_probe.py --unprobed --env "$WORK/hopper.env" >>"$LOG" 2>&1
    step probe 45 probe  # (three probes at once, each of at most 20 s)
    table "$WORK/results/probe.md"
  fi
  probe_env
}

export ROOT PY DRY WORK KIT OUT
export -f stamp versions build_extension install_extension ncu_layers probe

restore() {  # the first call's kit: Triton's cache always, the extension if its sources match
  local staged=$WORK/kit
  if [ ! -s "$KIT/kit.tgz" ]; then
    echo "no kit at $KIT/kit.tgz: building"
    touch "$WORK/need-build"
    return 0
  fi
  mkdir -p "$staged" && tar xzf "$KIT/kit.tgz" -C "$staged" || return 1
  cp -a "$staged/triton-cache/." "$TRITON_CACHE_DIR/"
  echo "Triton cache: $(find "$TRITON_CACHE_DIR" -type f | wc -l) files"
  if [ "$(cat "$staged/stamp" 2>/dev/null)" != "$(stamp)" ] ||
    ! ls "$staged"/_C*.so >/dev/null 2>&1; then
    echo "the kit's extension was built from other sources (or is missing): building"
    touch "$WORK/need-build"
    return 0
  fi
  mkdir -p "$WORK/build/lib/condconv_kernels"
  cp "$staged"/_C*.so "$WORK/build/lib/condconv_kernels/"
  echo "extension reused from the kit"
  # the first call's probe of this extension's Hopper kernels (a rebuilt one is probed again)
  if [ -s "$staged/hopper.env" ]; then
    cp "$staged/hopper.env" "$WORK/hopper.env"
    echo "the first call's probe: $(head -n 1 "$WORK/hopper.env")"
  fi
}
export -f restore

# The GPU (or, dry run, CPU) arguments of each step.
if [ "$DRY" = 1 ]; then
  DEV=(--device cpu)
  TEST_ENV=(env CONDCONV_GPU_TEST_DEVICE=cpu)
  TRITON_TESTS=(-k "k1_s2_e8 or g2_s2_e8_b1")
  CUDA_TESTS=(-k "k3_s2_asym and (matrix or float64)")
  WARM=(--device cpu --backend cpu --batch 2 --first 2 --jobs 2 --dtype float32 --channels-last
        --stationary)
  LAYERS=(--batch 2 --first 2 --min-run-time 0.02)
  GRAPH=()
  MODEL=(--batch 2 --input-size 64 --min-run-time 0.05 --timm tf_efficientnet_b0)
  MODEL_FWD=("${MODEL[@]}")
  GRAPHED=(--batch 2 --input-size 64 --min-run-time 0.05 --variants static,fused:cpu)
  GRAPHED_TRAIN=("${GRAPHED[@]}")
  SANITIZE=()
  MEMCHECK=(--device cpu --backend cpu)
  PROFILE=(--device cpu --batch 2 --dtype float32 --backend cpu --layers s5.b0.expand
           --model-batch 2 --input-size 64)
  PROFILE_ONE=()
  DYNAMIC=(--device cpu --batch 2 --first 1 --min-run-time 0.02)
  KGRAD=(--device cpu --batch 2 --backend cpu --layers s5.b0.expand)
  TUNED=(--device cpu --batch 2 --dtype float32 --backend cpu --layers s6.b1.expand,s5.b1.dw)
  POINTWISE=(--device cpu --batch 2 --dtype bfloat16 --backend cpu --layers s6.b1.expand
             --chunk-mb 1 --acc-warps 4
             --modeled bench/results/gpu-model-stationary.json,bench/results/gpu-model-mix.json)
else
  DEV=(--device cuda)
  TEST_ENV=(env)
  TRITON_TESTS=(-k "not was_built")
  CUDA_TESTS=(-k "not stationary")  # the triton step runs the Gluon kernel's test
  WARM=(--batch 256 --dtype bfloat16 --channels-last --backward --jobs 14 --stationary)
  LAYERS=(--batch 256 --min-run-time 0.1)
  GRAPH=(--cuda-graph)  # both calls' layer tables: device time (before 2026-11-27 the second's
                        # was eager, host-bound: not comparable)
  MODEL=(--batch 256 --min-run-time 0.5 --timm tf_efficientnet_cc_b0_8e,tf_efficientnet_b0)
  # Eager inference with the mix pass too: its Gluon launch goes through Triton's binder,
  # where the dense kernels are launched directly (what an eager, host-bound step pays).
  MODEL_FWD=("${MODEL[@]}" --also fused:triton+mix)
  GRAPHED=(--batch 256 --min-run-time 0.5 --cuda-graph
           --variants static,fused:triton,fused:triton+batched,fused:triton+mix)
  # The third run: training with every pass batched 1.30x static, with the kernel gradient in
  # the accumulator's layout 1.17x, against 1.13x for neither: in their place the mix pass,
  # and grad_x alone batched (0.58x the fused kernel's time on the 14x14 layers there).
  GRAPHED_TRAIN=(--batch 256 --min-run-time 0.5 --cuda-graph
                 --variants static,fused:triton,fused:triton+mix,fused:triton+batched-grad_x)
  SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  SANITIZE=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck
            --report-api-errors no --error-exitcode 1)
  MEMCHECK=(--backend cuda)
  PROFILE=(--device cuda --batch 256 --dtype bfloat16 --backend triton --model-batch 256)
  DYNAMIC=(--device cuda --batch 64 --amp bfloat16 --channels-last --min-run-time 0.1)
  KGRAD=(--device cuda --batch 256 --backend triton)
  TUNED=(--device cuda --batch 256 --backend triton)
  POINTWISE=(--device cuda --batch 256 --backend triton --chunk-mb 8,128 --acc-warps 4
             --modeled bench/results/gpu-model-stationary.json,bench/results/gpu-model-mix.json)
  PROFILE_ONE=(--layers s6.b1.expand)
fi
# The headline tables carry the static model's time per layer (condconv_kernels.triton.report,
# committed as bench/results/gpu-model.json) and the measured / modeled ratio.
BENCH=(--dtype bfloat16 --channels-last --modeled bench/results/gpu-model.json)
CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (dry run)')" 2>/dev/null)
SLUG=$(echo "$CARD" | grep -oi 'h[0-9]\{3\}' | head -n 1 | tr 'A-Z' 'a-z')
{
  echo "# GPU checks, $MODE call: ${CARD:-unknown card}"
  echo
  echo "Commit as bench/results/gpu-${SLUG:-<card>}-$MODE.md. $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), deadline $LIMIT s."
  echo
} >"$SUMMARY"

if [ "$MODE" = first ]; then
  step versions 20 versions
  background build 300 nice -n 5 bash -c build_extension
  background warm-triton 300 nice -n 15 "$PY" bench/warm_triton.py "${WARM[@]}"
  # The tests compile into a cache of their own: the kit carries the benchmarks' kernels only.
  step triton-tests 230 "${TEST_ENV[@]}" TRITON_CACHE_DIR="$TRITON_CACHE_DIR-tests" \
    CONDCONV_GPU_BACKENDS=triton,cpu CONDCONV_TRITON_AUTOTUNE=0 \
    $(pytest_cmd 10) --durations=12 tests/test_gpu.py -m "not huge" "${TRITON_TESTS[@]}"
  join build
  step install 30 install_extension
  # (the triton backend's cluster pass is tested here, where the extension is built: its
  # Triton kernels untuned, in the tests' cache)
  step cuda-tests 120 "${TEST_ENV[@]}" CONDCONV_GPU_BACKENDS=cuda,cpu \
    TRITON_CACHE_DIR="$TRITON_CACHE_DIR-tests" CONDCONV_TRITON_AUTOTUNE=0 \
    $(pytest_cmd) tests/test_gpu.py -m "not huge" "${CUDA_TESTS[@]}"
  # After the tests (which switch the kernels themselves), before any benchmark times them.
  probe_step
  join warm-triton
  # The autotuned launches (what every benchmark runs; the tests run with autotuning off)
  # against the reference on five of the model's (bias-free) layers: tuning, Triton's launch,
  # the replayed launches, then a replay on new inputs. A FAIL here means the benchmarks below
  # time wrong results.
  step tuned-check 70 "$PY" bench/tuned_check.py "${TUNED[@]}" \
    --out "$WORK/results/tuned-check.md"
  table "$WORK/results/tuned-check.md"
  # The experimental experts-stationary 1x1 kernel (Gluon; forward, grad_x, kernel gradients)
  # against the dense ones (tuned from the cache warm-triton filled) and the static layer, with
  # its modeled time and both routing gradients against a float64 sum (which of the two was
  # off on the 7x7 layers in the second run), the batched products, the mix on the tensor
  # cores and the kernel gradient in the accumulator's layout: early, so that the deadline
  # cannot cut it (and written layer by layer, so that its cap keeps the rows done).
  step pointwise 125 "$PY" bench/bench_pointwise.py "${POINTWISE[@]}" --skip "${HOPPER_SKIP:-}" \
    --out "$WORK/results/pointwise.md"
  table "$WORK/results/pointwise.md"
  # Inference captured in a CUDA graph (the device's time): static, fused triton, and fused
  # triton with its batched 1x1 forward, with the mix pass and, where the probe passed the
  # Hopper kernels, with the cluster pass (each off by default until measured), before the
  # layer table (the decisions these variants settle come first); eager inference last
  # (host-bound; the deadline cuts it first).
  step model-fwd-graph 60 "$PY" bench/bench_model.py "${DEV[@]}" "${GRAPHED[@]}" $(hopper_also) \
    --amp bfloat16 --channels-last --out "$WORK/results/model-b256-amp-cl-fwd-graph.md"
  table "$WORK/results/model-b256-amp-cl-fwd-graph.md"
  step layers-fwd 110 "$PY" bench/bench_layers.py "${DEV[@]}" "${LAYERS[@]}" "${BENCH[@]}" \
    "${GRAPH[@]}" --roofline --out "$WORK/results/layers-b256-bf16-cl-fwd.md"
  table "$WORK/results/layers-b256-bf16-cl-fwd.md"
  step model-fwd 90 "$PY" bench/bench_model.py "${DEV[@]}" "${MODEL_FWD[@]}" --amp bfloat16 \
    --channels-last --out "$WORK/results/model-b256-amp-cl-fwd.md"
  table "$WORK/results/model-b256-amp-cl-fwd.md"
  RESERVE=0
  pack() {
    local staged=$WORK/kit
    rm -rf "$staged" && mkdir -p "$staged/triton-cache"
    cp "$WORK"/build/lib/condconv_kernels/_C*.so "$WORK/build/stamp" "$staged/" 2>/dev/null &&
      strip --strip-debug "$staged"/_C*.so
    cp "$WORK/hopper.env" "$staged/" 2>/dev/null  # the probe's verdict, for the second call
    # The compiled kernels, their launchers and the autotune results; not the IR.
    (cd "$TRITON_CACHE_DIR" && find . -type f \( -name '*.json' -o -name '*.cubin' \
      -o -name '*.so' \) -print0 | tar cf - --null -T - | tar xf - -C "$staged/triton-cache")
    tar czf "$OUT/kit.tgz" -C "$staged" .
    echo "kit.tgz: $(du -k "$OUT/kit.tgz" | cut -f1) KiB, $(find "$staged" -type f | wc -l) files"
    if (($(du -k "$OUT/kit.tgz" | cut -f1) > 15 * 1024)); then  # over what comes back: no .so
      rm -f "$staged"/_C*.so && tar czf "$OUT/kit.tgz" -C "$staged" . &&
        echo "too large with the extension: kit.tgz without it, $(du -k "$OUT/kit.tgz" | cut -f1) KiB"
    fi
  }
  export -f pack
  step pack 25 pack
elif [ "$MODE" = second ]; then
  RESERVE=10  # no kit to pack here: the steps get the time
  step versions 15 versions
  step restore 30 restore || touch "$WORK/need-build"
  [ -e "$WORK/need-build" ] && step build 150 build_extension
  step install 30 install_extension
  probe_step
  # The benchmarks first: they need the kit's cache while it is fresh, and the deadline cuts
  # the last steps first. The training step captured in a CUDA graph (the device's time,
  # without the host's): static, fused triton, fused triton with the mix pass, with grad_x
  # batched and, where the probe passed the Hopper kernels, with the cluster pass (each off by
  # default until measured); it tunes the backward kernels the layer table then finds cached.
  step model-train-graph 100 "$PY" bench/bench_model.py "${DEV[@]}" "${GRAPHED_TRAIN[@]}" \
    $(hopper_also) --amp bfloat16 --channels-last --backward \
    --out "$WORK/results/model-b256-amp-cl-train-graph.md"
  table "$WORK/results/model-b256-amp-cl-train-graph.md"
  step layers-fwdbwd 80 "$PY" bench/bench_layers.py "${DEV[@]}" "${LAYERS[@]}" "${BENCH[@]}" \
    "${GRAPH[@]}" --backward --out "$WORK/results/layers-b256-bf16-cl-fwdbwd.md"
  table "$WORK/results/layers-b256-bf16-cl-fwdbwd.md"
  # Where the time goes: one 1x1 layer (host against device, the kernels, the host functions
  # of the fused call) and the whole model's kernels, inference and training (the profile
  # call adds four layers and the rest); then what the dense and depthwise kernels wait on
  # (Nsight Compute, as in the profile call, which has never fitted a 15-minute slot).
  step profile-model 60 "$PY" bench/gpu_profile.py "${PROFILE[@]}" "${PROFILE_ONE[@]}" \
    --out "$WORK/results/profile-model.md"
  report "$WORK/results/profile-model.md"
  TAIL_LINES=40 step ncu 70 ncu_layers
  # The memcheck of the cuda backend's kernels, then the eager training step last (host-bound;
  # measured three times before): the deadline cuts it first.
  step memcheck 60 "${SANITIZE[@]}" "$PY" bench/memcheck_cases.py "${MEMCHECK[@]}"
  step model-train 70 "$PY" bench/bench_model.py "${DEV[@]}" "${MODEL[@]}" --amp bfloat16 \
    --channels-last --backward --out "$WORK/results/model-b256-amp-cl-train.md"
  table "$WORK/results/model-b256-amp-cl-train.md"
else  # profile: where the time goes, and the >2^31-element tests' first failure in full
  step versions 15 versions
  step restore 30 restore || touch "$WORK/need-build"
  [ -e "$WORK/need-build" ] && step build 150 build_extension
  step install 30 install_extension
  probe_step
  step profile 110 "$PY" bench/gpu_profile.py "${PROFILE[@]}" \
    --out "$WORK/results/profile-b256-bf16-cl.md"
  report "$WORK/results/profile-b256-bf16-cl.md"
  # What the dense and depthwise kernels wait on: Nsight Compute's sections for each kernel of
  # the headline 1x1 layer and a 5x5 depthwise one (the whole report in log.txt).
  TAIL_LINES=40 step ncu 70 ncu_layers
  pack_results
  # DynamicConv2d and ODConv2d (the per-example scales) fused against their grouped-convolution
  # form; one configuration per kernel (no autotuning): the compiles fit the cap.
  step dynamic-fwd 50 env CONDCONV_TRITON_AUTOTUNE=0 "$PY" bench/bench_dynamic.py \
    "${DYNAMIC[@]}" --out "$WORK/results/dynamic-fwd.md"
  table "$WORK/results/dynamic-fwd.md"
  step dynamic-fwdbwd 80 env CONDCONV_TRITON_AUTOTUNE=0 "$PY" bench/bench_dynamic.py \
    "${DYNAMIC[@]}" --backward --out "$WORK/results/dynamic-fwdbwd.md"
  table "$WORK/results/dynamic-fwdbwd.md"
  # The dense kernel gradient with one gradient asked for at a time (measured in the second
  # run's first call; here to see what a kernel-gradient change did to each half).
  step kgrad 60 env CONDCONV_TRITON_AUTOTUNE=0 "$PY" bench/kgrad_ablation.py "${KGRAD[@]}" \
    --out "$WORK/results/kgrad-ablation.md"
  table "$WORK/results/kgrad-ablation.md"
  TAIL_LINES=60 step huge-tests 80 "${TEST_ENV[@]}" TRITON_CACHE_DIR="$TRITON_CACHE_DIR-tests" \
    CONDCONV_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -x --tb=short -rfE -p no:cacheprovider \
    tests/test_gpu.py -m huge
fi

echo "Total: $(($(now) - START)) s of a $LIMIT s deadline." >>"$SUMMARY"
echo
cat "$SUMMARY"
exit 0
