#!/usr/bin/env bash
# What routing costs in speed (issue 13 part 5), on one H200, in one device call of about 6-7
# minutes: experiments/configs/gpu/routing_speed.ini, 15 runs of 600 steps in one process: real
# routing at aux alpha 0 / 0.01 / 0.1 x capacity factor dropless / 1.0 / 1.25, router.force_balance
# at the three capacity factors, aux-loss-free bias, expert choice and Sinkhorn. Every step's time
# (/train/tokens_per_sec) and router statistics (/router/layer_XX) are logged. Run from the
# repository root on the GPU machine:
#
#   experiments/gpu/routing_speed_study.sh INSTALL OUT
#
# INSTALL  a relocatable install with CUDA (a folder holding moelab, or its .tgz)
# OUT      gets OUT/routing_speed/run_NAME.h5, sweep.json, train.txt, summary.txt
# Corpus:  data/gpu_corpus.tgz (`make data-gpu`; carry it), or CORPUS=FILE.tgz|DIR.
# STEPS (default 600) changes the run length. The analysis, afterwards, here:
#   /usr/bin/python3 analysis/routing_speed.py OUT/routing_speed --out OUT/routing_speed_report
set -u
[ $# -eq 2 ] || { sed -n '2,16p' "$0"; exit 2; }
inst=$1; mkdir -p "$2"; out=$(readlink -f "$2")
# shellcheck source=experiments/gpu/unpack_inputs.sh
. "$(dirname "${BASH_SOURCE[0]}")/unpack_inputs.sh"
dir="$out/routing_speed"; mkdir -p "$dir"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$dir/summary.txt"
start=$SECONDS
timeout -k 10 ${RUN_TIMEOUT_S:-560} "$M" train --config experiments/configs/gpu/routing_speed.ini \
  --set train.steps="${STEPS:-600}" --set data.path="$data" --set log.out="$dir/run.h5" --overwrite \
  > "$dir/train.txt" 2>&1
rc=$?
echo "rc=$rc in $(( SECONDS - start )) s" | tee -a "$dir/summary.txt"
grep -E "^moelab: sweep run .* -> |^summary" "$dir/train.txt" | tee -a "$dir/summary.txt"
exit $rc
