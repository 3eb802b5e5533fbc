#!/usr/bin/env bash
# Tests of the Python analysis tools, from any directory:
#   1. pytest over analysis/tests with Debian's interpreter,
#   2. notebooks/ committed without outputs,
#   3. every notebook executed headlessly against real runs of the moelab binary (a run with
#      evaluations and three checkpoints, a 2-point sweep and a 2-point x 3-seed study, made here
#      on the synthetic data source in seconds; report.py on the study), or against synthetic
#      logs and checkpoints when no binary is built (MOELAB_BIN, default build/moelab).
# Needs /usr/bin/python3 with numpy, h5py, matplotlib, scipy, pytest, nbconvert, nbformat, ipykernel
# (Debian packages; `make deps` installs them). Exit status non-zero on any failure.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY=/usr/bin/python3

if [[ ! -x "$PY" ]]; then
  echo "error: $PY not found: the analysis tools run on Debian's python3 (apt-get install python3)" >&2
  exit 1
fi
if ! missing="$("$PY" - <<'PYEOF'
import importlib, sys
mods = ["numpy", "h5py", "matplotlib", "scipy", "pytest", "nbconvert", "nbformat", "nbclient", "ipykernel"]
miss = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception:
        miss.append(m)
print(" ".join(miss))
sys.exit(1 if miss else 0)
PYEOF
)"; then
  echo "error: $PY lacks Python package(s): $missing" >&2
  echo "       install them with \`make deps\` (Debian: apt-get install python3-numpy python3-h5py" >&2
  echo "       python3-matplotlib python3-scipy python3-pytest python3-nbconvert python3-nbformat python3-ipykernel)." >&2
  echo "       The python3 first on PATH ($(command -v python3 || echo none)) is not used." >&2
  exit 1
fi

export MPLBACKEND=Agg
TMP="$(mktemp -d "${TMPDIR:-/tmp}/moelab_analysis_tests.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

echo "== pytest (analysis/tests)"
"$PY" -m pytest -q -p no:cacheprovider analysis/tests

echo "== notebooks committed without outputs"
"$PY" analysis/check_notebooks.py

MOELAB_BIN="${MOELAB_BIN:-$REPO/build/moelab}"
if [[ -x "$MOELAB_BIN" ]]; then
  echo "== notebooks executed against runs made now by $MOELAB_BIN"
  cat > "$TMP/tiny.ini" <<INI
[model]
d_model = 32
heads = 2
experts = 4
d_expert = 32
moe_every = 1
[router]
aux_alpha = 0.01
capacity_factor = 1.25
[train]
batch = 4
seq = 32
steps = 60
lr = 0.01
[data]
source = synthetic
[log]
eval_every = 20
eval_batches = 2
checkpoint_dir = $TMP/ck
INI
  "$MOELAB_BIN" train --config "$TMP/tiny.ini" --out "$TMP/run.h5" --set log.checkpoint_every=20 >/dev/null
  "$MOELAB_BIN" train --config "$TMP/tiny.ini" --set sweep.router.aux_alpha=0,0.1 \
    --out "$TMP/sweep/run.h5" >/dev/null
  # A seeded study (train.seeds): 2 grid points x 3 seeds, sweep.json with the baseline.
  "$MOELAB_BIN" train --config "$TMP/tiny.ini" --set sweep.router.aux_alpha=0,0.1 --set train.seeds=1,2,3 \
    --set sweep.baseline=aux_alpha=0 --out "$TMP/seeded/run.h5" >/dev/null
  "$PY" analysis/report.py "$TMP/seeded" --out "$TMP/seeded_report" --summary-only >/dev/null
  grep -q "Differences from the baseline \`aux_alpha=0\`" "$TMP/seeded_report/tables.md"
else
  echo "== notebooks executed against synthetic logs (no moelab binary at $MOELAB_BIN)"
  "$PY" analysis/make_synthetic_log.py "$TMP/run.h5" --layers 2 --steps 300 --capacity-factor 1.25 >/dev/null
  "$PY" analysis/make_synthetic_log.py --sweep "$TMP/sweep" --steps 200 --capacity-factor 1.25 >/dev/null
  "$PY" analysis/make_synthetic_log.py --sweep "$TMP/seeded" --steps 200 --seeds 1,2,3 --sweep-values 0,0.1 \
    --baseline 0 >/dev/null
  "$PY" -c "import sys; sys.path.insert(0, 'analysis'); from moelab_analysis.synthetic import write_synthetic_checkpoints as w; w(sys.argv[1])" "$TMP/ck"
fi
# A private kernel spec named python3 that is Debian's interpreter: JUPYTER_PATH comes first in
# Jupyter's search, so no user- or pyenv-installed kernel named python3 can take its place.
mkdir -p "$TMP/jupyter/kernels/python3"
cat > "$TMP/jupyter/kernels/python3/kernel.json" <<JSON
{"argv": ["$PY", "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
 "display_name": "Python 3 (Debian)", "language": "python"}
JSON
export JUPYTER_PATH="$TMP/jupyter" JUPYTER_RUNTIME_DIR="$TMP/jupyter/runtime" PYDEVD_DISABLE_FILE_VALIDATION=1
export MOELAB_RUN="$TMP/run.h5" MOELAB_SWEEP="$TMP/sweep" MOELAB_SEEDED_SWEEP="$TMP/seeded" MOELAB_FIG_DIR="$TMP/figs"
export MOELAB_CHECKPOINTS="$TMP/ck"
shopt -s nullglob
notebooks=(notebooks/*.ipynb)
if (( ${#notebooks[@]} == 0 )); then
  echo "error: no notebooks in notebooks/" >&2
  exit 1
fi
"$PY" -m jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=600 \
  --ExecutePreprocessor.kernel_name=python3 --output-dir "$TMP/executed" "${notebooks[@]}" \
  --log-level=WARN
# Each executed notebook printed the kernel's interpreter: it must be Debian's.
for nb in "${notebooks[@]}"; do
  out="$TMP/executed/$(basename "$nb")"
  if ! grep -q "interpreter: $PY" "$out"; then
    echo "error: $nb did not run on $PY (see the 'interpreter:' line in $out)" >&2
    exit 1
  fi
  echo "executed $nb"
done
echo "all analysis tests passed"
