#!/usr/bin/env bash
# moelab CLI contract (DESIGN.md): bad input exits non-zero with a message that names the key;
# a tiny end-to-end train -> checkpoint -> resume -> generate works. Usage: cli_contract.sh MOELAB
set -u
moelab=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0; passes=0

# expect_fail NAME PATTERN ARGS...: non-zero exit and PATTERN (grep -E) in stderr+stdout.
expect_fail() {
  local name=$1 pattern=$2; shift 2
  local out rc
  out=$("$moelab" "$@" 2>&1); rc=$?
  if [ $rc -ne 0 ] && grep -qE -- "$pattern" <<<"$out"; then
    passes=$((passes + 1))
  else
    echo "FAIL: $name (exit $rc): expected /$pattern/ in:"; echo "$out" | head -5; fails=$((fails + 1))
  fi
}
expect_ok() {
  local name=$1; shift
  local out
  if out=$("$moelab" "$@" 2>&1); then passes=$((passes + 1)); else
    echo "FAIL: $name (exit $?):"; echo "$out" | tail -5; fails=$((fails + 1)); fi
}

expect_fail "unknown key via --set" "router\.aux_alfa" config --set router.aux_alfa=0.1
expect_fail "bad enum value" "router\.policy.*topk\|random_top2" config --set router.policy=fastest
expect_fail "bad number" "router\.aux_alpha" config --set router.aux_alpha=lots
expect_fail "k > experts" "model\.top_k = 9 must be <= model\.experts = 8" config --set model.experts=8 --set model.top_k=9
expect_fail "negative capacity" "router\.capacity_factor" config --set router.capacity_factor=-1
printf '[router]\nz_los = 0.1\n' > "$tmp/bad.ini"
expect_fail "unknown key in a file" "router\.z_los" train --config "$tmp/bad.ini"
expect_fail "missing config file" "cannot open" train --config "$tmp/none.ini"
expect_fail "unknown subcommand" "serve" serve
printf '[data]\nsource = brown\npath = %s/nothing\n' "$tmp" > "$tmp/brown.ini"
expect_fail "brown missing says make data" "make data" train --config "$tmp/brown.ini" --out "$tmp/b.h5"

# End to end: train 4 steps with a checkpoint, resume, generate.
cat > "$tmp/tiny.ini" <<INI
[model]
layers = 2
d_model = 16
heads = 2
experts = 4
top_k = 2
d_expert = 16
moe_every = 1
[train]
steps = 4
batch = 2
seq = 16
[log]
eval_every = 2
eval_batches = 1
checkpoint_every = 2
checkpoint_dir = $tmp/ckpt
out = $tmp/tiny.h5
INI
expect_ok "train tiny" train --config "$tmp/tiny.ini"
[ -f "$tmp/tiny.h5" ] && [ -f "$tmp/ckpt/step_000002.ckpt" ] && passes=$((passes + 1)) || {
  echo "FAIL: train did not write its log and checkpoint"; fails=$((fails + 1)); }
expect_ok "resume" train --config "$tmp/tiny.ini" --resume "$tmp/ckpt/step_000002.ckpt"
expect_ok "bench" bench --config "$tmp/tiny.ini" --iters 2
expect_ok "generate" generate --checkpoint "$tmp/ckpt/step_000004.ckpt" --prompt "ab" --tokens 5
head -c 100 "$tmp/ckpt/step_000004.ckpt" > "$tmp/cut.ckpt"
expect_fail "truncated checkpoint refused" "truncated" generate --checkpoint "$tmp/cut.ckpt"
expect_fail "resume needs an existing checkpoint" "no such checkpoint" train --config "$tmp/tiny.ini" --resume "$tmp/none.ckpt"

echo "$passes passed, $fails failed"
[ $fails -eq 0 ]
