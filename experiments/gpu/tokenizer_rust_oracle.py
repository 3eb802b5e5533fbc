#!/usr/bin/env python3
"""moelab's C++ tokenizer against Hugging Face's Rust `tokenizers` (issue 12's second oracle).

Runs where the Python binding of the Rust library is installed (the GPU machine: tokenizers 0.23
under Python 3.12). For Qwen3, DeepSeek-V3 and GPT-2 it encodes every text of INPUTS (the folder
tests/tokenizer_oracle.mjs writes: the whole Brown corpus plus the adversarial cases) with
`moelab tokenize` and with the Rust library (add_special_tokens=False, as moelab), requires
identical ids and an exact decode round trip, and prints encoding throughput of both on Brown.
The case `invalid_utf8` is compared with U+FFFD replacement on both sides (moelab
--invalid-utf8 replace; Python's errors="replace" yields the same code points).

usage: tokenizer_rust_oracle.py MOELAB_BINARY DATA_DIR INPUTS_DIR
  DATA_DIR: holds tokenizers/{qwen3,deepseek_v3}/tokenizer.json and tokenizers/gpt2/{encoder.json,vocab.bpe}
Exit status 0 when everything is identical, 1 otherwise.

Ran 2026-11-30 on the H200 machine (tokenizers 0.23.2): ids identical on all 26 texts for all
three tokenizers; the first run compared Rust's decode with the raw text and so flagged the three
texts that NFC changes (Qwen3 normalizes NFC): decode is now compared with NFC(text) there, as
the node oracle does. Prepare the inputs here with `node tests/tokenizer_oracle.mjs build/moelab . WORK` (WORK/inputs), then carry
them, data/tokenizers and the relocatable install (packed: see the README) to the GPU machine.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import unicodedata

from tokenizers import Tokenizer
import tokenizers


def gpt2_tokenizer_json(data):
    """Hugging Face's published gpt2 tokenizer.json, built from encoder.json + vocab.bpe (the same
    construction as tests/tokenizer_oracle.mjs)."""
    d = os.path.join(data, "tokenizers", "gpt2")
    vocab = json.load(open(os.path.join(d, "encoder.json"), encoding="utf-8"))
    merges = [l for l in open(os.path.join(d, "vocab.bpe"), encoding="utf-8").read().split("\n")[1:] if l]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 50256, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": True, "special": True}],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": dict(byte_level, add_prefix_space=True),
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                  "merges": merges},
    })


def moelab_ids(moelab, tok_path, files, out_dir, replace=False):
    cmd = [moelab, "tokenize", "--tokenizer", tok_path, "--out-dir", out_dir]
    if replace:
        cmd += ["--invalid-utf8", "replace"]
    for f in files:
        cmd += ["--in", f]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"moelab tokenize failed ({r.returncode}): {r.stderr}")
    return time.perf_counter() - t0, r.stderr


def read_ids(path):
    text = open(path).read().split()
    return [int(x) for x in text]


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    moelab, data, inputs = sys.argv[1:]
    names = sorted(os.listdir(inputs))
    toks = [("qwen3", os.path.join(data, "tokenizers/qwen3/tokenizer.json"), None),
            ("deepseek_v3", os.path.join(data, "tokenizers/deepseek_v3/tokenizer.json"), None),
            ("gpt2", os.path.join(data, "tokenizers/gpt2/encoder.json"), gpt2_tokenizer_json(data))]
    failures = 0
    rows = []
    brown_bytes = os.path.getsize(os.path.join(inputs, "brown"))
    print(f"tokenizers (Rust) {tokenizers.__version__}; {len(names)} texts; Brown {brown_bytes} bytes")
    for name, cpp_path, json_text in toks:
        rust = Tokenizer.from_str(json_text) if json_text else Tokenizer.from_file(cpp_path)
        normalizer = json.loads(json_text or open(cpp_path, encoding="utf-8").read()).get("normalizer")
        nfc = bool(normalizer) and normalizer.get("type") == "NFC"
        with tempfile.TemporaryDirectory() as work:
            valid = [os.path.join(inputs, n) for n in names if n != "invalid_utf8"]
            moelab_ids(moelab, cpp_path, valid, work)
            if "invalid_utf8" in names:
                moelab_ids(moelab, cpp_path, [os.path.join(inputs, "invalid_utf8")], work, replace=True)
            _, stats = moelab_ids(moelab, cpp_path, [os.path.join(inputs, "brown")], os.path.join(work, "b"))
            cpp_mbs = next((l for l in stats.splitlines() if "MB/s" in l), "")
            compared = 0
            for n in names:
                raw = open(os.path.join(inputs, n), "rb").read()
                text = raw.decode("utf-8", errors="replace")
                t0 = time.perf_counter()
                got = rust.encode(text, add_special_tokens=False).ids
                dt = time.perf_counter() - t0
                want = read_ids(os.path.join(work, n + ".ids"))
                compared += 1
                if got != want:
                    failures += 1
                    i = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), min(len(got), len(want)))
                    print(f"  FAIL {name} {n}: first difference at id {i} (rust {got[i:i+5]}, moelab {want[i:i+5]}), "
                          f"lengths {len(got)} / {len(want)}")
                    continue
                back = rust.decode(got, skip_special_tokens=False)
                # Decoding gives the *normalized* text back: Qwen3's normalizer is NFC, which
                # recomposes the decomposed marks of case_folding, combining, combining_alone.
                if nfc:
                    text = unicodedata.normalize("NFC", text)
                if back != text:
                    failures += 1
                    print(f"  FAIL {name} {n}: Rust decode does not give the text back")
                if n == "brown":
                    rows.append((name, len(got), brown_bytes / 1e6 / dt, cpp_mbs))
            print(f"== {name}: {compared} texts compared")
    print("\n| tokenizer | Brown tokens | Rust MB/s (encode, one call) | moelab (its own line) |")
    print("|---|---|---|---|")
    for name, n, rust_mbs, cpp in rows:
        print(f"| {name} | {n} | {rust_mbs:.2f} | {cpp.strip()} |")
    print("\nall identical" if failures == 0 else f"\n{failures} FAILURES")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
