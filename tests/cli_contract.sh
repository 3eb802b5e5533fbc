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
# expect_rc NAME RC PATTERN ARGS...: exit code exactly RC and PATTERN in the output.
expect_rc() {
  local name=$1 want=$2 pattern=$3; shift 3
  local out rc
  out=$("$moelab" "$@" 2>&1); rc=$?
  if [ $rc -eq "$want" ] && grep -qE -- "$pattern" <<<"$out"; then passes=$((passes + 1)); else
    echo "FAIL: $name (exit $rc, want $want): expected /$pattern/ in:"; echo "$out" | head -5; fails=$((fails + 1)); fi
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
cat "$(dirname "${BASH_SOURCE[0]}")/tiny_model.ini" > "$tmp/tiny.ini"
cat >> "$tmp/tiny.ini" <<INI
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
expect_ok "bench with no warm-up steps" bench --config "$tmp/tiny.ini" --iters 2 --warmup 0
expect_rc "a negative --warmup is refused by name" 2 "--warmup = -1 must be >= 0" bench --config "$tmp/tiny.ini" --warmup -1
expect_rc "bench at ep 2 x dp 2 (simulated ranks) reports communication" 0 "ep 2 x dp 2, comm" bench --config "$tmp/tiny.ini" --iters 2 --set parallel.ep=2 --set parallel.dp=2 --set train.batch=4
expect_ok "generate" generate --checkpoint "$tmp/ckpt/step_000004.ckpt" --prompt "ab" --tokens 5
head -c 100 "$tmp/ckpt/step_000004.ckpt" > "$tmp/cut.ckpt"
expect_fail "truncated checkpoint refused" "truncated" generate --checkpoint "$tmp/cut.ckpt"
expect_fail "resume needs an existing checkpoint" "no such checkpoint" train --config "$tmp/tiny.ini" --resume "$tmp/none.ckpt"

# Nothing lost (issue 8): exit codes, reruns, sweeps, locks, disk full, non-regular outputs.
cp "$tmp/tiny.h5" "$tmp/tiny.before"
expect_rc "a rerun on the same --out is refused (usage, exit 2)" 2 "tiny\.h5 *$" train --config "$tmp/tiny.ini"
cmp -s "$tmp/tiny.h5" "$tmp/tiny.before" && passes=$((passes + 1)) || { echo "FAIL: the refused rerun changed the log"; fails=$((fails + 1)); }
expect_rc "--overwrite with --resume is a contradiction" 2 "contradict" train --config "$tmp/tiny.ini" --overwrite --resume "$tmp/ckpt/step_000002.ckpt"
expect_ok "--overwrite replaces the log (make run twice)" train --config "$tmp/tiny.ini" --overwrite
expect_rc "a resume with another seed names the key" 2 "train\.seed: checkpoint 1234, this run 5" \
  train --config "$tmp/tiny.ini" --resume "$tmp/ckpt/step_000002.ckpt" --set train.seed=5
# A sweep is refused before its first run when any of its logs exists.
printf '[sweep]\nrouter.aux_alpha = 0, 0.01\n' > "$tmp/sweep_axis.ini"
cat "$tmp/tiny.ini" "$tmp/sweep_axis.ini" > "$tmp/sweep.ini"
mkdir -p "$tmp/sw" && echo keep > "$tmp/sw/s_aux_alpha=0.01.h5"
expect_rc "a sweep with an existing log is refused before it runs" 2 "s_aux_alpha=0\.01\.h5" \
  train --config "$tmp/sweep.ini" --out "$tmp/sw/s.h5" --set log.checkpoint_every=0
[ ! -e "$tmp/sw/s_aux_alpha=0.h5" ] && [ "$(cat "$tmp/sw/s_aux_alpha=0.01.h5")" = keep ] && passes=$((passes + 1)) || {
  echo "FAIL: the refused sweep ran or touched a log"; fails=$((fails + 1)); }
# Runtime failures exit 1: a disk that fills up (a file size limit) while the log is flushed.
( trap '' XFSZ; ulimit -f 40; "$moelab" train --config "$tmp/tiny.ini" --out "$tmp/full.h5" --set train.steps=300 \
    --set log.checkpoint_every=0 --set log.eval_every=0 --set log.flush_every=5 >"$tmp/full.out" 2>&1 ); rc=$?
if [ $rc -eq 1 ] && grep -q "flush failed, the file keeps the rows of the last good flush" "$tmp/full.out" &&
   [ ! -e "$tmp/full.h5.tmp" ]; then passes=$((passes + 1)); else
  echo "FAIL: disk full: exit $rc"; tail -3 "$tmp/full.out"; fails=$((fails + 1)); fi
# A second writer of one log is refused and names the first (which is still running).
"$moelab" train --config "$tmp/tiny.ini" --out "$tmp/busy.h5" --set train.steps=100000 --set log.checkpoint_every=0 >/dev/null 2>&1 &
busy=$!
for _ in $(seq 50); do [ -e "$tmp/busy.h5.lock" ] && break; sleep 0.1; done
expect_rc "a concurrent writer is refused, naming the other process" 1 "being written by another moelab process \(pid $busy" \
  train --config "$tmp/tiny.ini" --out "$tmp/busy.h5" --overwrite --set log.checkpoint_every=0
kill $busy 2>/dev/null; wait $busy 2>/dev/null
mkfifo "$tmp/fifo.h5"
expect_rc "a FIFO as --out is refused" 2 "is a FIFO" train --config "$tmp/tiny.ini" --out "$tmp/fifo.h5"
# Messages never carry the build machine's absolute source paths.
out=$("$moelab" generate --checkpoint "$tmp/cut.ckpt" 2>&1)
grep -q "$(cd "$(dirname "$0")/.." && pwd)" <<<"$out" && { echo "FAIL: absolute source path in: $out"; fails=$((fails + 1)); } || passes=$((passes + 1))

echo "$passes passed, $fails failed"
[ $fails -eq 0 ]
