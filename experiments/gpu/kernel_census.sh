#!/usr/bin/env bash
# A kernel census of moelab's bf16 training step (issue 10): every kernel the GPU runs in a
# step, timed alone by ncu, beside the step's wall time from `moelab bench --breakdown` in the
# same call. The sum of the kernels is what the step would take if the host were never in the
# way; the rest of the wall time is the GPU waiting for the host (launches, syncs).
#
# Usage (on the GPU machine, from the repository root): kernel_census.sh INSTALL_DIR OUT_DIR
#   CONFIGS="A D"   configs of experiments/bench/bench_configs.py (default A D E)
#   STEPS=4         ncu sees the bench's 3 warm-up steps and 1 timed one (--iters 1); the
#                   census divides by this
#   TORCH=1         also profile torch.compile on the same config (experiments/bench/torch_moe.py
#                   --profile 3, CFG_torch.txt) and set its kernel families beside moelab's
# Writes OUT_DIR/CFG_ncu.csv (ncu's raw rows), CFG_bench.txt and census.md (also printed).
set -u
[ $# -eq 2 ] || { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
inst=$(readlink -f "$1")
mkdir -p "$2" && out=$(readlink -f "$2")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CONFIGS=${CONFIGS:-"A D E"}
export NCCL_NVLS_ENABLE=0
lim() { local s=$1; shift; timeout -k 10 "$s" setsid -w "$@"; }
: > "$out/census.md"
for cfg in $CONFIGS; do
  args=$(python3 "$here/experiments/bench/bench_configs.py" moelab-args "$cfg")
  # shellcheck disable=SC2086
  lim 200 "$inst/moelab" bench $args --set model.dtype=bf16 --backend cuda --iters 20 --breakdown \
    > "$out/${cfg}_bench.txt" 2>&1
  # shellcheck disable=SC2086
  lim 300 ncu --clock-control none --metrics gpu__time_duration.sum --csv --page raw \
    --print-units base "$inst/moelab" bench $args --set model.dtype=bf16 --backend cuda --iters 1 \
    > "$out/${cfg}_ncu.csv" 2> "$out/${cfg}_ncu.err"
  echo "ncu $cfg rc=$?" >&2
  torch_args=()
  if [ "${TORCH:-0}" = 1 ]; then
    lim 300 python3 "$here/experiments/bench/torch_moe.py" --config "$cfg" --compile --iters 5 --warmup 3 \
      --profile 3 > "$out/${cfg}_torch.txt" 2>&1
    echo "torch $cfg rc=$?" >&2
    torch_args=(--torch "$out/${cfg}_torch.txt")
  fi
  python3 "$here/analysis/kernel_census.py" --name "$cfg" --steps "${STEPS:-4}" \
    --bench "$out/${cfg}_bench.txt" "${torch_args[@]}" "$out/${cfg}_ncu.csv" >> "$out/census.md"
done
cat "$out/census.md"
