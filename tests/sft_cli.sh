#!/usr/bin/env bash
# moelab CLI: the training stages (issue 12): SFT records (bad records stop with FILE:LINE or are
# skipped and counted), train.init_from (refusal of another model names the key), moelab eval
# (validation loss; task scores as JSON; refusals), data.genres. Usage: sft_cli.sh MOELAB
set -u
moelab=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0; passes=0
check() {  # check NAME WANT_RC PATTERN ARGS...: exit code and PATTERN (grep -E) in the output
  local name=$1 want=$2 pattern=$3; shift 3
  local out rc
  out=$("$moelab" "$@" 2>&1); rc=$?
  if [ $rc -eq "$want" ] && grep -qE -- "$pattern" <<<"$out"; then passes=$((passes + 1)); else
    echo "FAIL: $name (exit $rc, want $want): expected /$pattern/ in:"; echo "$out" | tail -6; fails=$((fails + 1)); fi
}

for i in $(seq 1 40); do echo "{\"prompt\": \"q$((i % 7))=\", \"response\": \"$((i % 5))\\n\"}"; done > "$tmp/sft.jsonl"
cp "$tmp/sft.jsonl" "$tmp/bad.jsonl"
echo '{"prompt": "unterminated' >> "$tmp/bad.jsonl"
echo '{"response": "x"}' >> "$tmp/bad.jsonl"
cat "$(dirname "${BASH_SOURCE[0]}")/tiny_model.ini" > "$tmp/tiny.ini"
cat >> "$tmp/tiny.ini" <<INI
[train]
steps = 3
batch = 2
seq = 16
[log]
eval_every = 3
eval_batches = 2
INI
common=(--config "$tmp/tiny.ini" --set data.source=jsonl --set train.loss_on=response)

check "bad record stops the run naming its line" 2 "bad\.jsonl:41: invalid JSON" \
  train "${common[@]}" --set data.path="$tmp/bad.jsonl" --out "$tmp/a.h5"
check "skip counts bad records" 0 "skipped 2 bad record" \
  train "${common[@]}" --set data.path="$tmp/bad.jsonl" --set data.bad_records=skip --out "$tmp/b.h5"
check "skip names their lines" 0 "bad\.jsonl:42: missing field \"prompt\"" \
  train "${common[@]}" --set data.path="$tmp/bad.jsonl" --set data.bad_records=skip --out "$tmp/b.h5" --overwrite
check "answer-only needs records" 2 "train\.loss_on = response needs data\.source = jsonl" \
  train --config "$tmp/tiny.ini" --set train.loss_on=response --out "$tmp/c.h5"
check "bad chat template" 2 "data\.chat_template.*exactly once" config --set data.chat_template=none
check "bad genres" 2 "data\.genres.*'z' is not a Brown genre" config --set data.source=brown --set data.genres=z

# A source run with a checkpoint, then init_from: fine, and refused for another model.
check "sft run with a checkpoint" 0 "summary: 3 steps" \
  train "${common[@]}" --set data.path="$tmp/sft.jsonl" --set log.checkpoint_every=3 --out "$tmp/s.h5"
ck="$tmp/s_checkpoints/step_000003.ckpt"
check "init_from starts a new run and evaluates at step 0" 0 "step     0/3 \| val .*init_from" \
  train "${common[@]}" --set data.path="$tmp/sft.jsonl" --set train.init_from="$ck" --out "$tmp/i.h5"
check "init_from of another model names the key" 2 "model\.d_expert: checkpoint 16, this run 32" \
  train "${common[@]}" --set data.path="$tmp/sft.jsonl" --set train.init_from="$ck" --set model.d_expert=32 --out "$tmp/j.h5"
check "init_from of a missing file" 2 "train\.init_from = .*no such checkpoint" \
  train "${common[@]}" --set data.path="$tmp/sft.jsonl" --set train.init_from="$tmp/none.ckpt" --out "$tmp/k.h5"

check "eval: validation loss" 0 "eval: validation loss [0-9.]+ nats per token" eval --checkpoint "$ck"
check "eval: task scores" 0 "eval: 40 records .* token accuracy .* exact match" \
  eval --checkpoint "$ck" --data "$tmp/sft.jsonl" --json "$tmp/e.json" --per-record "$tmp/r.jsonl" --samples 2
if grep -q '"exact_match"' "$tmp/e.json" && [ "$(wc -l < "$tmp/r.jsonl")" -eq 40 ]; then passes=$((passes + 1)); else
  echo "FAIL: eval --json / --per-record files"; fails=$((fails + 1)); fi
check "eval: a bad record in --data names its line" 2 "--data = .*bad\.jsonl:41" eval --checkpoint "$ck" --data "$tmp/bad.jsonl"
check "eval: --samples without --data" 2 "need --data" eval --checkpoint "$ck" --samples 2
check "eval: missing checkpoint" 2 "no such checkpoint" eval --checkpoint "$tmp/none.ckpt"

echo "sft_cli: $passes passed, $fails failed"
[ $fails -eq 0 ]
