"""The wrong-interpreter check: a missing h5py/numpy/matplotlib gives a clear message."""
import os
import shutil
import subprocess
import sys

from conftest import ANALYSIS, REPO

from moelab_analysis import _deps


def test_missing_modules_uses_importer():
    def importer(name):
        if name == "h5py":
            raise ImportError("No module named 'h5py'")
        if name == "matplotlib":
            raise RuntimeError("broken install")          # any failure counts as missing
        return object()
    assert _deps.missing_modules(("numpy", "h5py", "matplotlib"), importer) == ["h5py", "matplotlib"]
    assert _deps.missing_modules(("numpy",), importer) == []


def test_message_names_interpreter_and_fix():
    msg = _deps.missing_message(["h5py"], executable="/root/.pyenv/shims/python3")
    assert "h5py" in msg and "/root/.pyenv/shims/python3" in msg
    assert "/usr/bin/python3" in msg and "make deps" in msg and "python3-h5py" in msg


def test_require_raises_import_error_subclass(monkeypatch):
    monkeypatch.setattr(_deps, "missing_modules", lambda modules=None: ["numpy"])
    try:
        _deps.require()
    except ImportError as exc:
        assert isinstance(exc, _deps.MissingDependencyError)
        assert "/usr/bin/python3" in str(exc)
    else:
        raise AssertionError("require() did not raise")


def _blocked_env(tmp_path):
    """PYTHONPATH with a fake h5py package that fails to import, as on an interpreter without it."""
    fake = tmp_path / "fake" / "h5py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named h5py (simulated)')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tmp_path / "fake")
    return env


def test_scripts_fail_clearly_without_h5py(tmp_path):
    env = _blocked_env(tmp_path)
    for script, args in [("report.py", ["x.h5", "--out", str(tmp_path / "o")]),
                         ("make_synthetic_log.py", [str(tmp_path / "s.h5")])]:
        res = subprocess.run([sys.executable, str(ANALYSIS / script), *args], env=env, cwd=str(REPO),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, (script, res.stderr)
        assert "missing Python package(s): h5py" in res.stderr
        assert "/usr/bin/python3" in res.stderr
        assert "Traceback" not in res.stderr


def test_package_import_fails_clearly_without_h5py(tmp_path):
    env = _blocked_env(tmp_path)
    code = ("import sys; sys.path.insert(0, {!r})\n"
            "import moelab_analysis._deps  # always importable\n"
            "try:\n    from moelab_analysis import load_run\n"
            "except ImportError as e:\n    print('ERR', e)\n").format(str(ANALYSIS))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ERR moelab analysis: missing Python package(s): h5py")


def test_path_python3_if_it_lacks_packages(tmp_path):
    """The `python3` first on PATH (pyenv here) lacks h5py: report.py must say so, not crash."""
    other = shutil.which("python3")
    if not other or os.path.realpath(other) == os.path.realpath(sys.executable):
        import pytest
        pytest.skip("python3 on PATH is this interpreter")
    probe = subprocess.run([other, "-c", "import h5py, numpy, matplotlib"], capture_output=True)
    if probe.returncode == 0:
        import pytest
        pytest.skip("python3 on PATH has the packages")
    res = subprocess.run([other, str(ANALYSIS / "report.py"), "x.h5", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert res.returncode == 2
    assert "/usr/bin/python3" in res.stderr and "Traceback" not in res.stderr
