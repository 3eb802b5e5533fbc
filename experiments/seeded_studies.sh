#!/usr/bin/env bash
# The README's results: the CPU study presets, 5 seeds each (train.seeds = 1, 2, 3, 4, 5), and
# their seeded tables in docs/results/seeded/.
#
#   experiments/seeded_studies.sh train  [STUDY ...]   run the studies (nice -n 10), then report
#   experiments/seeded_studies.sh report [STUDY ...]   the reports and tables from runs/STUDY/ only
#
# STUDY is a preset name (default: all seven, the most important first). Logs go to runs/STUDY/
# (git-ignored; an existing study is refused: move it away or pass --overwrite through
# MOELAB_TRAIN_ARGS), reports to runs/reports/STUDY/ (report.md with the plots), and the tables
# alone to docs/results/seeded/STUDY.md (with its final-metrics plot STUDY.png), plus
# STUDY_vs_POINT.md for the extra baselines that a README claim needs. MOELAB (default build/moelab) is the binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
moelab=${MOELAB:-build/moelab}
mode=${1:-}
shift || true
case $mode in train|report) ;; *) sed -n '2,14p' "$0"; exit 2 ;; esac
studies=("$@")
[ ${#studies[@]} -gt 0 ] || studies=(dense_vs_moe aux_alpha_sweep routing_policy capacity topk zloss_sweep gating_noise)

# Extra baselines: the comparisons a README claim needs beyond the preset's own baseline.
extra_baselines() {
  case $1 in
    aux_alpha_sweep) echo "aux_alpha=0.01" ;;
    capacity) echo "capacity_factor=1_drop_policy=position" ;;
    zloss_sweep) echo "z_loss=0.001" ;;
  esac
}
title() {
  case $1 in
    dense_vs_moe) echo "dense vs MoE at equal active parameters (dense_vs_moe.ini)" ;;
    aux_alpha_sweep) echo "aux loss weight alpha (aux_alpha_sweep.ini)" ;;
    routing_policy) echo "routing policies (routing_policy.ini)" ;;
    capacity) echo "capacity factor and drop policy, top-1 (capacity.ini)" ;;
    topk) echo "experts per token k (topk.ini)" ;;
    zloss_sweep) echo "router z-loss weight (zloss_sweep.ini)" ;;
    gating_noise) echo "gating noise (gating_noise.ini)" ;;
    *) echo "$1" ;;
  esac
}

mkdir -p docs/results/seeded runs/reports
for s in "${studies[@]}"; do
  [ -f "experiments/configs/$s.ini" ] || { echo "no preset experiments/configs/$s.ini" >&2; exit 2; }
  if [ "$mode" = train ]; then
    start=$(date +%s)
    # shellcheck disable=SC2086
    nice -n 10 "$moelab" train --config "experiments/configs/$s.ini" ${MOELAB_TRAIN_ARGS:-}
    echo "$s: trained in $(( $(date +%s) - start )) s"
  fi
  dir=$(dirname "$("$moelab" config --config "experiments/configs/$s.ini" --get log.out)")
  /usr/bin/python3 analysis/report.py "$dir" --out "runs/reports/$s" --summary-only --title "$(title "$s")" >/dev/null
  cp "runs/reports/$s/tables.md" "docs/results/seeded/$s.md"
  cp "runs/reports/$s/seeded_comparison.png" "docs/results/seeded/$s.png"
  [ "$s" != dense_vs_moe ] || cp "runs/reports/$s/seeded_loss.png" "docs/results/seeded/${s}_loss.png"
  for b in $(extra_baselines "$s"); do
    /usr/bin/python3 analysis/report.py "$dir" --out "runs/reports/${s}_vs_$b" --summary-only --baseline "$b" \
      --title "$(title "$s"), against $b" >/dev/null
    cp "runs/reports/${s}_vs_$b/tables.md" "docs/results/seeded/${s}_vs_$b.md"
  done
  echo "$s: runs/reports/$s/report.md, docs/results/seeded/$s.md"
done
