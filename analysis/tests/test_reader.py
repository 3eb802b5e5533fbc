"""reader.py on synthetic logs: contract fields, optional paths, killed runs, sweeps, bad input."""
import json
import shutil
import warnings

import h5py
import numpy as np
import pytest

from moelab_analysis import reader, synthetic
from moelab_analysis.reader import RunLogError, RunLogWarning


def test_load_run_reads_contract(synthetic_run):
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # a clean log must not warn
        run = reader.load_run(synthetic_run)
    assert run.layers == [0, 1]
    assert run.backend == "cpu" and run.moelab_version
    assert run.cfg("model.experts") == 8 and run.cfg("router.capacity_factor") == 1.25
    assert run.config["router"]["policy"] == "topk"
    n = run.train["step"].shape[0]
    assert n == 120
    for key in reader.TRAIN_REQUIRED:
        assert run.train[key].shape == (n,)
    layer = run.router[1]
    assert layer.routed.shape == layer.kept.shape == layer.mean_prob.shape == (n, 8)
    for key in reader.ROUTER_SERIES:
        assert getattr(layer, key).shape == (n,)
    assert layer.capacity_on and np.all(layer.kept <= layer.routed)
    # aux loss is consistent with its definition E * sum f_i P_i, f_i = c_i / (T k)
    tk = run.cfg("train.batch") * run.cfg("train.seq") * run.cfg("model.top_k")
    aux = 8 * (layer.routed / tk * layer.mean_prob).sum(axis=1)
    assert np.allclose(aux, layer.aux_loss, rtol=1e-4)
    # optional paths
    assert "top1_prob" in layer.extras
    assert layer.category_counts.shape == (run.eval["step"].shape[0], 8, 5)
    assert layer.category_names[0] == "lowercase"
    assert np.array_equal(layer.category_step, run.eval["step"])
    assert reader.list_layers(run) == reader.list_layers(synthetic_run) == [0, 1]
    with h5py.File(synthetic_run, "r") as h5:
        assert reader.list_layers(h5) == [0, 1]


def test_truncated_datasets_are_cut_to_shortest_with_warning(tmp_path):
    path = synthetic.write_synthetic_run(tmp_path / "killed.h5", steps=100, eval_every=20, killed=True)
    with pytest.warns(RunLogWarning, match="unequal length"):
        run = reader.load_run(path)
    n = run.train["step"].shape[0]
    assert n == 70                                           # the router of the last layer was cut
    assert all(v.shape[0] == n for v in run.train.values())
    for layer in run.router.values():
        assert layer.routed.shape[0] == n and layer.entropy.shape[0] == n
        assert layer.extras["top1_prob"].shape[0] == n
    assert run.eval["step"].shape == run.eval["loss"].shape == (4,)
    assert run.router[0].category_counts.shape[0] == 4
    assert any("unequal length" in w for w in run.warnings)


def test_missing_required_dataset_names_path(tmp_path, synthetic_run):
    bad = tmp_path / "bad.h5"
    shutil.copy(synthetic_run, bad)
    with h5py.File(bad, "a") as h5:
        del h5["router/layer_01/kept"]
    with pytest.raises(RunLogError, match=r"bad\.h5: missing required dataset /router/layer_01/kept"):
        reader.load_run(bad)
    shutil.copy(synthetic_run, bad)
    with h5py.File(bad, "a") as h5:
        del h5["eval"]
    with pytest.raises(RunLogError, match="missing required group /eval"):
        reader.load_run(bad)


def test_missing_file_and_not_hdf5(tmp_path):
    with pytest.raises(RunLogError, match="no such file"):
        reader.load_run(tmp_path / "nope.h5")
    txt = tmp_path / "notes.h5"
    txt.write_text("not hdf5")
    with pytest.raises(RunLogError, match="not an HDF5 file"):
        reader.load_run(txt)
    with pytest.raises(RunLogError, match="no run logs"):
        reader.find_runs(tmp_path / "..", pattern="*.nothing")


def test_fixed_length_string_attributes_and_headerless_config(tmp_path, synthetic_run):
    """A C++ writer may store fixed-length byte strings; Boost INI may have keys before sections."""
    path = tmp_path / "fixed.h5"
    shutil.copy(synthetic_run, path)
    with h5py.File(path, "a") as h5:
        text = "seed_note = 1\n" + h5.attrs["config"]
        h5.attrs["config"] = np.bytes_(text.encode())
        h5.attrs["backend"] = np.bytes_(b"cuda")
        ds = h5["router/layer_00/category_counts"]
        del ds.attrs["category_names"]
        h5["router/layer_00"].attrs["category_names"] = np.array([b"a", b"b", b"c", b"d", b"e"])
    run = reader.load_run(path)
    assert run.backend == "cuda"
    assert run.config[""]["seed_note"] == "1"
    assert run.cfg("router.aux_alpha") == 0.01
    assert run.router[0].category_names == ["a", "b", "c", "d", "e"]


def test_find_runs_with_index(synthetic_sweep):
    runs = reader.find_runs(synthetic_sweep)
    assert [r.swept["router.aux_alpha"] for r in runs] == [0.0, 0.01, 0.1]
    assert runs[1].label == "aux_alpha=0.01"


def test_find_runs_without_index_diffs_configs(tmp_path, synthetic_sweep):
    d = tmp_path / "noindex"
    shutil.copytree(synthetic_sweep, d)
    (d / "sweep.json").unlink()
    runs = reader.find_runs(d)
    # checkpoint_dir differs per run too, but it is a path, not a swept key
    assert [list(r.swept) for r in runs] == [["router.aux_alpha"]] * 3
    assert [r.swept["router.aux_alpha"] for r in runs] == [0, 0.01, 0.1]


def test_find_runs_index_list_format(tmp_path, synthetic_sweep):
    d = tmp_path / "listindex"
    shutil.copytree(synthetic_sweep, d)
    (d / "sweep.json").unlink()
    files = sorted(p.name for p in d.glob("*.h5"))
    (d / "sweep_index.json").write_text(json.dumps(
        [{"file": f, "values": {"note": "run{}".format(i)}} for i, f in enumerate(files)]))
    runs = reader.find_runs(d)
    assert sorted(r.swept["note"] for r in runs) == ["run0", "run1", "run2"]
    assert all("router.aux_alpha" in r.swept for r in runs)   # config diff completes the index


def test_multi_run_file_groups(tmp_path, synthetic_sweep):
    multi = tmp_path / "multi.h5"
    with h5py.File(multi, "w") as out:
        for f in sorted(synthetic_sweep.glob("*.h5")):
            with h5py.File(f, "r") as src:
                g = out.create_group(f.stem)
                for k, v in src.attrs.items():
                    g.attrs[k] = v
                for name in src:
                    src.copy(name, g)
    with pytest.raises(RunLogError, match="pass group"):
        reader.load_run(multi)
    one = reader.load_run(multi, group="run_aux_alpha_0.1")
    assert one.cfg("router.aux_alpha") == 0.1
    runs = reader.find_runs(tmp_path, pattern="multi.h5")
    assert len(runs) == 3 and runs[-1].swept["router.aux_alpha"] == 0.1


def test_sweep_section_names_swept_key(tmp_path):
    """A resolved config that keeps its [sweep] section marks that key as swept, even for one run."""
    path = synthetic.write_synthetic_run(tmp_path / "x_aux_alpha=0.01.h5", steps=40, eval_every=20)
    with h5py.File(path, "a") as h5:
        h5.attrs["config"] = h5.attrs["config"] + "\n[sweep]\nrouter.aux_alpha = 0, 0.01   # axis\n"
    runs = reader.find_runs(tmp_path)
    assert runs[0].swept == {"router.aux_alpha": 0.01}
    assert reader.parse_config("[a]\nk = 1  # note\n")["a"]["k"] == "1"
