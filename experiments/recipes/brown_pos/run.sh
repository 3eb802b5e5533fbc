#!/usr/bin/env bash
# The Brown recipe (issue 12): the training stages of the reference recipes at a size a 2-core
# CPU runs in minutes, byte-level, over several seeds.
#
#   1. pretraining          Brown genres a-j                      pretrain.ini  (800 steps)
#   2. continued pretraining Brown genres k-r, lr / 3, from 1      cpt.ini       (300 steps)
#   3. fine-tuning (SFT)     part-of-speech questions, from 2      sft.ini       (600 steps)
#                            twice: train.loss_on = all and = response (answer-only)
#   4. evaluation            every stage's checkpoint on held-out sentences (moelab eval),
#                            validation loss on both genre sets, greedy samples
#   5. report                analyze.py: tables with 95% intervals over the seeds, plots
#
# usage: experiments/recipes/brown_pos/run.sh [OUT]          (default runs/recipe_brown_pos)
# environment: MOELAB (binary, default build/moelab), SEEDS (default "1 2 3"), JOBS (runs at a
#   time, default 2: every run is single-threaded), PY (default /usr/bin/python3, which has
#   numpy, scipy, h5py and matplotlib), STAGES (default "tasks pretrain cpt sft eval report"),
#   DOCS (a folder: the report's figures and tables are also copied there).
# For other sizes (experiments/gpu/sft_recipe_gpu.sh): PRE_STEPS, CPT_STEPS, SFT_STEPS (default
#   800, 300, 600), SETS (--set ... and --backend for every train AND eval command: the model
#   keys must be the same in every stage), PRE_SETS, CPT_SETS, SFT_SETS (one stage's train
#   command), EVAL_SETS (the eval commands: train.seq and train.batch of the task evaluation,
#   default --set train.seq=128 --set train.batch=16), TASK_ARGS (make_tasks.py options),
#   CKPT_ROOT (checkpoints go to CKPT_ROOT/s<seed>/<stage>; default beside the logs), BACKEND
#   (--backend of the eval commands; the train commands take theirs from SETS), LM_STAGES (the
#   stages whose language-model validation loss is measured on both genre sets; default all).
# Needs the Brown corpus (`make data`). Every command's output goes to OUT/s<seed>/<stage>.log.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../../.." && pwd)
cd "$root"
OUT=${1:-runs/recipe_brown_pos}
MOELAB=${MOELAB:-build/moelab}
SEEDS=${SEEDS:-"1 2 3"}
JOBS=${JOBS:-2}
PY=${PY:-/usr/bin/python3}
STAGES=${STAGES:-"tasks pretrain cpt sft eval report"}
export OMP_NUM_THREADS=1   # one thread per run; JOBS runs side by side (README, "Seeds")
[ -x "$MOELAB" ] || { echo "run.sh: no moelab binary at $MOELAB (make build, or set MOELAB)" >&2; exit 2; }
[ -d data/brown ] || { echo "run.sh: no Brown corpus in data/brown (make data)" >&2; exit 2; }
mkdir -p "$OUT"
T="$OUT/tasks"
PRE_STEPS=${PRE_STEPS:-800} CPT_STEPS=${CPT_STEPS:-300} SFT_STEPS=${SFT_STEPS:-600}
SETS=${SETS:-} PRE_SETS=${PRE_SETS:-} CPT_SETS=${CPT_SETS:-} SFT_SETS=${SFT_SETS:-} TASK_ARGS=${TASK_ARGS:-}
EVAL_SETS=${EVAL_SETS:-"--set train.seq=128 --set train.batch=16"}
CKPT_ROOT=${CKPT_ROOT:-}
LM_STAGES=${LM_STAGES:-"pretrain cpt sft_all sft_response"}

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
# Runs the commands on stdin (one per line), JOBS at a time; fails if any fails.
pool() {
  local start=$SECONDS
  if ! xargs -d '\n' -P "$JOBS" -I{} bash -c '{}'; then
    echo "run.sh: a run failed (see the logs under $OUT)" >&2
    exit 1
  fi
  echo "run.sh: $1 done in $((SECONDS - start)) s"
}
# The checkpoint folder of seed $1's stage $2 (the --set for its run) and its last checkpoint.
ckdir() { if [ -n "$CKPT_ROOT" ]; then echo "$CKPT_ROOT/s$1/$2"; else echo "$OUT/s$1/$2_checkpoints"; fi; }
ckset() { echo "--set log.checkpoint_dir=$(ckdir "$1" "$2")"; }
ck() { printf '%s/step_%06d.ckpt' "$(ckdir "$1" "$2")" "$3"; }

if has_stage tasks; then
  "$PY" "$here/make_tasks.py" --brown data/brown --out "$T" $TASK_ARGS | tee "$OUT/tasks.log"
fi

if has_stage pretrain; then
  for s in $SEEDS; do
    mkdir -p "$OUT/s$s"
    echo "$MOELAB train --config $here/pretrain.ini --set train.seed=$s --set train.steps=$PRE_STEPS --set log.checkpoint_every=$PRE_STEPS $(ckset "$s" pretrain) $SETS $PRE_SETS --out $OUT/s$s/pretrain.h5 --overwrite > $OUT/s$s/pretrain.log 2>&1"
  done | pool "pretraining (genres a-j)"
fi

if has_stage cpt; then
  for s in $SEEDS; do
    echo "$MOELAB train --config $here/cpt.ini --set train.seed=$s --set train.steps=$CPT_STEPS --set log.checkpoint_every=$CPT_STEPS --set train.init_from=$(ck "$s" pretrain $PRE_STEPS) $(ckset "$s" cpt) $SETS $CPT_SETS --out $OUT/s$s/cpt.h5 --overwrite > $OUT/s$s/cpt.log 2>&1"
  done | pool "continued pretraining (genres k-r)"
fi

if has_stage sft; then
  for s in $SEEDS; do
    for on in all response; do
      echo "$MOELAB train --config $here/sft.ini --set train.seed=$s --set train.steps=$SFT_STEPS --set log.checkpoint_every=$SFT_STEPS --set train.loss_on=$on --set train.init_from=$(ck "$s" cpt $CPT_STEPS) --set data.path=$T/sft_train.jsonl --set data.val_path=$T/sft_dev.jsonl $(ckset "$s" sft_$on) $SETS $SFT_SETS --out $OUT/s$s/sft_$on.h5 --overwrite > $OUT/s$s/sft_$on.log 2>&1"
    done
  done | pool "fine-tuning (loss on all tokens, and answer-only)"
fi

if has_stage eval; then
  for s in $SEEDS; do
    d="$OUT/s$s"
    declare -A CK=([pretrain]="$(ck "$s" pretrain $PRE_STEPS)" [cpt]="$(ck "$s" cpt $CPT_STEPS)"
                   [sft_all]="$(ck "$s" sft_all $SFT_STEPS)" [sft_response]="$(ck "$s" sft_response $SFT_STEPS)")
    for stage in pretrain cpt sft_all sft_response; do
      # The task: teacher-forced accuracy and exact match on the held-out test words (the
      # checkpoints of stages 1-2 read the records with the same defaults: prompt_response,
      # template {content}); 8 greedy samples.
      echo "$MOELAB eval --checkpoint ${CK[$stage]} --data $T/test.jsonl --set data.format=prompt_response --set data.chat_template={content} --set data.pack=true $EVAL_SETS ${BACKEND:+--backend $BACKEND} --json $d/eval_$stage.json --per-record $d/eval_${stage}_records.jsonl --samples 8 > $d/eval_$stage.log 2>&1"
      # Language-model validation loss on both genre sets (forgetting and the domain shift).
      [[ " $LM_STAGES " == *" $stage "* ]] || continue
      for g in a-j k-r; do
        echo "$MOELAB eval --checkpoint ${CK[$stage]} --set data.source=brown --set data.path=data/brown --set data.genres=$g --set train.loss_on=all $EVAL_SETS ${BACKEND:+--backend $BACKEND} --set log.eval_batches=8 --json $d/lm_${stage}_$g.json > $d/lm_${stage}_$g.log 2>&1"
      done
    done
  done | pool "evaluation"
fi

if has_stage report; then
  "$PY" "$here/analyze.py" "$OUT" ${DOCS:+--docs "$DOCS"}
fi
