"""Interpreter check for the moelab analysis tools (standard library only).

The analysis code needs numpy, h5py, matplotlib and scipy (the t distribution of the seeded
statistics). On the project's machines these come from Debian packages (python3-numpy,
python3-h5py, python3-matplotlib, python3-scipy) and are importable
only by Debian's interpreter /usr/bin/python3; the `python3` first on PATH may be another
interpreter (pyenv) without them. This module must stay importable without any third-party
package so that a wrong interpreter gets a clear message instead of a traceback.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Iterable, List, Optional

REQUIRED_MODULES = ("numpy", "h5py", "matplotlib", "scipy")
DEBIAN_PYTHON = "/usr/bin/python3"
# Debian packages that provide the modules (what `make deps` should apt-get install).
DEBIAN_PACKAGES = {
    "numpy": "python3-numpy",
    "h5py": "python3-h5py",
    "matplotlib": "python3-matplotlib",
    "scipy": "python3-scipy",
    "pytest": "python3-pytest",
    "nbconvert": "python3-nbconvert",
    "nbformat": "python3-nbformat",
    "ipykernel": "python3-ipykernel",
}


class MissingDependencyError(ImportError):
    """Raised when the running interpreter lacks a package the analysis tools need."""


def missing_modules(modules: Iterable[str] = REQUIRED_MODULES,
                    importer: Optional[Callable[[str], object]] = None) -> List[str]:
    """Names from `modules` that cannot be imported (any exception while importing counts)."""
    importer = importer or importlib.import_module
    missing = []
    for name in modules:
        try:
            importer(name)
        except Exception:  # ImportError, or a broken install raising something else
            missing.append(name)
    return missing


def missing_message(missing: Iterable[str], executable: Optional[str] = None) -> str:
    """The message shown for a wrong interpreter: what is missing, which interpreter ran, the fix."""
    missing = list(missing)
    executable = executable or sys.executable or "python"
    pkgs = " ".join(DEBIAN_PACKAGES.get(m, "python3-" + m) for m in missing)
    return (
        "moelab analysis: missing Python package(s): {missing} (interpreter: {exe}).\n"
        "Run the analysis tools with Debian's interpreter, e.g.\n"
        "    {deb} analysis/report.py RUN.h5 --out DIR\n"
        "(the `python3` first on PATH may be a different interpreter without these packages),\n"
        "If /usr/bin/python3 lacks them too, install them with `make deps` (apt-get install {pkgs})."
    ).format(missing=", ".join(missing), exe=executable, deb=DEBIAN_PYTHON, pkgs=pkgs)


def require(modules: Iterable[str] = REQUIRED_MODULES) -> None:
    """Raise MissingDependencyError with `missing_message` if any module is missing."""
    missing = missing_modules(modules)
    if missing:
        raise MissingDependencyError(missing_message(missing))


def require_or_exit(modules: Iterable[str] = REQUIRED_MODULES, status: int = 2) -> None:
    """For scripts: print the message to stderr and exit with `status` if anything is missing."""
    missing = missing_modules(modules)
    if missing:
        sys.stderr.write("error: " + missing_message(missing) + "\n")
        raise SystemExit(status)
