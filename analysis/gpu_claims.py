#!/usr/bin/python3
"""Does each CPU finding keep its direction and size at GPU scale? (issue 13 part 4)

    /usr/bin/python3 analysis/gpu_claims.py STUDY_DIR --out DIR

STUDY_DIR: the seeded GPU study's logs (experiments/configs/gpu/seeded_gpu.ini; several calls'
folders merged by experiments/gpu/seeded_gpu_report.sh). For each claim, the contrast minus its
baseline, paired by seed, on the final validation bpb and on the router metric the claim is
about; Holm's correction over the claims of each metric (6 on val bpb, 4 on router metrics), as
analysis/README.md describes. Beside it, the same difference from the CPU study (5 seeds, the
tables in docs/results/seeded/, Holm over that study's comparisons). Writes DIR/claims.md and
DIR/claims.png (the val bpb differences, CPU against GPU, with their corrected intervals).
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moelab_analysis._deps import require_or_exit  # noqa: E402

require_or_exit()

import matplotlib  # noqa: E402

matplotlib.use("Agg")

from moelab_analysis import reader, stats, studies, summary  # noqa: E402

TRAIN_BYTES = 13490576  # make_gpu_corpus.py: plain-text bytes of the training files

# claim, contrast, baseline, router metric (summary key, header) or None, and the CPU study's
# rows (docs/results/seeded/FILE: difference, Holm-corrected interval, verdict) for val bpb and
# for the router metric. The CPU contrasts are the same comparisons at CPU scale; the dense vs
# MoE table there is MoE minus dense, as here.
CLAIMS = [
    ("MoE vs dense at equal active parameters", "moe", "dense", None,
     "dense_vs_moe.md", ("-0.066", "[-0.137, +0.004]", "within noise"), None),
    ("aux loss: alpha 0 against 0.01", "alpha0", "moe", ("imbalance", "imbalance max/mean"),
     "aux_alpha_sweep_vs_aux_alpha=0.01.md", ("+0.050", "[-0.020, +0.120]", "within noise"),
     ("+1.600", "[+1.171, +2.029]", "beyond noise")),
    ("z-loss: beta 0.1 against 0.001", "zloss0.1", "moe", ("z_loss", "router z-loss (mean lse^2)"),
     "zloss_sweep_vs_z_loss=0.001.md", ("+0.174", "[+0.063, +0.285]", "beyond noise"),
     ("-1.339", "[-1.562, -1.116]", "beyond noise")),
    ("top-k: k = 1 against k = 2", "k1", "moe", None,
     "topk.md", ("+0.053", "[+0.013, +0.093]", "beyond noise"), None),
    ("capacity (top-1): cf 1.0 against dropless", "k1_cf1", "k1", ("drop_fraction", "drop fraction"),
     "capacity.md", ("+0.021", "[-0.046, +0.089]", "within noise"), ("+0.0844", "[+0.0758, +0.0929]", "beyond noise")),
    ("routing policy: aux-loss-free bias against top-k with aux loss", "aux_free_bias", "moe",
     ("imbalance", "imbalance max/mean"),
     "routing_policy.md", ("+0.028", "[-0.046, +0.103]", "within noise"), ("-0.101", "[-0.146, -0.057]", "beyond noise")),
]


def bold(verdict):
    return "**{}**".format(verdict) if verdict == "beyond noise" else verdict


def fmt(metric, v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "{:+.4f}".format(v) if metric == "drop_fraction" else "{:+.3f}".format(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--alpha", type=float, default=0.05)
    a = ap.parse_args(argv)
    try:
        runs = reader.find_runs(a.study_dir)
    except reader.RunLogError as e:
        print("gpu_claims: {}".format(e), file=sys.stderr)
        return 2
    study = studies.group_study(runs)
    missing = sorted({p for c in CLAIMS for p in (c[1], c[2])} - set(study.points))
    if missing:
        print("gpu_claims: grid points missing from {}: {}".format(a.study_dir, ", ".join(missing)), file=sys.stderr)
        return 2
    sums = {id(r): summary.summarize_run(r) for p in study.points for r in study.runs[p].values()}

    def pairs(metric, contrast, base):
        mine = {s: float(sums[id(r)][metric]) for s, r in study.runs[contrast].items()}
        ref = {s: float(sums[id(r)][metric]) for s, r in study.runs[base].items()}
        common = sorted(set(mine) & set(ref))
        return [mine[s] for s in common], [ref[s] for s in common]

    val = stats.compare({c[0]: pairs("val_bpb", c[1], c[2]) for c in CLAIMS}, alpha=a.alpha)
    router_claims = [c for c in CLAIMS if c[3]]
    rout = stats.compare({c[0]: pairs(c[3][0], c[1], c[2]) for c in router_claims}, alpha=a.alpha)
    rout_by = {c.name: c for c in rout}
    seeds = sorted({s for p in study.points for s in study.runs[p]})
    steps = {summary.summarize_run(r)["steps"] for p in study.points for r in study.runs[p].values()}
    r0 = study.runs[study.points[0]][seeds[0]]
    tokens = max(steps) * float(r0.cfg("train.batch", 32)) * float(r0.cfg("train.seq", 512))

    def verdict(c):
        if c.lo == c.hi == c.test.mean:
            return "identical"
        return "**beyond noise**" if (c.lo > 0 or c.hi < 0) else "within noise"

    def direction(cpu_diff, c):
        d = float(cpu_diff)
        return "yes" if (d > 0) == (c.test.mean > 0) else "**no**"

    os.makedirs(a.out, exist_ok=True)
    lines = ["# The CPU findings at GPU scale (issue 13 part 4)", "",
             "GPU: `experiments/configs/gpu/seeded_gpu.ini` (21.4M parameters, 48x the CPU presets; Brown + "
             "nlp-corpus; bf16 on one H200), seeds {}, {} steps = {:.1f}M tokens = {:.2f} epochs of the corpus's "
             "13,490,576 training bytes (experiments/gpu/make_gpu_corpus.py). CPU: the 5-seed studies of "
             "[docs/results/seeded/](../seeded/). Each cell: contrast minus baseline, paired by seed, mean "
             "[Holm-corrected interval] and verdict; GPU Holm over the claims of each metric ({} on val bpb, {} on "
             "router metrics), CPU Holm over its study's comparisons. With 3 seeds a paired t-interval has 2 "
             "degrees of freedom (t = 4.30): only large, consistent differences can be beyond noise.".format(
                 ", ".join(map(str, seeds)), "/".join(str(s) for s in sorted(steps)), tokens / 1e6,
                 tokens / TRAIN_BYTES, len(val), len(rout)),
             "",
             "| claim | metric | CPU, 5 seeds | GPU, {} seeds | same direction | GPU / CPU size |".format(len(seeds)),
             "|---|---|---|---|---|---|"]
    for c, vc in zip(CLAIMS, val):
        cpu = c[5]
        lines.append("| {} (`{}` - `{}`) | val bpb | {} {} {} ([table](../seeded/{})) | {} [{}, {}] {} | {} | {:.2f} |".format(
            c[0], c[1], c[2], cpu[0], cpu[1], bold(cpu[2]), c[4], fmt("val_bpb", vc.test.mean), fmt("val_bpb", vc.lo),
            fmt("val_bpb", vc.hi), verdict(vc), direction(cpu[0], vc), vc.test.mean / float(cpu[0])))
        if c[3]:
            rc = rout_by[c[0]]
            m = c[3][0]
            lines.append("| | {} | {} {} {} | {} [{}, {}] {} | {} | {:.2f} |".format(
                c[3][1], c[6][0], c[6][1], bold(c[6][2]), fmt(m, rc.test.mean), fmt(m, rc.lo), fmt(m, rc.hi),
                verdict(rc), direction(c[6][0], rc), rc.test.mean / float(c[6][0])))
    lines += ["", "![val bpb differences, CPU and GPU](claims.png)", ""]
    with open(os.path.join(a.out, "claims.md"), "w") as f:
        f.write("\n".join(lines))

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (c, vc) in enumerate(zip(CLAIMS, val)):
        lo, hi = (float(x) for x in c[5][1].strip("[]").split(","))
        d = float(c[5][0])
        ax.errorbar([d], [i + 0.15], xerr=[[d - lo], [hi - d]], fmt="o", color="tab:gray", capsize=3,
                    label="CPU, 5 seeds" if i == 0 else None)
        ax.errorbar([vc.test.mean], [i - 0.15], xerr=[[vc.test.mean - vc.lo], [vc.hi - vc.test.mean]], fmt="s",
                    color="tab:blue", capsize=3, label="GPU, {} seeds".format(len(seeds)) if i == 0 else None)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(CLAIMS)))
    ax.set_yticklabels(["{} - {}".format(c[1], c[2]) for c in CLAIMS], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("final val bpb, contrast minus baseline (Holm-corrected interval)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "claims.png"), dpi=120)
    plt.close(fig)
    print(os.path.join(a.out, "claims.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
