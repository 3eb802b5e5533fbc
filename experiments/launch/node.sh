#!/usr/bin/env bash
# moelab on every GPU of one node, one process driving all of them (one thread per GPU, NCCL
# initialised in-process): the simplest launch, no MPI, no Slurm.
#
#   experiments/launch/node.sh CONFIG.ini EP DP [moelab train options...]
#   DRY_RUN=1 experiments/launch/node.sh ...   prints the command and its checks, runs nothing
#
# EP x DP must equal the GPUs to use (CUDA_VISIBLE_DEVICES limits them). Example, 8 H200s:
#   experiments/launch/node.sh experiments/configs/brown_small.ini 8 1 --out runs/ep8.h5
#   experiments/launch/node.sh experiments/configs/brown_small.ini 4 2 --out runs/ep4dp2.h5
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,10p' "$0"; exit 2; }
config=$1 ep=$2 dp=$3; shift 3
moelab=${MOELAB:-$(dirname "$0")/../../build/moelab}
export NCCL_NVLS_ENABLE=0   # NVLink multicast stays off (the GPU machines here require it)
cmd=("$moelab" train --config "$config" --backend cuda --set "parallel.ep=$ep" --set "parallel.dp=$dp" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "would run (world = $((ep * dp)) ranks, one thread per GPU): NCCL_NVLS_ENABLE=0 ${cmd[*]}"
  "$moelab" config --config "$config" --set "parallel.ep=$ep" --set "parallel.dp=$dp" >/dev/null
  echo "config ok: parallel.ep=$ep parallel.dp=$dp"
  exit 0
fi
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
[ "$gpus" -ge $((ep * dp)) ] || { echo "node.sh: ep x dp = $((ep * dp)) ranks but $gpus GPUs visible" >&2; exit 2; }
exec "${cmd[@]}"
