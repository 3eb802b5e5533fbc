#!/usr/bin/env bash
# Where kernels' warps wait (issue 10): one launch of each named kernel under ncu with the warp
# stall reasons and the pipes' busy shares, then analysis/stall_reasons.py's table. The tenth
# session found the attention kernels' integer overhead this way (docs/performance.md).
#
# Usage (on the GPU machine, from the repository root): stall_reasons.sh INSTALL_DIR OUT_DIR [KERNEL ...]
#   KERNEL   a regular expression of kernel names, one launch profiled each
#            (default: fwd_wg_kernel bwd_wg_kernel, the Hopper attention kernels)
#   SKIP=38  launches of each kernel left alone before the profiled one; the default is the
#            first warm launch at config F's shape (S 4096) in the attention bench, whose six
#            shapes each launch a kernel 12 times (2 warm-ups, 10 timed)
#   CMD      another program, run through bash -c (ncu follows child processes; default:
#            INSTALL_DIR/moelab_gpu_tests "[bench][attention]")
# Writes OUT_DIR/KERNEL_ncu.txt (ncu's output) and OUT_DIR/stalls.md (also printed). Exit status
# non-zero when a kernel was not profiled.
set -u
[ $# -ge 2 ] || { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
inst=$(readlink -f "$1")
mkdir -p "$2" && out=$(readlink -f "$2")
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || kernels=(fwd_wg_kernel bwd_wg_kernel)
if [ -n "${CMD:-}" ]; then prog=(bash -c "$CMD"); else prog=("$inst/moelab_gpu_tests" "[bench][attention]"); fi
export NCCL_NVLS_ENABLE=0
metrics=smsp__inst_executed.sum,smsp__cycles_active.avg
metrics+=,smsp__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
for p in alu fma xu; do metrics+=,smsp__inst_executed_pipe_$p.avg.pct_of_peak_sustained_active; done
for r in barrier branch_resolving dispatch_stall drain imc_miss lg_throttle long_scoreboard \
         math_pipe_throttle membar mio_throttle misc no_instruction not_selected selected \
         short_scoreboard sleeping tex_throttle wait; do
  metrics+=,smsp__average_warp_latency_issue_stalled_$r
done
files=()
rc=0
for k in "${kernels[@]}"; do
  f="$out/$(echo "$k" | tr -c 'A-Za-z0-9_\n' '_')_ncu.txt"
  timeout -k 10 300 setsid -w ncu --clock-control none --kernel-name "regex:$k" --launch-skip "${SKIP:-38}" \
    --launch-count 1 --metrics "$metrics" "${prog[@]}" > "$f" 2>&1
  if ! grep -q "smsp__inst_executed.sum" "$f"; then
    echo "stall_reasons.sh: no metrics for kernel '$k' (see $f)" >&2
    rc=1
  fi
  files+=("$f")
done
python3 "$here/analysis/stall_reasons.py" "${files[@]}" | tee "$out/stalls.md"
exit $rc
