#!/usr/bin/env python3
"""Report of the Brown recipe (run.sh): tables over seeds with 95% t-intervals, plots, samples.

usage: /usr/bin/python3 experiments/recipes/brown_pos/analyze.py OUT [--docs DIR]

Reads OUT/tasks/{baseline.json,test.jsonl,sft_train.jsonl} and per seed OUT/s<S>/:
eval_<stage>.json and eval_<stage>_records.jsonl (moelab eval on the test words),
lm_<stage>_<genres>.json (validation loss), cpt.h5 and sft_<loss_on>.h5 (run logs). Writes
OUT/report/results.md, results.json and the PNGs (and copies them to --docs).

Statistics (analysis/moelab_analysis/stats.py): a value is the mean over seeds [its 95%
t-interval]; a difference between two stages of one seed is paired by seed; a difference to the
baseline (deterministic: it does not depend on the seed) is the t-interval of the seeds' values
minus it. "beyond the interval" = the 95% interval of the difference excludes 0.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "analysis"))
from moelab_analysis import stats  # noqa: E402

import h5py  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STAGES = [("pretrain", "pretrained (genres a-j)"), ("cpt", "continued pretraining (k-r): the SFT start"),
          ("sft_all", "SFT, loss on all tokens"), ("sft_response", "SFT, answer-only loss")]
LN2 = math.log(2.0)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def load_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fmt(ci, scale=100.0, digits=1, unit="%"):
    if ci.n >= 2:
        return f"{scale * ci.mean:.{digits}f}{unit} [{scale * ci.lo:.{digits}f}, {scale * ci.hi:.{digits}f}]"
    return f"{scale * ci.mean:.{digits}f}{unit}"


def fmt_diff(t, scale=100.0, digits=1, unit=" pp"):
    verdict = "beyond the interval" if t.n >= 2 and (t.lo > 0 or t.hi < 0) else "within the interval"
    return f"{scale * t.mean:+.{digits}f}{unit} [{scale * t.lo:+.{digits}f}, {scale * t.hi:+.{digits}f}], {verdict}"


def tokenizer_of(out, seed):
    """data.tokenizer of the seed's pretraining run ("bytes" when unknown)."""
    try:
        import h5py
        with h5py.File(os.path.join(out, f"s{seed}", "pretrain.h5"), "r") as f:
            cfg = f.attrs["config"]
        cfg = cfg.decode() if isinstance(cfg, bytes) else str(cfg)
        for line in cfg.splitlines():
            if line.strip().startswith("tokenizer"):
                return line.split("=", 1)[1].split("#")[0].strip()
    except Exception:
        pass
    return "bytes"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--docs", help="also copy the report's files here")
    a = ap.parse_args()
    out = a.out
    rep = os.path.join(out, "report")
    os.makedirs(rep, exist_ok=True)
    base = load_json(os.path.join(out, "tasks", "baseline.json"))
    test = load_jsonl(os.path.join(out, "tasks", "test.jsonl"))
    if "seen_in_sft" in base:
        seen = np.array(base["seen_in_sft"], dtype=bool)
    else:
        sft_words = {json.loads(line)["word"] for line in open(os.path.join(out, "tasks", "sft_train.jsonl"))}
        seen = np.array([r["word"] in sft_words for r in test])
    seeds = sorted(int(os.path.basename(p)[1:]) for p in glob.glob(os.path.join(out, "s*")) if os.path.basename(p)[1:].isdigit())
    if not seeds:
        raise SystemExit(f"analyze: no seed folders s<N> in {out}")

    # ---- task scores ------------------------------------------------------------------------
    acc, tok, loss, acc_seen, acc_unseen = {}, {}, {}, {}, {}
    for st, _ in STAGES:
        acc[st], tok[st], loss[st], acc_seen[st], acc_unseen[st] = [], [], [], [], []
        for s in seeds:
            e = load_json(os.path.join(out, f"s{s}", f"eval_{st}.json"))
            recs = load_jsonl(os.path.join(out, f"s{s}", f"eval_{st}_records.jsonl"))
            assert len(recs) == len(test), f"s{s} {st}: {len(recs)} records scored, {len(test)} in test.jsonl"
            exact = np.array([r["exact"] for r in recs], dtype=float)
            acc[st].append(e["exact_match"])
            tok[st].append(e["token_accuracy"])
            loss[st].append(e["loss"])
            acc_seen[st].append(exact[seen].mean())
            acc_unseen[st].append(exact[~seen].mean() if (~seen).any() else float("nan"))
    mft = base["mft_sft"]
    mft_seen = np.array(mft["per_record"], dtype=float)

    lines = []
    lines.append(f"Seeds: {', '.join(map(str, seeds))} (every stage re-run per seed). Test: {len(test)} words of "
                 f"{base['test_sentences']} held-out sentences (files moelab never trains on); "
                 f"{100 * (~seen).mean():.1f}% of them never appear in the {base['train_records']} fine-tuning records.\n")
    byte_level = tokenizer_of(out, seeds[0]) == "bytes"
    unit = "byte-level: per byte" if byte_level else "per token of " + os.path.basename(os.path.dirname(tokenizer_of(out, seeds[0])) or "the tokenizer")
    lines.append(f"| model | tag accuracy (exact match) | token accuracy of the answers ({unit}) | answer loss (nats/token) | accuracy on words seen in SFT | on unseen words |")
    lines.append("|---|---|---|---|---|---|")
    lines.append(f"| baseline: most frequent tag of the word in the SFT records (unseen: `{mft['default_tag']}`) | "
                 f"{100 * mft['accuracy']:.1f}% | - | - | {100 * mft_seen[seen].mean():.1f}% | {100 * mft_seen[~seen].mean():.1f}% |")
    mc = base["mft_corpus"]
    words = base.get("train_words", 0)
    lines.append(f"| reference: most frequent tag over all {words} tagged words of the training files "
                 f"({words / max(1, base['train_records']):.0f}x the SFT annotations) | "
                 f"{100 * mc['accuracy']:.1f}% | - | - | - | - |")
    for st, label in STAGES:
        lines.append(f"| {label} | {fmt(stats.mean_ci(acc[st]))} | {fmt(stats.mean_ci(tok[st]))} | "
                     f"{fmt(stats.mean_ci(loss[st]), 1.0, 3, '')} | {fmt(stats.mean_ci(acc_seen[st]))} | {fmt(stats.mean_ci(acc_unseen[st]))} |")
    lines.append("")
    lines.append("Differences in tag accuracy (percentage points; paired by seed between stages):\n")
    comps = []
    for st in ("sft_response", "sft_all"):
        comps.append((f"{dict(STAGES)[st]} minus the baseline", stats.paired_t(acc[st], [mft["accuracy"]] * len(seeds))))
        comps.append((f"{dict(STAGES)[st]} minus the SFT start (stage 2)", stats.paired_t(acc[st], acc["cpt"])))
    comps.append(("answer-only minus all-token SFT", stats.paired_t(acc["sft_response"], acc["sft_all"])))
    comps.append(("answer-only minus all-token SFT, answer loss (nats per token)", stats.paired_t(loss["sft_response"], loss["sft_all"])))
    for name, t in comps:
        if "nats" in name:
            lines.append(f"- {name}: {fmt_diff(t, 1.0, 3, '')}")
        else:
            lines.append(f"- {name}: {fmt_diff(t)}")
    task_md = "\n".join(lines)

    # ---- continued pretraining: validation loss by genre set --------------------------------
    lm = {}
    for st, _ in STAGES:
        for g in ("a-j", "k-r"):
            paths = [os.path.join(out, f"s{s}", f"lm_{st}_{g}.json") for s in seeds]
            if all(os.path.exists(p) for p in paths):  # run.sh LM_STAGES may leave stages out
                lm[(st, g)] = [load_json(p)["val_loss"] / LN2 for p in paths]
    cl = ["| model | val loss (bits per token), genres a-j (pretraining domain) | val loss (bits per token), genres k-r (new domain) |", "|---|---|---|"]
    for st, label in STAGES:
        if (st, "a-j") in lm:
            cl.append(f"| {label} | {fmt(stats.mean_ci(lm[(st, 'a-j')]), 1.0, 3, '')} | {fmt(stats.mean_ci(lm[(st, 'k-r')]), 1.0, 3, '')} |")
    cl.append("")
    cl.append(f"- continued pretraining on k-r, change of the k-r loss: {fmt_diff(stats.paired_t(lm[('cpt', 'k-r')], lm[('pretrain', 'k-r')]), 1.0, 3, ' bits')}")
    cl.append(f"- ... and of the a-j loss (forgetting): {fmt_diff(stats.paired_t(lm[('cpt', 'a-j')], lm[('pretrain', 'a-j')]), 1.0, 3, ' bits')}")
    cl.append("")
    cl.append("(Byte-level runs: a token is a byte, so these are bits per byte.)" if byte_level else
              f"(Tokens of {tokenizer_of(out, seeds[0])}: bits per token, not comparable with the byte-level runs.)")
    cpt_md = "\n".join(cl)

    # ---- plots ------------------------------------------------------------------------------
    figs = []

    def save(fig, name):
        p = os.path.join(rep, name)
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        figs.append(p)

    # Answer-only loss curves: the dev set's answer loss (/eval/response_loss) of both SFT
    # variants, and the training loss of the answer-only run (its objective).
    fig, ax = plt.subplots(figsize=(7, 4))
    for st, color in (("sft_all", "tab:blue"), ("sft_response", "tab:red")):
        curves, steps = [], None
        for s in seeds:
            with h5py.File(os.path.join(out, f"s{s}", f"{st}.h5"), "r") as f:
                steps = f["eval/step"][:]
                curves.append(f["eval/response_loss"][:])
        m, lo, hi = stats.band(curves)
        ax.plot(steps[: m.size], m, color=color, label=f"{dict(STAGES)[st]}: dev answer loss")
        ax.fill_between(steps[: m.size], lo, hi, color=color, alpha=0.2)
    tr = []
    for s in seeds:
        with h5py.File(os.path.join(out, f"s{s}", "sft_response.h5"), "r") as f:
            tsteps = f["train/step"][:]
            tr.append(f["train/loss"][:])
    m, lo, hi = stats.band(tr)
    ax.plot(tsteps[: m.size], m, color="tab:red", alpha=0.4, lw=0.8, label="answer-only SFT: training answer loss")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("answer loss (nats per token, log scale)")
    ax.set_yscale("log")
    ax.set_title(f"Answer-only loss during SFT (mean over {len(seeds)} seeds, 95% band)")
    ax.legend(fontsize=8)
    save(fig, "sft_answer_loss.png")

    # Continued pretraining: k-r validation loss from step 0 (the pretrained model).
    fig, ax = plt.subplots(figsize=(7, 3.5))
    curves = []
    for s in seeds:
        with h5py.File(os.path.join(out, f"s{s}", "cpt.h5"), "r") as f:
            steps = f["eval/step"][:]
            curves.append(f["eval/loss"][:] / LN2)
    m, lo, hi = stats.band(curves)
    ax.plot(steps[: m.size], m, color="tab:green", label="genres k-r validation")
    ax.fill_between(steps[: m.size], lo, hi, color="tab:green", alpha=0.2)
    ax.set_xlabel("continued-pretraining step (0 = the pretrained model)")
    ax.set_ylabel("bits per token (byte-level: per byte)")
    ax.set_title("Continued pretraining on the new domain")
    ax.legend(fontsize=8)
    save(fig, "cpt_val_loss.png")

    # Tag accuracy by stage, with the baselines.
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = ["pretrain", "cpt", "sft_all", "sft_response"]
    labels = ["pretrained", "cont. pretrained", "SFT all tokens", "SFT answer-only"]
    for i, st in enumerate(names):
        ci = stats.mean_ci(acc[st])
        err = [[ci.mean - ci.lo], [ci.hi - ci.mean]] if ci.n >= 2 else None
        ax.bar(i, 100 * ci.mean, yerr=None if err is None else 100 * np.array(err), color="tab:gray" if i < 2 else "tab:red", capsize=4)
        ax.scatter([i] * len(acc[st]), [100 * v for v in acc[st]], color="k", s=8, zorder=3)
    ax.axhline(100 * mft["accuracy"], color="tab:blue", ls="--", label="most frequent tag (SFT records)")
    ax.axhline(100 * mc["accuracy"], color="tab:blue", ls=":", label="most frequent tag (whole training corpus)")
    ax.set_xticks(range(len(names)), labels)
    ax.set_ylabel("tag accuracy on held-out words (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper left")
    save(fig, "tag_accuracy.png")

    # ---- samples: the SFT start against the answer-only model, seed of the first folder --------
    s0 = seeds[0]
    before = load_json(os.path.join(out, f"s{s0}", "eval_cpt.json"))["samples"]
    after = load_json(os.path.join(out, f"s{s0}", "eval_sft_response.json"))["samples"]
    sm = [f"Greedy decoding, seed {s0}, the first test words (prompt, then the reference answer, the model before "
          "fine-tuning and after answer-only fine-tuning; `\\n` is a newline):\n",
          "| prompt | reference | before SFT | after SFT |", "|---|---|---|---|"]

    def cell(t):
        return "`" + t.replace("\n", "\\n").replace("|", "\\|").replace("`", "'") + "`"
    for b, c in zip(before, after):
        sm.append(f"| {cell(b['prompt'])} | {cell(b['reference'])} | {cell(b['model'])} | {cell(c['model'])} |")
    samples_md = "\n".join(sm)

    md = ["# Brown recipe: pretraining -> continued pretraining -> SFT (part-of-speech tags)", "",
          "## Task scores on held-out sentences", "", task_md, "",
          "![tag accuracy](tag_accuracy.png)", "", "![answer-only loss](sft_answer_loss.png)", "",
          "## Continued pretraining", "", cpt_md, "", "![continued pretraining](cpt_val_loss.png)", "",
          "## Before and after", "", samples_md, ""]
    with open(os.path.join(rep, "results.md"), "w") as f:
        f.write("\n".join(md))
    summary = {"seeds": seeds, "baseline": {k: base[k]["accuracy"] for k in ("mft_sft", "mft_corpus")},
               "accuracy": acc, "token_accuracy": tok, "answer_loss": loss, "accuracy_seen": acc_seen,
               "accuracy_unseen": acc_unseen, "lm_bits_per_token": {f"{k[0]}_{k[1]}": v for k, v in lm.items()}}
    with open(os.path.join(rep, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("\n".join(md))
    if a.docs:
        os.makedirs(a.docs, exist_ok=True)
        for p in figs + [os.path.join(rep, "results.md"), os.path.join(rep, "results.json")]:
            shutil.copy(p, a.docs)
        print(f"analyze: copied the report to {a.docs}")


if __name__ == "__main__":
    main()
