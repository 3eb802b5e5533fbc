"""report.py end to end (as a subprocess, the way people run it) and its errors."""
import re
import subprocess
import sys

import h5py
import pytest

from conftest import ANALYSIS, REPO

REPORT = ANALYSIS / "report.py"


def run_report(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPORT), *map(str, args)], cwd=str(cwd),
                          capture_output=True, text=True, timeout=300)


def _images(md_text):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_text)


def test_report_single_run(tmp_path, synthetic_run):
    out = tmp_path / "out"
    res = run_report(synthetic_run, "--out", out)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split()
    assert lines[0] == str(out / "report.md")
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 6
    assert {str(p) for p in pngs} == set(lines[1:])
    md = (out / "report.md").read_text()
    refs = _images(md)
    assert len(refs) == len(pngs)
    for ref in refs:
        assert not ref.startswith("/"), "image paths must be relative"
        assert (out / ref).is_file()
    for name in ["loss.png", "imbalance.png", "router_stats.png", "load_layer_00.png",
                 "kept_layer_00.png", "specialization_layer_01.png"]:
        assert name in refs
    assert "final val bpb" in md and "`run`" in md
    assert all(p.stat().st_size > 10_000 for p in pngs)      # real pictures, not empty canvases


def test_report_sweep_dir(tmp_path, synthetic_sweep):
    out = tmp_path / "sweep_out"
    res = run_report(synthetic_sweep, "--out", out, "--title", "aux sweep")
    assert res.returncode == 0, res.stderr
    md = (out / "report.md").read_text()
    refs = _images(md)
    assert len(refs) >= 6
    for name in ["sweep_comparison.png", "overlay_loss.png", "overlay_router.png"]:
        assert name in refs
    for ref in refs:
        assert (out / ref).is_file()
    # the summary table has a row per run with the swept value
    rows = [ln for ln in md.splitlines() if ln.startswith("| `run_aux_alpha")]
    assert len(rows) == 3 and "| 0.01 |" in rows[1]
    # summary-only keeps comparison plots and the table, drops per-run plots
    res = run_report(synthetic_sweep, "--out", tmp_path / "short", "--summary-only")
    assert res.returncode == 0, res.stderr
    assert len(_images((tmp_path / "short" / "report.md").read_text())) == 3


def test_report_several_files_and_dropless(tmp_path):
    from moelab_analysis import synthetic
    a = synthetic.write_synthetic_run(tmp_path / "a.h5", steps=60, eval_every=20, categories=None)
    b = synthetic.write_synthetic_run(tmp_path / "b.h5", steps=60, eval_every=20, categories=None, z_loss=0.0)
    res = run_report(a, b, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "out" / "report.md").read_text()
    assert "router.z_loss" in md                              # inferred from the config diff
    assert "kept_layer" not in md                             # dropless: no kept heat map
    assert "No expert-by-category counts" in md


@pytest.mark.parametrize("case", ["missing", "text", "no_dataset", "empty_dir"])
def test_report_bad_input(tmp_path, synthetic_run, case):
    if case == "missing":
        target, expect = tmp_path / "missing.h5", "missing.h5: no such file"
    elif case == "text":
        target = tmp_path / "notes.txt"
        target.write_text("hello")
        expect = "notes.txt: not an HDF5 file"
    elif case == "no_dataset":
        target = tmp_path / "broken.h5"
        target.write_bytes(synthetic_run.read_bytes())
        with h5py.File(target, "a") as h5:
            del h5["train/grad_norm"]
        expect = "broken.h5: missing required dataset /train/grad_norm"
    else:
        target = tmp_path / "emptydir"
        target.mkdir()
        expect = "no run logs"
    res = run_report(target, "--out", tmp_path / "out")
    assert res.returncode != 0
    assert expect in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "report.md").exists()


def test_report_killed_run_warns_but_works(tmp_path):
    from moelab_analysis import synthetic
    path = synthetic.write_synthetic_run(tmp_path / "killed.h5", steps=80, eval_every=20, killed=True)
    res = run_report(path, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "warning:" in res.stderr and "unequal length" in res.stderr
    assert "Warnings while reading" in (tmp_path / "out" / "report.md").read_text()


def test_report_parallel_run_plots_per_rank_communication(tmp_path, synthetic_run):
    """A run on several ranks has /parallel (docs/run-log.md): the reader exposes it and the
    report adds the per-rank communication plot; a one-rank run has neither."""
    import shutil
    import h5py
    import numpy as np
    from moelab_analysis import reader, report
    path = tmp_path / "par.h5"
    shutil.copy(synthetic_run, path)
    with h5py.File(path, "a") as f:
        n = len(f["train/step"])
        g = f.create_group("parallel")
        g["a2a_sent_bytes"] = np.full((n, 4), 1000, dtype=np.int64)
        g["a2a_recv_bytes"] = np.full((n, 4), 1000, dtype=np.int64)
        g["comm_seconds"] = np.full((n, 4), 0.002)
        g["a2a_seconds"] = np.full((n, 4), 0.001)
    run = reader.load_run(path)
    assert run.parallel["a2a_sent_bytes"].shape == (n, 4)
    out = tmp_path / "rep"
    report.write_report([path], out)
    assert (out / "parallel_comm.png").exists()
    assert "Communication per rank" in (out / "report.md").read_text()
    assert reader.load_run(synthetic_run).parallel == {}
