"""The routing speed analysis (issue 13 part 5): step times from tokens/s, methods from the
config, the table and plot of analysis/routing_speed.py."""
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ANALYSIS, REPO
from moelab_analysis import reader, speed, synthetic


def _set_tps(path, tps):
    with h5py.File(str(path), "r+") as h5:
        del h5["train/tokens_per_sec"]
        h5["train"].create_dataset("tokens_per_sec", data=np.asarray(tps, dtype=np.float64))


def _add_router_keys(path, lines):
    with h5py.File(str(path), "r+") as h5:
        cfg = h5.attrs["config"]
        cfg = cfg.decode() if isinstance(cfg, bytes) else str(cfg)
        h5.attrs["config"] = cfg.replace("[router]\n", "[router]\n" + "".join(l + "\n" for l in lines), 1)


@pytest.fixture()
def speed_sweep(tmp_path):
    d = tmp_path / "speed"
    paths = synthetic.write_synthetic_sweep(d, key="router.capacity_factor", values=(0.0, 1.0, 1.25),
                                            steps=100, batch=4, seq=32)
    # Step k takes 10 ms (+1 ms at capacity 1.0), except a slow warm-up: the first 10 logged steps.
    for i, p in enumerate(paths):
        ms = np.full(100, 10.0 + (1.0 if i == 1 else 0.0))
        ms[:10] = 500.0
        _set_tps(p, 4 * 32 / (ms / 1000.0))
    _add_router_keys(paths[2], ["force_balance = true"])
    return d, paths


def test_step_times_drop_the_warm_up_and_invert_tokens_per_sec(speed_sweep):
    d, paths = speed_sweep
    run = reader.load_run(paths[0])
    assert speed.tokens_per_step(run) == 128
    ms = speed.step_times_ms(run)
    assert ms.size == 90
    assert np.allclose(ms, 10.0)
    row = speed.speed_row(run)
    assert row["step_ms"] == pytest.approx(10.0)
    assert row["tokens_per_s"] == pytest.approx(12800.0)
    assert row["kind"] == "real" and row["label"] == "alpha 0.01, dropless"


def test_methods_come_from_the_config(speed_sweep):
    d, paths = speed_sweep
    kinds = {r["capacity_factor"]: (r["kind"], r["label"]) for r in speed.speed_table(reader.find_runs(d))}
    assert kinds[1.0] == ("real", "alpha 0.01, cf 1")
    assert kinds[1.25] == ("forced", "forced balance, cf 1.25")
    with h5py.File(str(paths[0]), "r+") as h5:
        cfg = h5.attrs["config"]
        cfg = cfg.decode() if isinstance(cfg, bytes) else str(cfg)
        assert "policy = topk" in cfg
        h5.attrs["config"] = cfg.replace("policy = topk", "policy = expert_choice")
    assert speed.method_of(reader.load_run(paths[0]))["kind"] == "expert_choice"


def test_cli_writes_the_table_and_the_plot(speed_sweep, tmp_path):
    d, paths = speed_sweep
    out = tmp_path / "report"
    ref = reader.load_run(paths[0]).name
    res = subprocess.run([sys.executable, str(ANALYSIS / "routing_speed.py"), str(d), "--out", str(out),
                          "--reference", ref], cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    md = (out / "routing_speed.md").read_text()
    assert (out / "routing_speed.png").stat().st_size > 1000
    assert "| 11.0 [11.0, 11.0] |" in md        # capacity 1.0: 11 ms a step
    assert "0.909x" in md                        # 10 / 11 of the reference's tokens/s
    assert "forced balance, cf 1.25" in md
    bad = subprocess.run([sys.executable, str(ANALYSIS / "routing_speed.py"), str(d), "--out", str(out),
                          "--reference", "nope"], cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no run named 'nope'" in bad.stderr


def test_gpu_claims_table(tmp_path):
    """analysis/gpu_claims.py on a 7-point x 3-seed study named as seeded_gpu.ini names it."""
    import json

    d = tmp_path / "seeded_gpu"
    d.mkdir()
    points = ["moe", "dense", "alpha0", "zloss0.1", "k1", "k1_cf1", "aux_free_bias"]
    runs = []
    for seed in (1, 2, 3):
        for i, p in enumerate(points):
            f = "run_{}_seed={}.h5".format(p, seed)
            synthetic.write_synthetic_run(d / f, seed=100 * seed + i, steps=60, eval_every=20,
                                          aux_alpha=0.0 if p in ("alpha0", "aux_free_bias") else 0.01,
                                          capacity_factor=1.0 if p == "k1_cf1" else 0.0)
            runs.append({"file": f, "name": "{}_seed={}".format(p, seed), "point": p, "seed": seed,
                         "values": {"variant": p}})
    (d / "sweep.json").write_text(json.dumps({
        "axes": ["variant"], "seeds": [1, 2, 3], "baseline": "moe", "planned_runs": 21, "finished_runs": 21,
        "groups": [{"point": p, "values": {"variant": p}, "seeds": [1, 2, 3],
                    "files": ["run_{}_seed={}.h5".format(p, s) for s in (1, 2, 3)]} for p in points],
        "runs": runs}))
    out = tmp_path / "claims"
    res = subprocess.run([sys.executable, str(ANALYSIS / "gpu_claims.py"), str(d), "--out", str(out)],
                         cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    md = (out / "claims.md").read_text()
    assert md.count("| val bpb |") == 6
    assert "| drop fraction | +0.0844 [+0.0758, +0.0929] **beyond noise** |" in md
    assert (out / "claims.png").stat().st_size > 1000
    (d / "run_k1_seed=2.h5").unlink()  # a missing seed of one point: paired over the seeds both ran
    (d / "sweep.json").unlink()
    res = subprocess.run([sys.executable, str(ANALYSIS / "gpu_claims.py"), str(d), "--out", str(out)],
                         cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "grid points missing" in res.stderr
