"""Seeded studies: grouping by grid point and seed, the tables and plots of report.py."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import ANALYSIS, REPO

from moelab_analysis import reader, stats, studies, synthetic
from moelab_analysis.summary import summarize_run

REPORT = ANALYSIS / "report.py"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    d = tmp_path_factory.mktemp("seeded") / "study"
    synthetic.write_synthetic_seeded_sweep(d, key="router.aux_alpha", values=[0.0, 0.01, 0.1], seeds=[1, 2, 3, 4, 5],
                                           baseline=0.01, steps=80, eval_every=20, categories=None)
    return d


def test_index_names_points_and_seeds(seeded):
    idx = json.loads((seeded / "sweep.json").read_text())
    assert idx["seeds"] == [1, 2, 3, 4, 5] and idx["baseline"] == "aux_alpha=0.01"
    runs = reader.find_runs(seeded)
    assert len(runs) == 15
    r = next(r for r in runs if r.path.name == "run_aux_alpha=0.1_seed=4.h5")
    assert (r.point, r.seed, r.index_baseline, r.planned_runs) == ("aux_alpha=0.1", 4, "aux_alpha=0.01", 15)
    assert r.swept == {"router.aux_alpha": 0.1}            # the seed is no swept value
    # Sorted by grid point, then seed.
    assert [(r.swept["router.aux_alpha"], r.seed) for r in runs[:6]] == [
        (0.0, 1), (0.0, 2), (0.0, 3), (0.0, 4), (0.0, 5), (0.01, 1)]
    st = studies.group_study(runs)
    assert st.points == ["aux_alpha=0", "aux_alpha=0.01", "aux_alpha=0.1"]
    assert st.seeds == [1, 2, 3, 4, 5] and st.baseline == "aux_alpha=0.01" and st.n_runs == 15
    assert st.values["aux_alpha=0.1"] == {"router.aux_alpha": 0.1}
    with pytest.raises(ValueError, match="not a grid point"):
        studies.group_study(runs, baseline="aux_alpha=7")


def test_grid_order_comes_from_the_index(tmp_path, seeded):
    """Points keep the sweep's grid order (sweep.json's groups), not the order of sorted values."""
    d = tmp_path / "reordered"
    shutil.copytree(seeded, d)
    idx = json.loads((d / "sweep.json").read_text())
    idx["groups"] = idx["groups"][::-1]
    (d / "sweep.json").write_text(json.dumps(idx))
    st = studies.group_study(reader.find_runs(d))
    assert st.points == ["aux_alpha=0.1", "aux_alpha=0.01", "aux_alpha=0"]


def test_grouping_without_index_from_train_seed(tmp_path, seeded):
    d = tmp_path / "copy"
    shutil.copytree(seeded, d)
    (d / "sweep.json").unlink()
    runs = reader.find_runs(d)
    assert all(r.point is None and r.seed is None for r in runs)
    assert all(list(r.swept) == ["router.aux_alpha"] for r in runs)   # train.seed not swept
    assert studies.is_seeded(runs)
    st = studies.group_study(runs, baseline="aux_alpha=0.01")
    assert st.points == ["aux_alpha=0", "aux_alpha=0.01", "aux_alpha=0.1"]
    assert [st.seeds_of(p) for p in st.points] == [[1, 2, 3, 4, 5]] * 3
    # An ordinary sweep is not seeded.
    plain = tmp_path / "plain"
    synthetic.write_synthetic_sweep(plain, values=[0.0, 0.1], steps=40, eval_every=20, categories=None)
    assert not studies.is_seeded(reader.find_runs(plain))


def test_tables_match_stats(seeded):
    runs = reader.find_runs(seeded)
    st = studies.group_study(runs)
    sm = {id(r): summarize_run(r) for r in runs}
    table = studies.point_table(st, sm)
    vals = [summarize_run(st.runs["aux_alpha=0"][s])["val_bpb"] for s in st.seeds]
    ci = table["aux_alpha=0"]["val_bpb"]
    assert ci.n == 5 and ci.mean == pytest.approx(sum(vals) / 5)
    assert (ci.lo, ci.hi) == pytest.approx((stats.mean_ci(vals).lo, stats.mean_ci(vals).hi))
    comps = studies.baseline_comparisons(st, sm, "aux_alpha=0.01")
    imb = {c.name: c for c in comps["imbalance"]}
    assert set(imb) == {"aux_alpha=0", "aux_alpha=0.1"}
    # The synthetic story: without the aux loss the load collapses, a large alpha balances it.
    assert imb["aux_alpha=0"].test.mean > 0 and imb["aux_alpha=0"].beyond_noise
    assert imb["aux_alpha=0.1"].test.mean < 0 and imb["aux_alpha=0.1"].beyond_noise
    # Holm over the 2 comparisons of one metric.
    ps = [c.test.p for c in comps["val_bpb"]]
    assert [c.p_holm for c in comps["val_bpb"]] == pytest.approx(stats.holm(ps))
    md = "\n".join(studies.markdown_tables(st, sm))
    assert "| **aux_alpha=0.01** (baseline) | 5 |" in md
    assert "Differences from the baseline `aux_alpha=0.01`" in md and "**beyond noise**" in md
    # Only one seed pairs: n = 1, no test.
    one = studies.Study(points=["a", "b"], runs={"a": {1: runs[0]}, "b": {1: runs[1]}}, baseline="a")
    c = studies.baseline_comparisons(one, sm, "a")["val_bpb"][0]
    assert c.test.n == 1 and c.beyond_noise is None


def test_duplicate_seed_is_left_out_with_a_note(tmp_path, seeded):
    runs = reader.find_runs(seeded)
    runs.append(reader.load_run(runs[0].path))
    runs[-1].point, runs[-1].seed = runs[0].point, runs[0].seed
    st = studies.group_study(runs)
    assert st.n_runs == 15 and len(st.notes) == 1 and "a second run of aux_alpha=0 with seed 1" in st.notes[0]


def run_report(*args):
    return subprocess.run([sys.executable, str(REPORT), *map(str, args)], cwd=str(REPO),
                          capture_output=True, text=True, timeout=300)


def test_report_on_a_seeded_study(tmp_path, seeded):
    out = tmp_path / "rep"
    res = run_report(seeded, "--out", out, "--summary-only", "--title", "aux alpha")
    assert res.returncode == 0, res.stderr
    md = (out / "report.md").read_text()
    tables = (out / "tables.md").read_text()
    for text in (md, tables):
        assert "## Across seeds" in text and "3 grid points x seeds 1, 2, 3, 4, 5 (15 runs)" in text
        assert "**final val bpb** (lower is better)" in text and "corrected interval" in text
    assert "![" not in tables                                     # tables only
    for png in ["seeded_comparison.png", "seeded_loss.png", "seeded_router.png"]:
        assert "({})".format(png) in md and (out / png).stat().st_size > 10_000
    assert "## Every run" in md and md.count("| `run_aux_alpha=") == 15
    assert "overlay_loss.png" not in md                           # the seeded plots replace them
    # --baseline picks another grid point; a wrong one is refused naming the grid points.
    res = run_report(seeded, "--out", tmp_path / "rep0", "--summary-only", "--baseline", "aux_alpha=0")
    assert res.returncode == 0, res.stderr
    assert "Differences from the baseline `aux_alpha=0`" in (tmp_path / "rep0" / "tables.md").read_text()
    res = run_report(seeded, "--out", tmp_path / "bad", "--baseline", "aux_alpha=9")
    assert res.returncode == 2
    assert "baseline 'aux_alpha=9' is not a grid point of this study (grid points: aux_alpha=0, " in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "bad" / "report.md").exists()
    res = run_report(seeded / "run_aux_alpha=0_seed=1.h5", "--out", tmp_path / "one", "--baseline", "x")
    assert res.returncode == 2 and "no seeded study" in res.stderr


def test_synthetic_seeded_cli(tmp_path):
    script = str(ANALYSIS / "make_synthetic_log.py")
    res = subprocess.run([sys.executable, script, "--sweep", str(tmp_path / "s"), "--seeds", "1,2",
                          "--sweep-values", "0,0.1", "--baseline", "0.1", "--steps", "40", "--eval-every", "20"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.split()) == 4
    idx = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert idx["baseline"] == "aux_alpha=0.1" and [g["point"] for g in idx["groups"]] == ["aux_alpha=0", "aux_alpha=0.1"]
    res = subprocess.run([sys.executable, script, "--sweep", str(tmp_path / "t"), "--seeds", "1,x"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--seeds must be comma-separated integers" in res.stderr


def test_seeds_alone_make_one_point(tmp_path, seeded):
    """A study of seeds without a [sweep] (moelab writes point "" and no axes): one grid point."""
    d = tmp_path / "alone"
    d.mkdir()
    runs = []
    for s in [1, 2, 3]:
        name = "run_aux_alpha=0.01_seed={}.h5".format(s)
        shutil.copy(seeded / name, d / "x_seed={}.h5".format(s))
        runs.append({"file": "x_seed={}.h5".format(s), "name": "seed={}".format(s), "point": "", "seed": s, "values": {}})
    (d / "sweep.json").write_text(json.dumps({"axes": [], "seeds": [1, 2, 3], "baseline": None, "planned_runs": 3,
                                              "finished_runs": 3, "groups": [{"point": "", "values": {}, "seeds": [1, 2, 3],
                                                                              "files": [r["file"] for r in runs]}],
                                              "runs": runs}))
    st = studies.group_study(reader.find_runs(d))
    assert st.points == ["base"] and st.seeds == [1, 2, 3]
    res = run_report(d, "--out", tmp_path / "rep", "--summary-only")
    assert res.returncode == 0, res.stderr
    assert "1 grid point x seeds 1, 2, 3 (3 runs)" in (tmp_path / "rep" / "tables.md").read_text()
