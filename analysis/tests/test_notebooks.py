"""Notebooks: present, valid, committed without outputs (executing them is run_tests.sh's job)."""
import json
import subprocess
import sys

import pytest

from conftest import ANALYSIS, REPO

NOTEBOOKS = ["router_stats.ipynb", "sweep_comparison.ipynb", "specialization.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_clean_and_valid(name):
    nbformat = pytest.importorskip("nbformat")
    path = REPO / "notebooks" / name
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    source = "\n".join(c.source for c in code)
    assert ("MOELAB_SWEEP" if name.startswith("sweep") else "MOELAB_RUN") in source
    assert "runs/quickstart.h5" in source or "runs/sweep" in source
    assert "_deps.require()" in source                       # wrong kernel -> clear message


def test_check_notebooks_flags_outputs(tmp_path):
    src = json.loads((REPO / "notebooks" / NOTEBOOKS[0]).read_text())
    dirty = tmp_path / "dirty.ipynb"
    first_code = next(c for c in src["cells"] if c["cell_type"] == "code")
    first_code["execution_count"] = 3
    first_code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
    dirty.write_text(json.dumps(src))
    script = str(ANALYSIS / "check_notebooks.py")
    res = subprocess.run([sys.executable, script, str(dirty)], capture_output=True, text=True)
    assert res.returncode == 1
    assert "has 1 output(s)" in res.stderr and "execution_count is 3" in res.stderr
    res = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr


def test_seeded_study_notebook_clean_and_valid():
    """The seeded-study notebook: clean, valid, reads MOELAB_SEEDED_SWEEP, else writes a synthetic
    seeded study, and checks the kernel's interpreter."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(str(REPO / "notebooks" / "seeded_study.ipynb"), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    source = "\n".join(c.source for c in code)
    for needed in ["MOELAB_SEEDED_SWEEP", "write_synthetic_seeded_sweep", "_deps.require()",
                   "stats.compare", "studies.markdown_tables", "plot_seeded_loss"]:
        assert needed in source


def test_expert_weights_notebook_clean_and_valid():
    """The expert-weights notebook: clean, valid, reads MOELAB_CHECKPOINTS, else the quickstart's
    checkpoints, else writes synthetic ones, and checks the kernel's interpreter."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(str(REPO / "notebooks" / "expert_weights.ipynb"), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    source = "\n".join(c.source for c in code)
    for needed in ["MOELAB_CHECKPOINTS", "runs/quickstart_checkpoints", "write_synthetic_checkpoints",
                   "_deps.require()", "load_checkpoint", "expert_weight_trajectory",
                   "plot_expert_similarity", "plot_expert_weights_over_training"]:
        assert needed in source
