#!/usr/bin/python3
"""Fail if a notebook was committed with outputs (standard library only).

    /usr/bin/python3 analysis/check_notebooks.py [NOTEBOOK.ipynb ...]   (default: notebooks/*.ipynb)

A notebook is clean when every code cell has "outputs": [] and "execution_count": null.
Exit 0 when all are clean, 1 naming each offending notebook and cell otherwise.
"""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def problems(path):
    """A list of 'path: cell N: ...' strings; empty when the notebook is clean."""
    try:
        nb = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return ["{}: not a readable notebook ({})".format(path, exc)]
    out = []
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs"):
            out.append("{}: cell {}: has {} output(s)".format(path, i, len(cell["outputs"])))
        if cell.get("execution_count") is not None:
            out.append("{}: cell {}: execution_count is {}, not null".format(path, i, cell["execution_count"]))
    return out


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in args] or sorted((REPO / "notebooks").glob("*.ipynb"))
    if not paths:
        print("check_notebooks: no notebooks found")
        return 0
    found = [p for path in paths for p in problems(path)]
    for line in found:
        print("error: " + line, file=sys.stderr)
    if found:
        print("error: clear the outputs before committing (Jupyter: Edit > Clear All Outputs, or "
              "jupyter nbconvert --clear-output --inplace NOTEBOOK)", file=sys.stderr)
        return 1
    print("check_notebooks: {} notebook(s) committed without outputs".format(len(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
