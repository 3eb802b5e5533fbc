#!/usr/bin/env bash
# Tables and plots of the seeded GPU study (issue 13 part 4), here, after the device calls of
# experiments/gpu/seeded_gpu_studies.sh (one seed each):
#
#   experiments/gpu/seeded_gpu_report.sh OUT1 OUT2 OUT3     # the calls' OUT folders (any number)
#
# Merges OUTi/seeded_gpu/ (logs and each call's sweep.json) into runs/seeded_gpu/, then writes
#   runs/reports/seeded_gpu/report.md        analysis/report.py: every metric per grid point over
#                                            the seeds, paired differences from "moe" with Holm
#   runs/reports/seeded_gpu_vs_k1/           the same against k1 (the capacity claim is top-1)
#   DOCS/claims.md, claims.png               analysis/gpu_claims.py: each claim, CPU against GPU
#   DOCS/seeded_gpu.md, seeded_gpu_vs_k1.md, seeded_gpu.png, seeded_gpu_loss.png, steps.txt
# DOCS defaults to docs/results/seeded_gpu. RUNS (default runs) moves the runs/ folders.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[ $# -ge 1 ] || { sed -n '2,14p' "$0"; exit 2; }
docs=${DOCS:-docs/results/seeded_gpu}
runs=${RUNS:-runs}
merged="$runs/seeded_gpu"
rm -rf "$merged"; mkdir -p "$merged" "$docs" "$runs/reports"
: > "$docs/steps.txt"
for o in "$@"; do
  d="$o/seeded_gpu"
  [ -f "$d/sweep.json" ] || { echo "no $d/sweep.json (a seeded_gpu_studies.sh OUT folder?)" >&2; exit 2; }
  cp "$d"/run_*.h5 "$merged"/
  cat "$d/steps.txt" "$d/gpu.txt" >> "$docs/steps.txt" 2>/dev/null || true
done
/usr/bin/python3 - "$merged" "$@" <<'PY'
import json, sys
from pathlib import Path
out, dirs = Path(sys.argv[1]), sys.argv[2:]
idx = [json.loads((Path(d) / "seeded_gpu" / "sweep.json").read_text()) for d in dirs]
m = dict(idx[0])
m["seeds"] = sorted({s for i in idx for s in i.get("seeds", [])})
m["planned_runs"] = sum(i.get("planned_runs", 0) for i in idx)
m["finished_runs"] = sum(i.get("finished_runs", 0) for i in idx)
groups = {}
for i in idx:
    for g in i.get("groups", []):
        acc = groups.setdefault(g["point"], {"point": g["point"], "values": g.get("values", {}), "seeds": [], "files": []})
        acc["seeds"] += g.get("seeds", [])
        acc["files"] += g.get("files", [])
m["groups"] = [groups[g["point"]] for g in idx[0].get("groups", [])]
m["runs"] = [r for i in idx for r in i.get("runs", [])]
(out / "sweep.json").write_text(json.dumps(m, indent=1) + "\n")
print("{}: {} runs, seeds {}".format(out, len(m["runs"]), m["seeds"]))
PY
title="seeded studies at GPU scale (experiments/configs/gpu/seeded_gpu.ini)"
/usr/bin/python3 analysis/report.py "$merged" --out "$runs/reports/seeded_gpu" --title "$title" >/dev/null
/usr/bin/python3 analysis/report.py "$merged" --out "$runs/reports/seeded_gpu_vs_k1" --summary-only --baseline k1 \
  --title "$title, against k1 (top-1 dropless)" >/dev/null
/usr/bin/python3 analysis/gpu_claims.py "$merged" --out "$docs" >/dev/null
cp "$runs/reports/seeded_gpu/tables.md" "$docs/seeded_gpu.md"
cp "$runs/reports/seeded_gpu_vs_k1/tables.md" "$docs/seeded_gpu_vs_k1.md"
cp "$runs/reports/seeded_gpu/seeded_comparison.png" "$docs/seeded_gpu.png"
cp "$runs/reports/seeded_gpu/seeded_loss.png" "$docs/seeded_gpu_loss.png"
echo "$runs/reports/seeded_gpu/report.md; $docs/claims.md, seeded_gpu.md, seeded_gpu_vs_k1.md"
