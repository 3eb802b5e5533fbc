#!/usr/bin/env bash
# moelab: the tokenizer oracle test (ctest "cpu: tokenizer oracle ..."): moelab's C++ tokenizer
# against Hugging Face's JavaScript implementation on the whole Brown corpus and an adversarial
# set, for Qwen3, DeepSeek-V3 and GPT-2 (tests/tokenizer_oracle.mjs does the work).
# usage: tokenizer_oracle.sh MOELAB_BINARY REPO_ROOT
# Exit 77 (ctest SKIP_RETURN_CODE) only when node or the data is absent: `make data` fetches the
# corpus and the tokenizers, and `make test` runs `make data` first, so CI never skips.
set -euo pipefail
moelab="$1"
root="$(cd "$2" && pwd)"
if ! command -v node >/dev/null; then
  echo "SKIP: node is not installed (the oracle is Hugging Face's JavaScript tokenizers)"
  exit 77
fi
missing=""
for f in data/brown/cats.txt data/tokenizers/qwen3/tokenizer.json data/tokenizers/deepseek_v3/tokenizer.json \
         data/tokenizers/gpt2/encoder.json data/tokenizers/gpt2/vocab.bpe data/js/tokenizers/dist/tokenizers.mjs; do
  [ -f "$root/$f" ] || missing="$missing $f"
done
if [ -n "$missing" ]; then
  echo "SKIP: data missing (run 'make data'):$missing"
  exit 77
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/moelab_tokenizer_oracle.XXXXXX")"
trap 'rm -rf "$work"' EXIT
node "$root/tests/tokenizer_oracle.mjs" "$moelab" "$root" "$work"
