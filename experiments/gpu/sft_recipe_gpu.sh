#!/usr/bin/env bash
# The Brown recipe (experiments/recipes/brown_pos) at GPU size with a real tokenizer (GPT-2's
# BPE, 50257 ids): pretraining on genres a-j -> continued pretraining on k-r -> SFT on the
# part-of-speech questions (all-token and answer-only loss), 3 seeds, evaluated on the same
# held-out test words as the CPU recipe. Written for one H200; about 6-8 minutes (estimate from
# docs/performance.md's config A: 4 x d512 at 16k tokens ~ 35 ms a step; not measured yet).
#
# Usage (on the GPU machine, from the repository root):
#   experiments/gpu/sft_recipe_gpu.sh INSTALL OUT
# INSTALL: a relocatable install of this branch (cmake --install BUILD --prefix DIR, CUDA build;
#   a .tgz of it is unpacked first). Needs data/brown and data/tokenizers/gpt2 (`make data`).
# OUT: gets the logs, the evaluations (JSON), the run logs (HDF5) and summary.txt; the
#   checkpoints (about 1 GB each) stay in a scratch folder that is removed at the end.
# Then, on any machine with /usr/bin/python3 (numpy, scipy, h5py, matplotlib):
#   /usr/bin/python3 experiments/recipes/brown_pos/analyze.py OUT --docs docs/results/recipe_brown_pos_gpu
# Environment: PARTS (default "tests recipe": the GPU op tests of the packed-record kernels and
# the rest of the op test, then the recipe; either alone fits one 10-minute device call), SEEDS
# (default "1 2 3"), PRE_STEPS / CPT_STEPS / SFT_STEPS (600 / 300 / 400), JOBS (runs at a time on
# the one GPU, default 3: these small runs are host-bound).
set -euo pipefail
PARTS=${PARTS:-"tests recipe"}
want() { [[ " $PARTS " == *" $1 "* ]]; }
inst=$1
out=$(mkdir -p "$2" && cd "$2" && pwd)
if [[ "$inst" == *.tgz || "$inst" == *.tar.gz ]]; then
  dir=$(mktemp -d)
  tar xzf "$inst" -C "$dir"
  inst=$(dirname "$(find "$dir" -name moelab -type f -perm -u+x | head -1)")
fi
inst=$(cd "$inst" && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
[ -d data/brown ] && [ -f data/tokenizers/gpt2/encoder.json ] ||
  { echo "sft_recipe_gpu.sh: needs data/brown and data/tokenizers/gpt2 (make data)" >&2; exit 2; }
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$out/summary.txt"

if want tests; then
  # The packed-record kernels (segment mask in every flash kernel, RoPE positions, ignored
  # targets) against the CPU in f64, then the whole op test (nothing else may have moved).
  for spec in "150:[sft]" "360:[gpu]"; do
    limit=${spec%%:*} filter=${spec#*:}
    echo "== moelab_gpu_tests $filter" | tee -a "$out/summary.txt"
    timeout -k 10 "$limit" "$inst/moelab_gpu_tests" "$filter" > "$out/gpu_tests_${filter//[^a-z]/}.txt" 2>&1 || true
    grep -E "FAILED|failed|passed|NMSE.*>" "$out/gpu_tests_${filter//[^a-z]/}.txt" | tail -15 | tee -a "$out/summary.txt"
  done
fi
want recipe || exit 0

# The model (every stage): 4 blocks of width 512, 8 heads, 8 experts of width 1024, top-2, bf16
# with fp32 masters, GPT-2's tokenizer; 32 sequences of 256 tokens a step.
MODEL="--set model.layers=4 --set model.d_model=512 --set model.heads=8 --set model.experts=8 --set model.top_k=2
       --set model.d_expert=1024 --set model.vocab=50257 --set model.dtype=bf16
       --set data.tokenizer=data/tokenizers/gpt2/encoder.json"
export MOELAB="$inst/moelab" JOBS=${JOBS:-3} BACKEND=cuda CKPT_ROOT="$scratch" PY=${PY:-python3}
export LM_STAGES="pretrain cpt"   # the domain-shift losses; SFT's forgetting is measured on the CPU
export SEEDS=${SEEDS:-"1 2 3"} PRE_STEPS=${PRE_STEPS:-600} CPT_STEPS=${CPT_STEPS:-300} SFT_STEPS=${SFT_STEPS:-400}
export SETS="--backend cuda $(echo $MODEL) --set train.batch=32 --set train.seq=256 --set log.flush_every=50"
export PRE_SETS="--set train.lr=1e-3 --set train.warmup=50 --set log.eval_every=100"
export CPT_SETS="--set train.lr=3e-4 --set train.warmup=20 --set log.eval_every=50"
export SFT_SETS="--set train.lr=3e-4 --set train.warmup=20 --set log.eval_every=50 --set log.eval_batches=16"
export EVAL_SETS="--set train.seq=256 --set train.batch=16"
# More fine-tuning records than the CPU recipe (100k word questions); the test words are drawn
# exactly as there (--test-sentences 150, seed 12), so the two scores are on the same words.
export TASK_ARGS="--train-records 100000"
export STAGES="tasks pretrain cpt sft eval"
start=$SECONDS
bash experiments/recipes/brown_pos/run.sh "$out" 2>&1 | tee -a "$out/summary.txt"
for s in $SEEDS; do
  for st in pretrain cpt sft_all sft_response; do
    echo "seed $s $st: $(grep -h '^summary' "$out/s$s/$st.log" 2>/dev/null | cut -c1-160)" | tee -a "$out/summary.txt"
    grep -h '^eval:' "$out/s$s/eval_$st.log" 2>/dev/null | sed "s/^/  /" | tee -a "$out/summary.txt"
  done
done
# The fine-tuning records (15 MB) are not needed by analyze.py and make_tasks.py rebuilds them
# exactly: leave them out of what comes back.
rm -f "$out/tasks/sft_train.jsonl"
echo "sft_recipe_gpu.sh: done in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
