"""Seeded studies: runs grouped by grid point and seed, and the statistics report.md shows.

A study (moelab `train.seeds`, with or without a [sweep]) writes one log per (grid point, seed)
and a sweep.json that names each run's grid point ("point") and seed (reader.find_runs puts
them on Run.point and Run.seed). Without that index the grouping is inferred: runs whose
configs differ in train.seed and otherwise agree on the swept keys are one grid point.

    study = group_study(runs)                     Study: points in order, runs by point and seed
    table = point_table(study, summaries)         per point and metric: stats.MeanCI over seeds
    comps = baseline_comparisons(study, summaries, baseline)
                                                  per metric: stats.Comparison of every other
                                                  point against the baseline, Holm over them
    markdown_tables(study, summaries, baseline)   the tables of report.md (and docs/results/)

The Holm family is one metric's comparisons: the m = (points - 1) differences from the baseline
of, say, validation bpb are corrected together; each metric is its own question.
"""
from __future__ import annotations

from ._deps import require as _require

_require(("numpy", "scipy"))

import math  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence, Tuple  # noqa: E402

from . import stats  # noqa: E402
from .summary import SUMMARY_COLUMNS  # noqa: E402

SEED_KEY = "train.seed"
# The metrics of a seeded study: every summary column but the step count.
STUDY_METRICS = [(k, h) for k, h in SUMMARY_COLUMNS if k != "steps"]
# Lower is better for these (shown in the comparison tables' captions).
LOWER_IS_BETTER = {"train_bpb", "val_bpb", "imbalance", "cv", "drop_fraction"}


@dataclass
class Study:
    """Runs of a seeded study grouped by grid point. points keeps the sweep's order."""

    points: List[str]
    runs: Dict[str, Dict[int, Any]]              # point -> seed -> Run
    values: Dict[str, Dict[str, Any]] = field(default_factory=dict)   # point -> swept values
    baseline: Optional[str] = None               # from sweep.json, if it names one
    planned_runs: Optional[int] = None           # from sweep.json
    notes: List[str] = field(default_factory=list)

    @property
    def seeds(self) -> List[int]:
        out: List[int] = []
        for by_seed in self.runs.values():
            out += [s for s in by_seed if s not in out]
        return sorted(out)

    @property
    def n_runs(self) -> int:
        return sum(len(v) for v in self.runs.values())

    def seeds_of(self, point: str) -> List[int]:
        return sorted(self.runs.get(point, {}))


def _point_label(swept: Dict[str, Any]) -> str:
    parts = []
    for k, v in swept.items():
        if k == SEED_KEY:
            continue
        leaf = k.split(".")[-1]
        parts.append(str(v) if k == "variant" else "{}={}".format(leaf, "{:g}".format(v) if isinstance(v, float) else v))
    return "_".join(parts) or "base"


def is_seeded(runs: Sequence[Any]) -> bool:
    """True when the runs form a seeded study: an index named their seeds, or some grid point
    (the runs equal in everything swept but train.seed) holds runs of two or more seeds."""
    if any(getattr(r, "seed", None) is not None and getattr(r, "point", None) is not None for r in runs):
        return True
    groups: Dict[str, set] = {}
    for r in runs:
        seed = r.cfg(SEED_KEY)
        if seed is None:
            continue
        groups.setdefault(_point_label(r.swept), set()).add(seed)
    return any(len(s) > 1 for s in groups.values())


def group_study(runs: Sequence[Any], baseline: Optional[str] = None) -> Study:
    """Group runs by grid point and seed (Run.point / Run.seed from sweep.json, else inferred).

    Two runs of one grid point with the same seed are a mistake (a copied log?): the later one
    is left out with a note. `baseline` overrides the index's."""
    points: List[str] = []
    by_point: Dict[str, Dict[int, Any]] = {}
    values: Dict[str, Dict[str, Any]] = {}
    notes: List[str] = []
    index_baseline = None
    planned = None
    for r in runs:
        point = getattr(r, "point", None)
        seed = getattr(r, "seed", None)
        if not point:  # not indexed, or a study of seeds alone (point "")
            point = _point_label(r.swept)
        if seed is None:
            seed = r.cfg(SEED_KEY)
        if seed is None:
            notes.append("{}: no train.seed in its config; left out".format(r.name))
            continue
        seed = int(seed)
        if point not in by_point:
            points.append(point)
            by_point[point] = {}
            values[point] = {k: v for k, v in r.swept.items() if k != SEED_KEY}
        if seed in by_point[point]:
            notes.append("{}: a second run of {} with seed {} ({}); left out".format(
                r.name, point, seed, by_point[point][seed].name))
            continue
        by_point[point][seed] = r
        index_baseline = index_baseline or getattr(r, "index_baseline", None)
        planned = planned or getattr(r, "planned_runs", None)
    # The sweep's grid order when the index gives it (the runs come sorted by swept values).
    grid = next((list(r.index_points) for r in runs if getattr(r, "index_points", None)), [])
    first_seen = {p: i for i, p in enumerate(points)}
    points.sort(key=lambda p: (grid.index(p) if p in grid else len(grid), first_seen[p]))
    study = Study(points=points, runs=by_point, values=values, baseline=baseline or index_baseline,
                  planned_runs=planned, notes=notes)
    if study.baseline is not None and study.baseline not in by_point:
        raise ValueError("baseline {!r} is not a grid point of this study (grid points: {})".format(
            study.baseline, ", ".join(points)))
    return study


def _metric_by_seed(study: Study, summaries: Dict[int, dict], point: str, metric: str) -> Dict[int, float]:
    """seed -> the run's final metric; summaries maps id(run) -> summarize_run(run)."""
    return {seed: float(summaries[id(run)].get(metric, math.nan)) for seed, run in study.runs[point].items()}


def point_table(study: Study, summaries: Dict[int, dict], metrics=None, level: float = 0.95):
    """{point: {metric: stats.MeanCI over the point's seeds}}."""
    metrics = metrics or [k for k, _ in STUDY_METRICS]
    return {p: {m: stats.mean_ci(list(_metric_by_seed(study, summaries, p, m).values()), level)
                for m in metrics} for p in study.points}


def baseline_comparisons(study: Study, summaries: Dict[int, dict], baseline: str, metrics=None,
                         alpha: float = 0.05) -> Dict[str, List[stats.Comparison]]:
    """{metric: [Comparison of each other point against `baseline`, paired by seed, Holm over
    the points]}. Only seeds that both points ran are paired."""
    if baseline not in study.runs:
        raise ValueError("baseline {!r} is not a grid point (grid points: {})".format(
            baseline, ", ".join(study.points)))
    metrics = metrics or [k for k, _ in STUDY_METRICS]
    others = [p for p in study.points if p != baseline]
    out: Dict[str, List[stats.Comparison]] = {}
    for m in metrics:
        base = _metric_by_seed(study, summaries, baseline, m)
        pairs = {}
        for p in others:
            mine = _metric_by_seed(study, summaries, p, m)
            common = sorted(set(mine) & set(base))
            pairs[p] = ([mine[s] for s in common], [base[s] for s in common])
        comps = stats.compare(pairs, alpha=alpha)
        for c in comps:
            c.metric = m
        out[m] = comps
    return out


# --------------------------------------------------------------------------------------------
# Markdown


def _fmt(metric: str, v: float, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    digits = 4 if metric == "drop_fraction" else 3
    if v != 0 and abs(v) < 0.5 * 10 ** -digits:  # too small for the fixed decimals: show it
        return ("{:+.1e}" if signed else "{:.1e}").format(v)
    return (("{:+.%df}" if signed else "{:.%df}") % digits).format(v)


def _fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "-"
    if p == 0:
        return "0 (exact)"
    return "{:.2g}".format(p) if p < 0.001 else "{:.3f}".format(p)


def cell_mean_ci(metric: str, ci: stats.MeanCI) -> str:
    """"2.946 [2.931, 2.961]" (mean [95% CI]); one seed: the value alone."""
    if ci.n == 0:
        return "-"
    if ci.n == 1:
        return _fmt(metric, ci.mean)
    return "{} [{}, {}]".format(_fmt(metric, ci.mean), _fmt(metric, ci.lo), _fmt(metric, ci.hi))


def _row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def markdown_tables(study: Study, summaries: Dict[int, dict], baseline: Optional[str] = None,
                    alpha: float = 0.05, metrics=None, heading: str = "##") -> List[str]:
    """The seeded tables as Markdown lines: one row per grid point with mean [95% CI] of every
    metric, then, per metric, the paired differences against the baseline."""
    metrics = metrics or STUDY_METRICS
    keys = [k for k, _ in metrics]
    baseline = baseline or study.baseline or (study.points[0] if study.points else None)
    chosen = "named by the study's sweep.json" if (study.baseline and baseline == study.baseline) else (
        "chosen with --baseline" if baseline != (study.points[0] if study.points else None) else
        "the first grid point (no baseline named)")
    level = 1.0 - alpha
    md: List[str] = []
    seeds = study.seeds
    md.append("{} Across seeds".format(heading))
    md.append("")
    md.append("{} grid point{} x seeds {} ({} runs{}). Each cell: mean over seeds [{:.0%} t-interval of "
              "the mean]; n = seeds with a value.".format(
                  len(study.points), "" if len(study.points) == 1 else "s", ", ".join(str(s) for s in seeds),
                  study.n_runs,
                  "" if not study.planned_runs or study.planned_runs == study.n_runs else
                  " of {} planned: the study is incomplete".format(study.planned_runs), level))
    md.append("")
    table = point_table(study, summaries, keys, level)
    md.append(_row(["grid point", "n"] + [h for _, h in metrics]))
    md.append("|" + "---|" * (len(metrics) + 2))
    for p in study.points:
        n = max((table[p][k].n for k in keys), default=0)
        name = "**{}** (baseline)".format(p) if p == baseline else p
        md.append(_row([name, n] + [cell_mean_ci(k, table[p][k]) for k in keys]))
    md.append("")
    for note in study.notes:
        md.append("- note: " + note)
    if study.notes:
        md.append("")
    if baseline is None or len(study.points) < 2:
        return md
    comps = baseline_comparisons(study, summaries, baseline, keys, alpha)
    # Seed noise: what a comparison of single runs would have to beat.
    md.append("Seed noise: the seed-to-seed standard deviation of each metric pooled over the grid "
              "points, and the standard deviation of a single-seed difference from the baseline "
              "(the paired differences' sd, pooled over the comparisons).")
    md.append("")
    md.append(_row(["metric", "pooled sd over seeds", "sd of a one-seed difference"]))
    md.append("|---|---|---|")
    for k, header in metrics:
        by_point = {p: _metric_by_seed(study, summaries, p, k) for p in study.points}
        ns = stats.noise_summary(by_point)
        ss = sum(c.test.sd ** 2 * (c.test.n - 1) for c in comps[k] if c.test.n >= 2)
        dof = sum(c.test.n - 1 for c in comps[k] if c.test.n >= 2)
        if ns["dof"] == 0 and dof == 0:
            continue
        md.append(_row([header, _fmt(k, ns["pooled_sd"]), _fmt(k, math.sqrt(ss / dof) if dof else math.nan)]))
    md.append("")
    m = len(study.points) - 1
    md.append("{} Differences from the baseline `{}`".format(heading, baseline))
    md.append("")
    md.append("Baseline {}. Per metric, each grid point minus the baseline, paired by seed: mean "
              "difference, its {:.0%} t-interval, the paired t-test's two-sided p, Holm's adjusted p over "
              "the {} comparison{} of that metric, and the Holm-compatible (corrected) interval, at "
              "level 1 - {:g} p / p_Holm, which excludes 0 exactly when p_Holm < {:g}: then the difference "
              "is **beyond noise**.".format(chosen, level, m, "s" if m != 1 else "", alpha, alpha))
    md.append("")
    for k, header in metrics:
        rows = comps[k]
        if all(c.test.n == 0 for c in rows):
            continue
        better = " (lower is better)" if k in LOWER_IS_BETTER else ""
        md.append("**{}**{}".format(header, better))
        md.append("")
        md.append(_row(["grid point", "n", "difference", "{:.0%} interval".format(level), "p",
                        "p (Holm)", "corrected interval", "verdict"]))
        md.append("|" + "---|" * 8)
        for c in rows:
            t = c.test
            md.append(_row([c.name, t.n, _fmt(k, t.mean, signed=True),
                            "[{}, {}]".format(_fmt(k, t.lo, True), _fmt(k, t.hi, True)) if t.n >= 2 else "-",
                            _fmt_p(t.p), _fmt_p(c.p_holm),
                            "[{}, {}]".format(_fmt(k, c.lo, True), _fmt(k, c.hi, True)) if t.n >= 2 else "-",
                            "**{}**".format(c.verdict) if c.beyond_noise else c.verdict]))
        md.append("")
    return md
