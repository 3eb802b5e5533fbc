#!/usr/bin/env bash
# The seeded studies at GPU scale (issue 13 part 4) on one H200: experiments/configs/gpu/
# seeded_gpu.ini (7 grid points: the baseline and one contrast per claim), one or more seeds per
# call (three calls of one seed each lose at most one seed when a call fails; "1,2" then "3" fits
# the study into two calls). Run from the repository root on the GPU machine:
#
#   experiments/gpu/seeded_gpu_studies.sh INSTALL OUT SEEDS      # SEEDS = 1, 2, 3 or a list "1,2"

#
# INSTALL  a relocatable install (cmake --install, with CUDA): a folder holding moelab, or its
#          .tgz (unpacked into a temporary folder)
# OUT      where the logs go: OUT/seeded_gpu/run_POINT_seed=SEED.h5, sweep.json, train.txt,
#          steps.txt (the calibration)
# Corpus:  data/gpu_corpus.tgz (`make data-gpu`; carry it), or CORPUS=FILE.tgz|DIR.
# Steps:   the first call (SEED 1) measures the baseline's step time in a 60-step run and picks
#          STEPS so that the runs of the call take about BUDGET_S seconds (default 390), a multiple of 100
#          in [500, 4000]; it prints "STEPS=N" and writes OUT/seeded_gpu/steps.txt. Calls for the
#          other seeds MUST pass that value: STEPS=N experiments/gpu/seeded_gpu_studies.sh ...
#          (paired seeds need the same run). Evaluation every STEPS/8 steps (16 batches of
#          32 x 512 held-out bytes), warm-up STEPS/20.
# Afterwards, here: experiments/gpu/seeded_gpu_report.sh OUT1 OUT2 OUT3 (tables and plots).
set -u
[ $# -eq 3 ] || { sed -n '2,22p' "$0"; exit 2; }
inst=$1; mkdir -p "$2"; out=$(readlink -f "$2"); seed=$3
case $seed in 1|2|3|1,2|2,3|1,2,3) ;; *) echo "SEEDS must be 1, 2, 3 or a list such as 1,2" >&2; exit 2 ;; esac
nseeds=$(echo "$seed" | tr ',' '\n' | wc -l)
# shellcheck source=experiments/gpu/unpack_inputs.sh
. "$(dirname "${BASH_SOURCE[0]}")/unpack_inputs.sh"
dir="$out/seeded_gpu"; mkdir -p "$dir"
ini=experiments/configs/gpu/seeded_gpu.ini
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$dir/gpu.txt"
train_bytes=13490576   # make_gpu_corpus.py: plain-text bytes of the training files (cs*/c[a-r]*)

steps=${STEPS:-auto}
if [ "$steps" = auto ]; then
  case $seed in 1*) ;; *) echo "STEPS=auto only when the seeds start with 1; pass the STEPS the first call printed (OUT/seeded_gpu/steps.txt)" >&2; exit 2 ;; esac
  # 60 steps of the baseline (the preset without its sweep), no evaluation: the median step
  # time of steps 21-60 from the log's /train/tokens_per_sec (else from the progress lines).
  timeout -k 10 120 "$M" train --config "$ini" --set train.seed=1 --set sweep.variant= --set sweep.baseline= \
    --set train.steps=60 --set train.warmup=5 --set log.every=1 --set log.eval_every=0 --set data.path="$data" \
    --out "$work/calib.h5" --overwrite > "$dir/calibration.txt" 2>&1 || { echo "calibration run failed:"; tail -5 "$dir/calibration.txt"; exit 1; }
  ms=$(python3 -c "
import h5py, numpy as np
t = h5py.File('$work/calib.h5', 'r')['train/tokens_per_sec'][20:60]
print(round(float(np.median(16384.0 / t)) * 1000, 2))" 2>/dev/null) ||
  ms=$(grep -oE '[0-9]+ tok/s' "$dir/calibration.txt" | sed -n '21,60p' | awk '{print 16384000 / $1}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  budget=${BUDGET_S:-390}
  # 7 runs per seed; per run about 8 s besides the steps (start-up, corpus parse, 8 evaluations).
  steps=$(awk -v ms="$ms" -v b="$budget" -v n="$((7 * nseeds))" 'BEGIN { s = int((b - n * 8) / n / (ms / 1000) / 100) * 100;
    if (s < 500) s = 500; if (s > 4000) s = 4000; print s }')
  echo "calibration: median step ${ms} ms (steps 21-60 of the baseline) -> STEPS=$steps for a budget of ${budget} s" | tee "$dir/steps.txt"
fi
echo "STEPS=$steps" | tee -a "$dir/steps.txt"
eval_every=$(( steps / 8 )); warmup=$(( steps / 20 ))
awk -v s="$steps" -v b="$train_bytes" 'BEGIN { printf "each run: %d steps x 16384 tokens = %.1fM tokens = %.2f epochs of the %.1f MB training text\n", s, s * 16384 / 1e6, s * 16384 / b, b / 1e6 }' | tee -a "$dir/steps.txt"

start=$SECONDS
timeout -k 10 ${RUN_TIMEOUT_S:-540} "$M" train --config "$ini" --set train.seeds="$seed" --set train.steps="$steps" \
  --set train.warmup="$warmup" --set log.eval_every="$eval_every" --set data.path="$data" \
  --set log.out="$dir/run.h5" --overwrite > "$dir/train_seed${seed//,/_}.txt" 2>&1
rc=$?
echo "seed $seed: rc=$rc in $(( SECONDS - start )) s" | tee -a "$dir/steps.txt"
grep -E "^moelab: sweep run|^summary" "$dir/train_seed${seed//,/_}.txt" | tee -a "$dir/steps.txt"
exit $rc
