#!/usr/bin/env python3
"""Where a kernel's warps wait, from ncu's metrics (issue 10; experiments/gpu/stall_reasons.sh).

    python3 analysis/stall_reasons.py NCU_TXT [NCU_TXT ...]

NCU_TXT: the output of `ncu --metrics METRICS PROGRAM` (ncu's default text page; the
program's own output may be mixed in), with METRICS = stall_reasons.sh's list:
  smsp__average_warp_latency_issue_stalled_<reason>  the warps' stall cycles for each reason, per
                                                     issued instruction; each reason's share of
                                                     their sum is printed ("selected" is issuing)
  smsp__inst_executed_pipe_<alu|fma|xu>, smsp__pipe_tensor_op_hmma_cycles_active
                                                     busy share of each pipe (of its peak)
  smsp__inst_executed.sum, smsp__cycles_active.avg   warp instructions, active cycles
The WarpStateStats family (smsp__average_warps_issue_stalled_<reason>_per_issue_active) is read
the same way where it is there instead. Every profiled kernel is one column. Standard library
only: it runs on the GPU machine as it is.

What it told the tenth session (docs/performance.md): the forward attention kernel's busiest pipe
was the integer ALU, and its warps issued twice the instructions its arithmetic needs; the
backward's warps waited at barriers a fifth of the time.
"""
import re
import sys

# "  void unnamed>::fwd_wg_kernel<128>(Params) (32, 32, 1)x(256, 1, 1), Context 1, Stream 13, ..."
_KERNEL = re.compile(r"^  (\S.*?) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\), Context \d+")
# "    smsp__cycles_active.avg        cycle   736,264.20" (the unit may be missing)
_METRIC = re.compile(r"^\s+([a-z][a-z0-9_]*__[A-Za-z0-9_.]+)\s+(?:(\S+)\s+)?(-?[\d,]+(?:\.\d+)?)\s*$")
_STALL = (re.compile(r"^smsp__average_warp_latency_issue_stalled_([a-z_]+)\.ratio$"),
          re.compile(r"^smsp__average_warps_issue_stalled_([a-z_]+)_per_issue_active\.ratio$"))
_PIPES = (("tensor", "smsp__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"),
          ("ALU", "smsp__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active"),
          ("FMA", "smsp__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active"),
          ("XU", "smsp__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active"))
# ncu's names, as the Warp State Statistics section words them.
_REASON_NAMES = {"selected": "issuing (selected)", "wait": "fixed-latency dependency (wait)",
                 "long_scoreboard": "memory (long scoreboard)", "short_scoreboard": "shared memory / MUFU (short scoreboard)",
                 "mio_throttle": "MIO queue (mio throttle)", "lg_throttle": "local/global queue (lg throttle)",
                 "math_pipe_throttle": "math pipe throttle", "not_selected": "not selected",
                 "no_instruction": "no instruction", "branch_resolving": "branch resolving"}


def short_name(name):
    """fwd_wg_kernel<128> from 'void unnamed>::fwd_wg_kernel<128>(Params)'."""
    base = name.split("(")[0]
    return base.split("::")[-1].strip()


def parse(text):
    """The kernels of one ncu text output: [{name, grid, block, metrics: {metric: float}}]."""
    kernels = []
    for line in text.splitlines():
        m = _KERNEL.match(line)
        if m:
            kernels.append({"name": short_name(m.group(1)), "grid": tuple(int(x) for x in m.group(2, 3, 4)),
                            "block": tuple(int(x) for x in m.group(5, 6, 7)), "metrics": {}})
            continue
        m = _METRIC.match(line)
        if m and kernels:
            kernels[-1]["metrics"][m.group(1)] = float(m.group(3).replace(",", ""))
    return kernels


def stall_shares(metrics):
    """{reason: share of all stall cycles}, from either metric family; {} if neither is there."""
    raw = {}
    for name, value in metrics.items():
        for pat in _STALL:
            m = pat.match(name)
            if m:
                raw[m.group(1)] = value
    total = sum(raw.values())
    if total <= 0:
        return {}
    return {reason: value / total for reason, value in raw.items()}


def report(kernels):
    """Markdown: one column per kernel; pipes and instructions, then every stall reason's share."""
    if not kernels:
        return "no kernel with metrics in the input\n"
    cols = [f"{k['name']} {k['grid'][0]}x{k['grid'][1]}x{k['grid'][2]}" for k in kernels]
    out = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]

    def row(label, values):
        out.append(f"| {label} | " + " | ".join(values) + " |")

    row("warp instructions (M)", [f"{k['metrics'].get('smsp__inst_executed.sum', float('nan')) / 1e6:.1f}"
                                   for k in kernels])
    row("active cycles per sub-partition (k)", [f"{k['metrics'].get('smsp__cycles_active.avg', float('nan')) / 1e3:.0f}"
                                                for k in kernels])
    for label, metric in _PIPES:
        row(f"{label} pipe busy", [f"{k['metrics'][metric]:.1f}%" if metric in k["metrics"] else "-" for k in kernels])
    shares = [stall_shares(k["metrics"]) for k in kernels]
    reasons = sorted({r for s in shares for r in s}, key=lambda r: -max(s.get(r, 0.0) for s in shares))
    for r in reasons:
        if max(s.get(r, 0.0) for s in shares) < 0.005:
            continue  # under half a percent everywhere
        row(f"stalled: {_REASON_NAMES.get(r, r.replace('_', ' '))}", [f"{100 * s[r]:.1f}%" if r in s else "-" for s in shares])
    out.append("")
    out.append("Stall shares: each reason's part of the warps' stall cycles per issued instruction "
               "(ncu smsp__average_warp_latency_issue_stalled_*), summed over reasons; 'issuing' is "
               "the cycles a warp was selected.")
    return "\n".join(out) + "\n"


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        sys.stdout.write(__doc__)
        return 0 if len(argv) >= 2 else 2
    kernels = []
    for path in argv[1:]:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                kernels += parse(f.read())
        except OSError as e:
            sys.stderr.write(f"stall_reasons.py: cannot read {path}: {e.strerror}\n")
            return 1
    sys.stdout.write(report(kernels))
    return 0 if kernels else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
