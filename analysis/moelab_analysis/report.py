"""Reports over run logs: the PNGs of plots.py plus DIR/report.md that embeds them.

    write_report(["runs/quickstart.h5"], "out/")         one run: plots in out/
    write_report(["runs/sweep/"], "out/")                 a sweep: comparison and overlays in
                                                          out/, each run's plots in out/runs/NAME/

report.md links every image by a path relative to itself, and opens with a summary table (see
summary.py for what "final" means). The command line is analysis/report.py (main() here).

A seeded study (moelab train.seeds: one log per grid point and seed) gets, before the per-run
table, the statistics of studies.py: per grid point and metric the mean over seeds with its 95%
t-interval, and per metric the paired differences from a baseline grid point (the study's
sweep.baseline, or `baseline=`) with t-intervals, p-values, Holm's correction and a "beyond noise"
verdict; its plots show every grid point's mean with a band across seeds. The same tables go to
out_dir/tables.md alone (no images), the form docs/results/ keeps.
"""
from __future__ import annotations

from ._deps import require as _require

_require()

import argparse  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional, Sequence, Tuple, Union  # noqa: E402

from . import __version__, plots, studies  # noqa: E402
from .reader import Run, RunLogError, find_runs, infer_swept, load_all  # noqa: E402
from .summary import SUMMARY_COLUMNS, format_value, summarize_run  # noqa: E402

PathLike = Union[str, Path]


def collect_runs(inputs: Sequence[PathLike]) -> List[Run]:
    """Load runs from files and sweep directories; swept values inferred across all of them."""
    if not inputs:
        raise RunLogError("no input: give one or more run logs (.h5) or a sweep directory")
    runs: List[Run] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            runs.extend(find_runs(p))
        else:
            runs.extend(load_all(p))
    if len(runs) > 1:
        infer_swept(runs)
    return runs


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")
    return s or "run"


def _unique_slugs(runs: Sequence[Run]) -> List[str]:
    seen: Dict[str, int] = {}
    out = []
    for r in runs:
        base = _slug(r.name)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else "{}_{}".format(base, seen[base]))
    return out


def run_plots(run: Run, out_dir: Path) -> List[Tuple[str, Path]]:
    """Every per-run plot into out_dir; returns [(caption, path)] in report order."""
    out: List[Tuple[str, Optional[Path]]] = []
    out.append(("Loss (train and validation, bits per byte)", plots.plot_loss_curves(run, out_dir / "loss.png")))
    if run.layers:
        out.append(("Load imbalance per layer (max/mean and CV of routed counts)",
                    plots.plot_load_imbalance(run, out_dir / "imbalance.png")))
        out.append(("Router statistics per layer",
                    plots.plot_router_stats(run, out_dir / "router_stats.png")))
    for idx in run.layers:
        out.append(("Layer {:02d}: expert load (routed / mean)".format(idx),
                    plots.plot_expert_load(run, idx, out_dir / "load_layer_{:02d}.png".format(idx))))
        out.append(("Layer {:02d}: kept after capacity".format(idx),
                    plots.plot_kept_load(run, idx, out_dir / "kept_layer_{:02d}.png".format(idx))))
    out.append(("Communication per rank (all-to-all volume, seconds; runs on several ranks)",
                plots.plot_parallel_comm(run, out_dir / "parallel_comm.png")))
    out.append(("Expert specialisation over training",
                plots.plot_specialization_over_time(run, out_dir / "specialization_over_time.png")))
    for idx in run.layers:
        out.append(("Layer {:02d}: expert x category at the last evaluation".format(idx),
                    plots.plot_specialization(run, idx, out_dir / "specialization_layer_{:02d}.png".format(idx))))
    return [(c, p) for c, p in out if p is not None]


def _config_line(run: Run) -> str:
    keys = ["model.experts", "model.top_k", "model.layers", "router.policy", "router.aux_alpha",
            "router.z_loss", "router.capacity_factor", "train.steps", "train.batch", "train.seq",
            "data.source"]
    parts = ["{}={}".format(k, run.flat_config[k]) for k in keys if k in run.flat_config]
    head = "backend `{}`, moelab {}".format(run.backend or "?", run.moelab_version or "?")
    return head + ("; " + ", ".join(parts) if parts else "")


def _cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, no line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(runs: Sequence[Run], summaries: Sequence[dict]) -> List[str]:
    swept_keys: List[str] = []
    for r in runs:
        for k in r.swept:
            if k not in swept_keys:
                swept_keys.append(k)
    header = [_cell(h) for h in ["run"] + swept_keys + [h for _, h in SUMMARY_COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r, s in zip(runs, summaries):
        cells = ["`{}`".format(r.name)] + [str(r.swept.get(k, "")) for k in swept_keys]
        cells += [format_value(k, s.get(k)) for k, _ in SUMMARY_COLUMNS]
        cells = [_cell(c) for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _img(caption: str, path: Path, base: Path) -> str:
    rel = os.path.relpath(str(path), str(base)).replace(os.sep, "/")
    return "![{}]({})".format(caption, rel)


def write_report(inputs: Sequence[PathLike], out_dir: PathLike, summary_only: bool = False,
                 title: Optional[str] = None, window_frac: float = 0.1, baseline: Optional[str] = None,
                 alpha: float = 0.05) -> Tuple[Path, List[Path]]:
    """Write the plots and out_dir/report.md; return (report path, plot paths).

    Raises RunLogError for unreadable input (and a baseline that is no grid point). summary_only
    skips the per-run plots of a multi-run report (the comparison plots and the tables stay).
    baseline: the grid point a seeded study is compared with (default: the study's own, else
    its first grid point); alpha: the family-wise error rate of Holm's correction.
    """
    runs = collect_runs(inputs)
    out = Path(out_dir)
    summaries = [summarize_run(r, window_frac) for r in runs]
    multi = len(runs) > 1
    study = None
    if multi and studies.is_seeded(runs):
        try:
            study = studies.group_study(runs, baseline=baseline)
        except ValueError as exc:
            raise RunLogError(str(exc)) from exc
    elif baseline is not None:
        raise RunLogError("--baseline {!r}: these runs are no seeded study (train.seeds), so there is "
                          "nothing to compare over seeds".format(baseline))
    out.mkdir(parents=True, exist_ok=True)
    pngs: List[Path] = []
    md: List[str] = []
    md.append("# moelab report{}".format(": " + title if title else ""))
    md.append("")
    md.append("Inputs: " + ", ".join("`{}`".format(i) for i in inputs) + ".  ")
    md.append("Generated {} by `analysis/report.py` (moelab_analysis {}).".format(
        datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), __version__))
    md.append("")
    if study is not None:
        by_id = {id(r): sm for r, sm in zip(runs, summaries)}
        base = study.baseline or study.points[0]
        tables = studies.markdown_tables(study, by_id, baseline=base, alpha=alpha)
        md.extend(tables)
        command = "analysis/report.py {}{}{}".format(
            " ".join(str(i) for i in inputs), "" if baseline is None else " --baseline " + baseline,
            "" if alpha == 0.05 else " --alpha {:g}".format(alpha))
        (out / "tables.md").write_text("# {}\n\nInputs: {}. Final metrics: train bpb and router columns are "
                                       "means over the last {:.0%} of logged steps, val bpb the last evaluation "
                                       "(see report.md). Made by `{}` (moelab_analysis {}).\n\n"
                                       .format(title or "seeded study", ", ".join("`{}`".format(i) for i in inputs),
                                               window_frac, command, __version__)
                                       + "\n".join(tables) + "\n")
        md.append("### Across seeds: plots")
        md.append("")
        for caption, path in [
                ("Final metrics per grid point over seeds",
                 plots.plot_seeded_comparison(study, by_id, out / "seeded_comparison.png", baseline=base)),
                ("Loss per grid point, band across seeds", plots.plot_seeded_loss(study, out / "seeded_loss.png")),
                ("Router statistics per grid point, band across seeds",
                 plots.plot_seeded_router(study, out / "seeded_router.png"))]:
            pngs.append(path)
            md.append("#### " + caption)
            md.append("")
            md.append(_img(caption, path, out))
            md.append("")
    md.append("## Summary" if study is None else "## Every run")
    md.append("")
    md.extend(_table(runs, summaries))
    md.append("")
    md.append("Train bpb and router columns are means over the last {:.0%} of logged steps; val bpb "
              "is the last evaluation. bpb = loss in nats / (ln 2 x bytes per token). Imbalance "
              "(max/mean) and CV are of routed counts (before capacity), averaged over MoE layers; "
              "the drop fraction is 1 - kept/routed pooled over layers; logit RMS is averaged and "
              "max |logit| maximised over layers.".format(window_frac))
    md.append("")
    notes = [(r, w) for r in runs for w in r.warnings]
    if notes:
        md.append("### Warnings while reading")
        md.append("")
        md.extend("- `{}`: {}".format(r.name, w) for r, w in notes)
        md.append("")

    if multi and study is None:  # a seeded study has its own plots (above)
        md.append("## Comparison across runs")
        md.append("")
        for caption, fn, name in [
                ("Final metrics against the swept value", plots.plot_sweep_comparison, "sweep_comparison.png"),
                ("Loss across runs", plots.plot_overlay_loss, "overlay_loss.png"),
                ("Router statistics across runs", plots.plot_overlay_router, "overlay_router.png")]:
            path = fn(runs, out / name)
            pngs.append(path)
            md.append("### " + caption)
            md.append("")
            md.append(_img(caption, path, out))
            md.append("")

    if not multi or not summary_only:
        slugs = _unique_slugs(runs)
        for run, slug in zip(runs, slugs):
            rdir = out if not multi else out / "runs" / slug
            md.append("## Run `{}`{}".format(run.name, " ({})".format(run.label) if run.swept else ""))
            md.append("")
            md.append("File `{}`{}; {}.".format(run.path, "" if run.group in ("", "/") else
                                                  " group `{}`".format(run.group), _config_line(run)))
            md.append("")
            for caption, path in run_plots(run, rdir):
                pngs.append(path)
                md.append("### " + caption)
                md.append("")
                md.append(_img(caption, path, out))
                md.append("")
            if not any(l.has_categories for l in run.layer_list):
                md.append("_No expert-by-category counts in this log (optional "
                          "`/router/layer_XX/category_counts`), so no specialisation plots._")
                md.append("")
    report = out / "report.md"
    report.write_text("\n".join(md) + "\n")
    return report, pngs


def _print_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write("warning: {}\n".format(message))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="report.py",
        description="Plots and a Markdown report (report.md) over moelab HDF5 run logs.")
    ap.add_argument("inputs", nargs="+", metavar="RUN.h5|SWEEP_DIR",
                    help="run logs and/or sweep directories (all *.h5 inside, sweep.json if present)")
    ap.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    ap.add_argument("--title", default=None, help="report title")
    ap.add_argument("--summary-only", action="store_true",
                    help="with several runs: only the table and comparison plots, no per-run plots")
    ap.add_argument("--window", type=float, default=0.1, metavar="FRAC",
                    help="fraction of the last logged steps averaged for 'final' numbers (default 0.1)")
    ap.add_argument("--baseline", default=None, metavar="POINT",
                    help="seeded study: the grid point the others are compared with (default: the "
                         "study's sweep.baseline, else its first grid point)")
    ap.add_argument("--alpha", type=float, default=0.05, metavar="A",
                    help="seeded study: family-wise error rate of Holm's correction (default 0.05)")
    args = ap.parse_args(argv)
    if not 0 < args.window <= 1:
        ap.error("--window must be in (0, 1]")
    if not 0 < args.alpha < 1:
        ap.error("--alpha must be in (0, 1)")
    warnings.showwarning = _print_warning
    try:
        report, pngs = write_report(args.inputs, args.out, summary_only=args.summary_only,
                                    title=args.title, window_frac=args.window, baseline=args.baseline,
                                    alpha=args.alpha)
    except RunLogError as exc:
        sys.stderr.write("error: {}\n".format(exc))
        return 2
    except OSError as exc:
        sys.stderr.write("error: cannot write the report: {}\n".format(exc))
        return 1
    print(report)
    for p in pngs:
        print(p)
    return 0
