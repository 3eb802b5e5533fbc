#!/usr/bin/env python3
"""Golden outputs of Hugging Face transformers' MoE models, for moelab's import parity tests.

Runs where torch, transformers and safetensors are installed (the GPU machine: torch 2.11,
transformers 5.17, safetensors 0.8; the CPU is enough). For each case below it builds a small
random model with transformers, writes it in both on-disk expert layouts, checks that
transformers itself loads each layout back to the same logits, and records, for fixed token ids:

  logits, the loss (transformers' own: shifted cross-entropy + router_aux_loss_coef * aux),
  every MoE layer's router logits, and transformers' aux loss (output_router_logits=True)

twice: in float64 and in float32. The float32 run is transformers unmodified. The float64 run is
transformers' code with its float32 upcasts redirected to float64 (softmax(dtype=float32) is
given float64, RMSNorm's `.to(float32)` is skipped, and the rotary cos/sin are computed from a
float64 inv_freq): without that, an f64 model still rounds through f32 in those places and no
reference better than ~1e-7 exists. The redirection is done by the small patches in
`f64_upcasts()` (softmax's dtype and Tensor.float keep float64, and Tensor.float of an integer
mask, the aux loss's expert counts, gives float64; RMSNorm and the rotary cos/sin
recomputed by their formulas in float64), nothing else.

usage: make_hf_golden.py OUT_DIR
  OUT_DIR/<case>/per_expert/{config.json, model.safetensors}
  OUT_DIR/<case>/fused/{config.json, model.safetensors}
  OUT_DIR/<case>/golden.safetensors   (tensors below) and OUT_DIR/versions.json

golden.safetensors: input_ids I64 [B, S]; targets I64 [B, S] (input_ids shifted left, the last
column a fixed extra token: what moelab's forward takes); for P in f64, f32: logits_P [B, S, V],
router_logits_P_<layer> [B*S, E] (MoE layers only), loss_P [1] (transformers' loss with labels =
input_ids), aux_loss_P [1], ce_all_P [1] (torch's cross-entropy of logits_P against targets over
all B*S positions).
"""
import contextlib
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import transformers
import safetensors
from safetensors.torch import save_file

B, S = 2, 7  # an odd sequence length

# name: (config class, model class, config kwargs, on-disk dtype, seed)
CASES = {
    # GQA 4/2, k = 2 of 4, untied head, norm_topk_prob always on (Mixtral).
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=97, hidden_size=24, intermediate_size=20, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
        tie_word_embeddings=False, router_aux_loss_coef=0.02), "float32", 1, 1e6),
    # q/k/v biases, a gated shared expert of its own width, a dense layer (mlp_only_layers),
    # k = 4 of 6, norm_topk_prob false, tied embeddings.
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        vocab_size=89, hidden_size=20, intermediate_size=28, moe_intermediate_size=10,
        shared_expert_intermediate_size=14, num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=1,
        num_experts=6, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
        rms_norm_eps=1e-6, tie_word_embeddings=True, router_aux_loss_coef=0.001, use_sliding_window=False),
        "float32", 2, 1e4),
    # Per-head q/k norm, head_dim 8 with 20 wide (heads * head_dim != hidden), k = 1, bf16 on disk.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=101, hidden_size=20, intermediate_size=24, moe_intermediate_size=12, head_dim=8,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=5, num_experts_per_tok=1,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
        tie_word_embeddings=False, router_aux_loss_coef=0.001, attention_bias=False, use_sliding_window=False),
        "bfloat16", 3, 1e6),
    # Whole-projection q/k norm, k = 2 of 5, norm_topk_prob false, GQA 6/3.
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        vocab_size=83, hidden_size=24, intermediate_size=14, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, num_experts=5, num_experts_per_tok=2, norm_topk_prob=False, rms_norm_eps=1e-5,
        tie_word_embeddings=False, router_aux_loss_coef=0.01, attention_bias=False, clip_qkv=None), "float32", 4,
        1e4),
}


def make_config(cls_name, kw, theta):
    cls = getattr(transformers, cls_name)
    try:
        cfg = cls(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta})
    except TypeError:
        cfg = cls(**kw, rope_theta=theta)
    cfg._attn_implementation = "eager"
    # transformers 5 runs experts with torch's grouped_mm by default, which has no float64; the
    # eager loop over experts is the reference implementation in both precisions.
    cfg._experts_implementation = "eager"
    return cfg


def eager(model):
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model


def randomize(model, seed, disk_dtype):
    """Weights with real spread (transformers' init is 0.02, which makes every router tie)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                v = 1.0 + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            elif name.endswith(".bias"):
                v = 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=g, dtype=torch.float64)
            else:
                scale = 2.0 if name.endswith("mlp.gate.weight") or "gate.weight" in name and "experts" not in name else 1.0
                v = scale * torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(p.shape[-1])
            if disk_dtype == "bfloat16":
                v = v.to(torch.bfloat16).to(torch.float64)
            p.copy_(v.to(p.dtype))


def layouts(state, model_type, num_layers):
    """(per_expert, fused) state dicts from the model's own (either layout in memory)."""
    per, fused = {}, {}
    experts = {}  # layer -> dict
    for k, v in state.items():
        v = v.detach().clone().contiguous()
        if ".experts." not in k:
            per_key = k
            if model_type == "mixtral" and ".mlp.gate." in k:
                per_key = k.replace(".mlp.gate.", ".block_sparse_moe.gate.")
            per[per_key] = v
            fused[k.replace(".block_sparse_moe.", ".mlp.")] = v
            continue
        layer = int(k.split(".")[2])
        experts.setdefault(layer, {})[k.split(".experts.")[1]] = v
    g, u, d = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    moe = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    for layer, ex in experts.items():
        if "gate_up_proj" in ex:  # fused in memory: [E, 2I, H], [E, H, I]
            gu, dn = ex["gate_up_proj"], ex["down_proj"]
        else:  # per expert in memory
            E = len({k.split(".")[0] for k in ex})
            gu = torch.stack([torch.cat([ex[f"{e}.{g}.weight"], ex[f"{e}.{u}.weight"]], 0) for e in range(E)])
            dn = torch.stack([ex[f"{e}.{d}.weight"] for e in range(E)])
        E, twoI, H = gu.shape
        I = twoI // 2
        assert dn.shape == (E, H, I), (dn.shape, (E, H, I))
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = gu.contiguous()
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = dn.contiguous()
        for e in range(E):
            p = f"model.layers.{layer}.{moe}.experts.{e}."
            per[p + f"{g}.weight"] = gu[e, :I].contiguous()
            per[p + f"{u}.weight"] = gu[e, I:].contiguous()
            per[p + f"{d}.weight"] = dn[e].contiguous()
    return per, fused


@contextlib.contextmanager
def f64_upcasts(model):
    """transformers' float32 upcasts made float64 (see the module docstring)."""
    orig_softmax = F.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if dtype == torch.float32 and x.dtype == torch.float64:
            dtype = torch.float64
        return orig_softmax(x, dim=dim, dtype=dtype)

    patched = []
    for m in model.modules():
        cls = type(m).__name__
        if cls.endswith("RMSNorm"):
            def rms(x, m=m):
                var = x.pow(2).mean(-1, keepdim=True)
                eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
                return m.weight * (x * torch.rsqrt(var + eps))
            patched.append((m, m.forward))
            m.forward = rms
        elif cls.endswith("RotaryEmbedding"):
            dim = m.inv_freq.shape[0] * 2
            base = CURRENT_THETA[0]
            inv64 = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))

            def rot(x, position_ids, m=m, inv64=inv64):
                freqs = position_ids[:, :, None].to(torch.float64) * inv64[None, None, :]
                emb = torch.cat((freqs, freqs), dim=-1)
                return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
            patched.append((m, m.forward))
            m.forward = rot
    orig_tsoftmax, orig_float, orig_torch_softmax = torch.Tensor.softmax, torch.Tensor.float, torch.softmax

    def tsoftmax(x, dim, dtype=None):
        if dtype == torch.float32 and x.dtype == torch.float64:
            dtype = torch.float64
        return orig_tsoftmax(x, dim, dtype=dtype)

    def tfloat(x, *a, **k):  # x.float() keeps float64; integer masks (expert counts) become float64
        if x.dtype == torch.float64:
            return x
        if not x.is_floating_point():
            return x.to(torch.float64)
        return orig_float(x, *a, **k)

    F.softmax = softmax
    torch.softmax = lambda x, dim, dtype=None: tsoftmax(x, dim, dtype)
    torch.Tensor.softmax = tsoftmax
    torch.Tensor.float = tfloat
    try:
        yield
    finally:
        F.softmax = orig_softmax
        torch.softmax = orig_torch_softmax
        torch.Tensor.softmax = orig_tsoftmax
        torch.Tensor.float = orig_float
        for m, f in patched:
            m.forward = f


CURRENT_THETA = [1e4]


def run(model, ids, targets):
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
    logits = out.logits
    ce_all = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return {"logits": logits, "loss": out.loss.reshape(1), "aux": out.aux_loss.reshape(1),
            "router": [r for r in out.router_logits], "ce_all": ce_all.reshape(1)}


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    report = []
    for case, (cfg_cls, model_cls, kw, disk_dtype, seed, theta) in CASES.items():
        CURRENT_THETA[0] = theta
        cfg = make_config(cfg_cls, kw, theta)
        torch.manual_seed(seed)
        model = eager(getattr(transformers, model_cls)(cfg).to(torch.float32).eval())
        randomize(model, seed, disk_dtype)
        for m in model.modules():  # the rope base really is theta (configs spell it two ways)
            if type(m).__name__.endswith("RotaryEmbedding"):
                dim = m.inv_freq.shape[0] * 2
                want = 1.0 / theta ** (2.0 / dim)
                assert abs(float(m.inv_freq[1]) - want) <= 1e-6 * want, (case, float(m.inv_freq[1]), want)
        g = torch.Generator().manual_seed(100 + seed)
        ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
        targets = torch.cat([ids[:, 1:], torch.randint(0, cfg.vocab_size, (B, 1), generator=g)], 1)

        r32 = run(model, ids, targets)
        m64 = eager(getattr(transformers, model_cls)(cfg).eval())
        m64.load_state_dict(model.state_dict())
        m64 = m64.to(torch.float64)
        with f64_upcasts(m64):
            r64 = run(m64, ids, targets)

        # Both layouts on disk, in the case's dtype; transformers must read each back.
        state = {k: v for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        per, fused = layouts(state, cfg.model_type, cfg.num_hidden_layers)
        tdt = torch.bfloat16 if disk_dtype == "bfloat16" else torch.float32
        for name, sd in (("per_expert", per), ("fused", fused)):
            d = os.path.join(out_dir, case, name)
            os.makedirs(d, exist_ok=True)
            cfg_out = make_config(cfg_cls, kw, theta)
            cfg_out.architectures = [model_cls]
            cfg_out.save_pretrained(d)
            cj = json.load(open(os.path.join(d, "config.json")))
            cj.pop("torch_dtype", None)
            cj["dtype"] = disk_dtype
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cj, f, indent=2, sort_keys=True)
                f.write("\n")
            save_file({k: v.to(tdt).contiguous() for k, v in sd.items()}, os.path.join(d, "model.safetensors"),
                      metadata={"format": "pt"})
            back = eager(getattr(transformers, model_cls).from_pretrained(
                d, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval())
            rb = run(back, ids, targets)
            diff = float((rb["logits"] - r32["logits"]).abs().max())
            report.append(f"{case} {name}: transformers reloads it, max |logits - original| = {diff:.3g}")
            assert diff == 0.0, f"{case} {name}: transformers does not read the layout back ({diff})"

        golden = {"input_ids": ids.to(torch.int64), "targets": targets.to(torch.int64)}
        moe_layers = []
        for tag, r in (("f64", r64), ("f32", r32)):
            golden[f"logits_{tag}"] = r["logits"].contiguous()
            golden[f"loss_{tag}"] = r["loss"].contiguous()
            golden[f"aux_loss_{tag}"] = r["aux"].contiguous()
            golden[f"ce_all_{tag}"] = r["ce_all"].contiguous()
            # transformers returns router logits for the MoE layers only, in layer order.
            moe_layers = [i for i in range(cfg.num_hidden_layers)
                          if not (hasattr(cfg, "mlp_only_layers") and i in (cfg.mlp_only_layers or []))
                          and (i + 1) % getattr(cfg, "decoder_sparse_step", 1) == 0]
            assert len(moe_layers) == len(r["router"]), (moe_layers, len(r["router"]))
            for i, rl in zip(moe_layers, r["router"]):
                golden[f"router_logits_{tag}_{i}"] = rl.contiguous()
        save_file(golden, os.path.join(out_dir, case, "golden.safetensors"))
        d32 = float((r64["logits"] - r32["logits"]).abs().max() / r64["logits"].pow(2).mean().sqrt())
        report.append(f"{case}: loss f64 {float(r64['loss']):.12f}, aux {float(r64['aux']):.12f}; "
                      f"f32 vs f64 logits max|d|/rms = {d32:.3g}; MoE layers {moe_layers}")
    with open(os.path.join(out_dir, "versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "safetensors": safetensors.__version__, "B": B, "S": S}, f, indent=2)
        f.write("\n")
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
