#!/usr/bin/python3
"""What routing costs in speed: the table and the quality-versus-throughput plot of a speed
study (experiments/gpu/routing_speed_study.sh; any sweep directory works).

    /usr/bin/python3 analysis/routing_speed.py SWEEP_DIR --out DIR [--reference NAME] [--skip FRAC]

Writes DIR/routing_speed.md (one row per run: method, step ms median and interquartile range,
tokens/s, speed relative to the reference run, val bpb, imbalance, drop fraction) and
DIR/routing_speed.png (val bpb against tokens/s, one point per balancing method). The reference
is --reference, else the study's sweep.json baseline, else the first run. Method, step times and
warm-up: analysis/moelab_analysis/speed.py. Exit 2 on bad input.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moelab_analysis._deps import require_or_exit  # noqa: E402

require_or_exit()

import matplotlib  # noqa: E402

matplotlib.use("Agg")

from moelab_analysis import reader, speed  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--reference", default=None, metavar="NAME")
    ap.add_argument("--skip", type=float, default=0.1, metavar="FRAC",
                    help="fraction of logged steps dropped as warm-up (at least 10 steps)")
    a = ap.parse_args(argv)
    try:
        runs = reader.find_runs(a.sweep_dir)
    except reader.RunLogError as e:
        print("routing_speed: {}".format(e), file=sys.stderr)
        return 2
    names = speed.run_names(a.sweep_dir)
    rows = speed.speed_table(runs, a.skip, names)
    order = {n: i for i, n in enumerate(names.values())}  # the study's run order
    rows.sort(key=lambda r: order.get(r["name"], len(order)))
    ref = a.reference or (runs[0].index_baseline if runs and runs[0].index_baseline else rows[0]["name"])
    if ref not in [r["name"] for r in rows]:
        print("routing_speed: no run named {!r} (runs: {})".format(ref, ", ".join(r["name"] for r in rows)),
              file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    md = os.path.join(a.out, "routing_speed.md")
    png = os.path.join(a.out, "routing_speed.png")
    backend = runs[0].backend or "?"
    with open(md, "w") as f:
        f.write("# What routing costs in speed: {} ({} runs, backend {})\n\n".format(
            os.path.basename(os.path.normpath(a.sweep_dir)), len(rows), backend))
        f.write("Step time = tokens per step / the logged tokens/s of that step, after dropping the first "
                "{:.0%} of logged steps (at least 10) as warm-up; median and interquartile range. Quality: "
                "the last validation bpb (one seed). Imbalance (max/mean routed) and drop fraction: means "
                "over the last 10% of steps and the MoE layers.\n\n".format(a.skip))
        f.write(speed.markdown(rows, ref))
        f.write("\n![quality vs throughput](routing_speed.png)\n")
    speed.plot(rows, png, "quality vs throughput, one point per balancing method")
    print(md)
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
