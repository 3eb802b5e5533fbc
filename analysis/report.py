#!/usr/bin/python3
"""moelab report: plots and report.md over HDF5 run logs.

    /usr/bin/python3 analysis/report.py RUN.h5 [RUN2.h5 ... | SWEEP_DIR] --out DIR

Prints the path of DIR/report.md, then one line per PNG. Exit status: 0 on success, 2 on bad
input (missing file, not HDF5, missing required dataset: the message names the file and the
HDF5 path) or a missing Python package (use Debian's /usr/bin/python3 or `make deps`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moelab_analysis._deps import require_or_exit  # noqa: E402  (standard library only)

require_or_exit()

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # headless; plots.py never needs a GUI backend anyway

from moelab_analysis.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
