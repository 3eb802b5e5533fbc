"""Shared fixtures: analysis/ on sys.path, synthetic logs in tmp dirs."""
import os
import sys
from pathlib import Path

ANALYSIS = Path(__file__).resolve().parents[1]
REPO = ANALYSIS.parent
sys.path.insert(0, str(ANALYSIS))
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

from moelab_analysis import synthetic  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory):
    """A 2-layer, 8-expert run with capacity on and byte categories."""
    path = tmp_path_factory.mktemp("run") / "run.h5"
    return synthetic.write_synthetic_run(path, layers=2, experts=8, steps=120, eval_every=20,
                                         capacity_factor=1.25, seed=1)


@pytest.fixture(scope="session")
def synthetic_sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep") / "sweep"
    synthetic.write_synthetic_sweep(d, key="router.aux_alpha", values=[0.0, 0.01, 0.1],
                                    steps=80, eval_every=20, capacity_factor=1.25)
    return d
