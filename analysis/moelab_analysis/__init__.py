"""moelab_analysis: readers, metrics, plots and reports over moelab's HDF5 run logs and checkpoints.

Run with Debian's interpreter /usr/bin/python3 (numpy, h5py and matplotlib come from Debian
packages). Importing this package never needs them; the submodules check on import and raise
MissingDependencyError (an ImportError) with a message that names the fix.

Modules:
    reader     load_run, list_layers, find_runs, Run, RouterLayer, RunLogError
    metrics    load_imbalance, coefficient_of_variation, drop_fraction, mutual_information,
               source_recovery, bits_per_byte (pure numpy)
    summary    summarize_run: the final numbers of a run (report table, sweep plots)
    stats      mean_ci, paired_t, holm, compare: statistics over seeds (numpy, scipy)
    studies    group_study, point_table, baseline_comparisons: seeded studies (train.seeds)
    plots      one PNG per function (matplotlib, Agg canvas, no pyplot state)
    report     write_report: PNGs plus report.md (CLI: analysis/report.py)
    synthetic  write_synthetic_run / write_synthetic_sweep: fake logs that follow the contract;
               write_synthetic_checkpoints: fake checkpoints of one run
    checkpoint load_checkpoint, write_checkpoint, list_checkpoints: moelab checkpoints
               (safetensors) in numpy with every checksum verified; expert-weight measures
               (expert_cosine_similarity, router_weight_norms, expert_weight_trajectory)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names resolved lazily (PEP 562), so `import moelab_analysis._deps` works on any
# interpreter and the dependency check can speak before numpy is imported.
_LAZY = {
    "load_run": "reader", "list_layers": "reader", "find_runs": "reader", "Run": "reader",
    "RouterLayer": "reader", "RunLogError": "reader", "RunLogWarning": "reader",
    "infer_swept": "reader",
    "load_imbalance": "metrics", "coefficient_of_variation": "metrics",
    "drop_fraction": "metrics", "mutual_information": "metrics",
    "source_recovery": "metrics", "bits_per_byte": "metrics",
    "summarize_run": "summary",
    "mean_ci": "stats", "paired_t": "stats", "holm": "stats",
    "group_study": "studies",
    "write_report": "report",
    "write_synthetic_run": "synthetic", "write_synthetic_sweep": "synthetic",
    "write_synthetic_seeded_sweep": "synthetic", "write_synthetic_checkpoints": "synthetic",
    "load_checkpoint": "checkpoint", "write_checkpoint": "checkpoint",
    "list_checkpoints": "checkpoint", "CheckpointError": "checkpoint",
    "expert_cosine_similarity": "checkpoint", "router_weight_norms": "checkpoint",
    "expert_weight_trajectory": "checkpoint",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module("." + _LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError("module {!r} has no attribute {!r}".format(__name__, name))


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
