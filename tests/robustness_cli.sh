#!/usr/bin/env bash
# moelab robustness through the command line: what an adversarial tester found. A bad --config,
# absurd sizes and evaluation without validation data exit 2 with a message naming the keys
# (not a signal, not NaN losses); generate streams raw bytes (NULs included) as they are
# sampled; error locations carry no build path. Usage: robustness_cli.sh MOELAB
set -u
moelab=$1
src=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0; passes=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

# Absurd sizes run under an address-space cap, so that a regression fails fast instead of
# eating the machine (not under ASan, which reserves terabytes of address space).
run() {
  if grep -q __asan_init "$moelab"; then "$moelab" "$@"
  else (ulimit -v 8388608; exec "$moelab" "$@"); fi
}

# expect_exit CODE NAME PATTERN ARGS...: exit status CODE and PATTERN (grep -E) in the output.
expect_exit() {
  local code=$1 name=$2 pattern=$3; shift 3
  local out rc
  out=$(run "$@" 2>&1); rc=$?
  if [ $rc -eq "$code" ] && grep -qE -- "$pattern" <<<"$out"; then
    passes=$((passes + 1))
  else
    fail "$name (exit $rc, expected $code and /$pattern/):"; echo "$out" | head -5
  fi
}

cat "$(dirname "${BASH_SOURCE[0]}")/tiny_model.ini" > "$tmp/tiny.ini"
cat >> "$tmp/tiny.ini" <<INI
[router]
bias_update_rate = 0.5
[train]
steps = 2
batch = 2
seq = 16
[log]
eval_every = 2
eval_batches = 1
out = $tmp/tiny.h5
INI

# ---- 7: --config must be a regular file (a directory read as "all defaults") ----
mkdir -p "$tmp/confdir"
expect_exit 2 "directory as --config" "'$tmp/confdir' is a directory" train --config "$tmp/confdir" --out "$tmp/d1.h5"
expect_exit 2 "device as --config" "'/dev/null' is not a regular file" train --config /dev/null --out "$tmp/d2.h5"
ls "$tmp"/d*.h5 >/dev/null 2>&1 && fail "a refused config still wrote its log" || passes=$((passes + 1))

# ---- 8: absurd sizes exit 2 naming the keys (SIGSEGV / SIGABRT before) ----
# Each run its own --out, so that one wrongly accepted run does not make the next fail.
expect_exit 2 "synthetic sources x alphabet overflow" "data\.synthetic_sources.*data\.synthetic_alphabet" \
  train --config "$tmp/tiny.ini" --out "$tmp/refused1.h5" \
  --set data.synthetic_sources=4611686018427387904 --set data.synthetic_alphabet=4
expect_exit 2 "a million layers" "model\.layers = 1000000" \
  train --config "$tmp/tiny.ini" --out "$tmp/refused2.h5" --set model.layers=1000000
expect_exit 2 "batch x seq overflow" "train\.batch = 4611686018427387904, train\.seq = 4" \
  train --config "$tmp/tiny.ini" --out "$tmp/refused3.h5" \
  --set train.batch=4611686018427387904 --set train.seq=4
expect_exit 2 "bench: a million layers" "model\.layers = 1000000" bench --config "$tmp/tiny.ini" --set model.layers=1000000
MOELAB_MEMORY_LIMIT_BYTES=1000 expect_exit 2 "memory limit override" "more than the 1000 B available \(MOELAB_MEMORY_LIMIT_BYTES\)" \
  train --config "$tmp/tiny.ini" --out "$tmp/refused4.h5"

# ---- 9: evaluation without validation data (NaN losses and exit 0 before) ----
mkdir -p "$tmp/brown"
para=$'\n\n\tThe/at jury/nn further/rbr said/vbd it/pps did/dod find/vb that/cs 12/cd of/in laws/nns ./.\n'
for f in ca01 ca02 cb01; do printf '%s%s%s' "$para" "$para" "$para" > "$tmp/brown/$f"; done
expect_exit 2 "partial Brown corpus, no validation file" \
  "log\.eval_every = 2 .*data\.path = '$tmp/brown' has 3 files.*data\.val_fraction = 0\.1.*Set log\.eval_every = 0" \
  train --config "$tmp/tiny.ini" --out "$tmp/refused5.h5" --set data.source=brown --set data.path="$tmp/brown" \
  --set train.seq=8
expect_exit 2 "val_fraction = 0" "data\.val_fraction = 0 holds no file" \
  train --config "$tmp/tiny.ini" --out "$tmp/refused6.h5" --set data.source=brown --set data.path="$tmp/brown" \
  --set train.seq=8 --set data.val_fraction=0
ls "$tmp"/refused*.h5 >/dev/null 2>&1 && fail "a refused run still wrote its log:" "$tmp"/refused*.h5 || passes=$((passes + 1))
expect_exit 0 "the same corpus without evaluation trains" "summary" \
  train --config "$tmp/tiny.ini" --set data.source=brown --set data.path="$tmp/brown" --set train.seq=8 \
  --set log.eval_every=0 --out "$tmp/brown.h5"

# ---- 11: loop-count bounds; error locations without the build path ----
expect_exit 2 "sinkhorn_max_iters bound" "router\.sinkhorn_max_iters = 100000000 must be in \[1, 10000\]" \
  config --set router.sinkhorn_max_iters=100000000
expect_exit 2 "eval_batches bound" "log\.eval_batches = 1000000000 must be in \[1, 10000\]" \
  config --set log.eval_batches=1000000000
# A MOELAB_CHECK (file:line) error: bf16 on the CPU backend.
out=$("$moelab" train --config "$tmp/tiny.ini" --set model.dtype=bf16 --out "$tmp/bf16.h5" 2>&1)
if grep -qE '[a-z_]+/[a-z_]+\.(cpp|h|cu):[0-9]+: ' <<<"$out" && ! grep -qF -- "$src/" <<<"$out"; then
  passes=$((passes + 1))
else
  fail "MOELAB_CHECK message should carry a source-relative file:line, not '$src/':"; echo "$out" | head -3
fi

# ---- 10: generate writes raw bytes as it samples them ----
if "$moelab" train --config "$tmp/tiny.ini" --set log.checkpoint_every=2 --set log.checkpoint_dir="$tmp/ckpt" \
  > "$tmp/train.log" 2>&1; then passes=$((passes + 1)); else
  fail "train tiny:"; tail -5 "$tmp/train.log"; fi
ckpt=$tmp/ckpt/step_000002.ckpt
# Near-uniform sampling over 256 bytes: 3000 of them hold NULs (printf("%s") stopped at the first).
"$moelab" generate --checkpoint "$ckpt" --prompt ab --tokens 3000 --temperature 4 --top-k 0 > "$tmp/gen.bin" 2>"$tmp/gen.err"
bytes=$(wc -c < "$tmp/gen.bin"); nuls=$(tr -cd '\000' < "$tmp/gen.bin" | wc -c)
if [ "$bytes" -eq $((2 + 3000 + 1)) ] && [ "$nuls" -gt 0 ] && [ "$(head -c 2 "$tmp/gen.bin")" = ab ]; then
  passes=$((passes + 1))
else
  fail "generate output: $bytes bytes with $nuls NULs, expected 3003 bytes (prompt + tokens + newline) with NULs"
  head -3 "$tmp/gen.err"
fi
# Streaming: output reaches a file (block-buffered stdout) while sampling runs, and what was
# sampled survives SIGINT (everything was printed at the end before). In the foreground: a
# background job of a script ignores SIGINT.
timeout -k 5 -s INT 3 "$moelab" generate --checkpoint "$ckpt" --prompt ab --tokens 100000000 \
  > "$tmp/stream.bin" 2>/dev/null
bytes=$(wc -c < "$tmp/stream.bin")
if [ "$bytes" -ge 10 ] && [ "$(head -c 2 "$tmp/stream.bin")" = ab ]; then passes=$((passes + 1)); else
  fail "generate did not stream: $bytes bytes reached the file before SIGINT at 3 s"; fi

echo "$passes passed, $fails failed"
[ $fails -eq 0 ]
