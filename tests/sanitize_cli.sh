#!/usr/bin/env bash
# A short CLI run on the sanitizer build (make test-sanitize, label "sanitize"): train a tiny MoE
# LM with checkpoints, resume, bench, generate, and three refusals (a bad key, a truncated
# checkpoint, a rerun on an existing log). Each command must exit as expected with no ASan,
# LeakSanitizer or UBSan report in its output: a report makes moelab exit 1, as do some of the
# refusals, so the output is checked too. Usage: sanitize_cli.sh MOELAB
set -u
moelab=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0

# run WANT ARGS...: `moelab ARGS` exits WANT and prints no sanitizer report.
run() {
  local want=$1; shift
  local out rc
  out=$("$moelab" "$@" 2>&1); rc=$?
  if [ $rc -ne "$want" ] || grep -qE 'runtime error:|ERROR: [A-Za-z]+Sanitizer|SUMMARY: [A-Za-z]+Sanitizer' <<<"$out"; then
    echo "FAIL: moelab $* (exit $rc, want $want):"; echo "$out" | tail -40; fails=$((fails + 1))
  fi
}

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
run 0 train --config "$tmp/tiny.ini"
run 0 train --config "$tmp/tiny.ini" --resume "$tmp/ckpt/step_000002.ckpt"
run 0 bench --config "$tmp/tiny.ini" --iters 2
run 0 generate --checkpoint "$tmp/ckpt/step_000004.ckpt" --prompt "ab" --tokens 5
run 2 config --set router.aux_alfa=0.1
head -c 100 "$tmp/ckpt/step_000004.ckpt" > "$tmp/cut.ckpt"
run 1 generate --checkpoint "$tmp/cut.ckpt"
run 2 train --config "$tmp/tiny.ini"

[ $fails -eq 0 ] && echo "moelab CLI under sanitizers: no reports"
[ $fails -eq 0 ]
