#!/usr/bin/env python3
"""Import speed and memory of `moelab import-hf` on a synthetic Mixtral checkpoint (issue 11).

usage: /usr/bin/python3 experiments/hf_import_speed.py MOELAB_BINARY WORK_DIR [GB]

Writes WORK_DIR/hf/{config.json, model.safetensors}: a MixtralForCausalLM of about GB gigabytes
(default 2) in F32 with random values, one tensor at a time (numpy only). Then it reads the file
once with `cat` (the disk speed, as the page cache leaves it), runs `moelab import-hf` under
/usr/bin/time -v and prints the checkpoint size, the import's GB/s and its peak resident memory
against the checkpoint size. The files are removed at the end unless --keep is given.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np


def main():
    args = [a for a in sys.argv[1:] if a != "--keep"]
    keep = "--keep" in sys.argv
    if len(args) < 2:
        print(__doc__)
        return 2
    moelab, work = args[0], args[1]
    gb = float(args[2]) if len(args) > 2 else 2.0
    D, F, E, V, H, Hkv = 2048, 1792, 8, 32000, 16, 4
    dh = D // H
    per_layer = 2 * D * D + 2 * Hkv * dh * D + E * 3 * D * F + E * D + 2 * D
    layers = max(1, int((gb * 1e9 / 4 - 2 * V * D) / per_layer))
    hf = os.path.join(work, "hf")
    os.makedirs(hf, exist_ok=True)
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": V, "hidden_size": D,
           "intermediate_size": F, "num_hidden_layers": layers, "num_attention_heads": H, "num_key_value_heads": Hkv,
           "num_local_experts": E, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
           "tie_word_embeddings": False, "hidden_act": "silu", "sliding_window": None, "torch_dtype": "float32"}
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    shapes = {"model.embed_tokens.weight": [V, D], "lm_head.weight": [V, D], "model.norm.weight": [D]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": [D], p + "post_attention_layernorm.weight": [D],
                       p + "self_attn.q_proj.weight": [H * dh, D], p + "self_attn.k_proj.weight": [Hkv * dh, D],
                       p + "self_attn.v_proj.weight": [Hkv * dh, D], p + "self_attn.o_proj.weight": [D, H * dh],
                       p + "block_sparse_moe.gate.weight": [E, D]})
        for e in range(E):
            q = p + f"block_sparse_moe.experts.{e}."
            shapes.update({q + "w1.weight": [F, D], q + "w3.weight": [F, D], q + "w2.weight": [D, F]})
    header, off = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path = os.path.join(hf, "model.safetensors")
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape in shapes.items():
            f.write(rng.standard_normal(int(np.prod(shape)), dtype=np.float32).tobytes())
    size = os.path.getsize(path)
    print(f"synthetic Mixtral: {layers} layers, {size / 1e9:.2f} GB F32, written in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
    cat_s = time.perf_counter() - t0
    ck = os.path.join(work, "model.ck")
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", moelab, "import-hf", hf, "--out", ck, "--overwrite"],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        print(r.stdout, r.stderr)
        return 1
    rss_kb = next(int(l.split()[-1]) for l in r.stderr.splitlines() if "Maximum resident set size" in l)
    print(r.stdout.strip())
    print(f"| checkpoint GB | cat GB/s | import wall s | import GB/s | peak RSS GB | peak / checkpoint |")
    print(f"|---|---|---|---|---|---|")
    print(f"| {size / 1e9:.2f} | {size / 1e9 / cat_s:.2f} | {wall:.2f} | {size / 1e9 / wall:.2f} | "
          f"{rss_kb * 1024 / 1e9:.2f} | {rss_kb * 1024 / size:.2f} |")
    if not keep:
        shutil.rmtree(hf)
        os.remove(ck)
    return 0


if __name__ == "__main__":
    sys.exit(main())
