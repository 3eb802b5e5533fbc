#!/usr/bin/env bash
# Issue 10: moelab's bf16 training step against PyTorch (eager and torch.compile) on the same
# model, in the same call, on one GPU; plus the MoE layer alone and the dense bf16 GEMM peak.
#
# Usage (on the GPU machine, from anywhere): compare.sh INSTALL_DIR OUT_DIR
#   INSTALL_DIR  holds the moelab binary (INSTALL_DIR/moelab, built with CUDA)
#   OUT_DIR      gets raw/NAME.txt (every run's whole output), raw/rc.txt (exit statuses) and
#                summary.md (the tables, also printed at the end)
# The configs are the table of bench_configs.py (read by both sides). Environment knobs:
#   CONFIGS="A B ..."   model configs to run (default: all, A B C D E F)
#   MOE_SHAPES="fine mixtral"  MoE-layer shapes (default: both)
#   PARTS="gemm moelab eager compile moe moe-compile"  what runs (default: all but moe-compile)
#   ITERS=20 WARMUP=5   timed and warm-up steps of torch
#   MOELAB_WARMUP=30    moelab bench's untimed steps (--warmup): in its first steps the routing
#                       gives cuBLAS new expert shapes, whose lookups cost host time (config E:
#                       38-46 ms a step after 3 warm-up steps, 35 after 30; docs/performance.md)
#   T_MOELAB=300 T_EAGER=240 T_COMPILE=480 T_MOE=240 T_GEMM=120   per-run time limits, s
#   BUDGET_S=0          if > 0: the whole call's budget; a run gets at most what is left
#                       (minus 20 s for the report) and is skipped under 30 s left
#   PACK=1              put raw/ into raw.tgz (few files to copy back); the report reads either
#   PYTHON=python3      the Python that has torch
#   SDPA=default        torch attention kernel: default (PyTorch's choice) | flash | cudnn | efficient
#   MOELAB_MOE_LAYER=0  skip `moelab bench moe-layer`
#   PROFILE=N           the torch.compile runs profile N more steps (torch_moe.py --profile): each
#                       kernel's time and the sum by family, in raw/torch_compile_CFG.txt; the
#                       counterpart of experiments/gpu/kernel_census.sh
# Several calls (e.g. CONFIGS="A B", then "C D", ...) can write to different OUT_DIRs; then
#   python3 experiments/bench/bench_configs.py report OUT1 OUT2 ...   merges them (no torch needed).
set -u
if [ $# -ne 2 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
inst=$(readlink -f "$1")
mkdir -p "$2" || exit 2
out=$(readlink -f "$2")
raw="$out/raw"
mkdir -p "$raw"

PY=${PYTHON:-python3}
CFG=("$PY" "$here/bench_configs.py")
CONFIGS=${CONFIGS:-$("${CFG[@]}" names)}
MOE_SHAPES=${MOE_SHAPES:-$("${CFG[@]}" moe-names)}
PARTS=${PARTS:-"gemm moelab eager compile moe"}
ITERS=${ITERS:-20}
WARMUP=${WARMUP:-5}
T_MOELAB=${T_MOELAB:-300}
T_EAGER=${T_EAGER:-240}
T_COMPILE=${T_COMPILE:-480}
T_MOE=${T_MOE:-240}
T_GEMM=${T_GEMM:-120}
BUDGET_S=${BUDGET_S:-0}
SDPA=${SDPA:-default}

# NVLink multicast must stay off on these machines (one GPU here, but keep it set everywhere).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1

want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# run NAME LIMIT_S COMMAND...: the command in its own session (a hung run dies with its process
# group), its output in raw/NAME.txt, its exit status appended to raw/rc.txt.
run() {
  local name=$1 limit=$2
  shift 2
  if [ "$BUDGET_S" -gt 0 ]; then
    local left=$((BUDGET_S - SECONDS - 20))
    if [ "$left" -lt 30 ]; then
      echo "$name rc=skipped" >> "$raw/rc.txt"
      echo "== $name: skipped (budget: ${left} s left)" >&2
      return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "== $name (limit ${limit} s): $*" >&2
  local t0=$SECONDS
  timeout -k 10 "$limit" setsid -w "$@" > "$raw/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc" >> "$raw/rc.txt"
  local last
  last=$(grep -E '^\{|^base ' "$raw/$name.txt" | tail -1)
  [ -n "$last" ] || last=$(tail -1 "$raw/$name.txt")
  echo "   rc=$rc, $((SECONDS - t0)) s: ${last:0:200}" >&2
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  echo "moelab: $inst/moelab"
  echo "CONFIGS=$CONFIGS MOE_SHAPES=$MOE_SHAPES PARTS=$PARTS ITERS=$ITERS WARMUP=$WARMUP SDPA=$SDPA"
} > "$raw/env.txt"
cat "$raw/env.txt" >&2

TM=("$PY" "$here/torch_moe.py" --iters "$ITERS" --warmup "$WARMUP")

if want gemm; then
  run gemm_peak "$T_GEMM" "$PY" "$here/torch_moe.py" --gemm-peak --iters "$ITERS"
fi

for c in $CONFIGS; do
  if want moelab; then
    # shellcheck disable=SC2046  # the --set words are meant to split
    run "moelab_$c" "$T_MOELAB" "$inst/moelab" bench --backend cuda $("${CFG[@]}" moelab-args "$c") \
      --set model.dtype=bf16 --iters "$ITERS" --warmup "${MOELAB_WARMUP:-30}" --breakdown
  fi
  want eager && run "torch_eager_$c" "$T_EAGER" "${TM[@]}" --config "$c" --sdpa-backend "$SDPA"
  want compile && run "torch_compile_$c" "$T_COMPILE" "${TM[@]}" --config "$c" --sdpa-backend "$SDPA" --compile \
    --profile "${PROFILE:-0}"
done

for s in $MOE_SHAPES; do
  want moe && run "moe_torch_eager_$s" "$T_MOE" "${TM[@]}" --moe-layer "$s"
  want moe-compile && run "moe_torch_compile_$s" "$T_MOE" "${TM[@]}" --moe-layer "$s" --compile
  # moelab's MoE layer alone (`moelab bench moe-layer`; MOELAB_MOE_LAYER=0 skips it)
  if want moe && [ "${MOELAB_MOE_LAYER:-1}" = 1 ]; then
    # shellcheck disable=SC2046
    run "moe_moelab_$s" "$T_MOE" "$inst/moelab" bench moe-layer --backend cuda \
      $("${CFG[@]}" moe-moelab-args "$s") --set model.dtype=bf16 --iters "$ITERS" --warmup "${MOELAB_WARMUP:-30}" --breakdown
  fi
done

if [ "${PACK:-0}" = 1 ]; then
  tar czf "$out/raw.tgz" -C "$out" raw && rm -rf "$raw"
fi
"${CFG[@]}" report "$out" | tee "$out/summary.md"
