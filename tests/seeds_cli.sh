#!/usr/bin/env bash
# moelab: seeded studies on the command line (issue 13): train.seeds runs every grid point once per
# seed, one log per (grid point, seed) named ..._seed=S, several at once (--jobs) with results
# that do not depend on how many; sweep.json names each run's grid point and seed and groups
# them; existing logs are refused; a failed run stops the study without losing finished runs;
# one run of a study resumes by narrowing the study to it; bad train.seeds name the key.
# Usage: seeds_cli.sh MOELAB
set -u
moelab=$(readlink -f "$1")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=/usr/bin/python3
$py -c 'import h5py' 2>/dev/null || { echo "FAIL: $py with h5py is needed (make deps installs python3-h5py)"; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fails=0; passes=0
ok() { passes=$((passes + 1)); }
bad() { echo "FAIL: $*"; fails=$((fails + 1)); }
# expect_rc NAME RC PATTERN ARGS...: exit code exactly RC and PATTERN (grep -E) in the output.
expect_rc() {
  local name=$1 want=$2 pattern=$3; shift 3
  local out rc
  out=$("$moelab" "$@" 2>&1); rc=$?
  if [ $rc -eq "$want" ] && grep -qE -- "$pattern" <<<"$out"; then ok; else
    bad "$name (exit $rc, want $want): expected /$pattern/ in:"; echo "$out" | head -5; fi
}

cat "$here/tiny_model.ini" > s.ini
cat >> s.ini <<INI
[router]
aux_alpha = 0.01
[train]
steps = 6
batch = 2
seq = 16
lr = 0.01
seeds = 3, 1
[log]
eval_every = 3
eval_batches = 1
flush_every = 2
checkpoint_every = 3
out = a/s.h5
[sweep]
router.aux_alpha = 0, 0.1
baseline = aux_alpha=0.1
INI

# Names: grid point, then the seed; seeds outermost.
out=$("$moelab" config --config s.ini 2>&1)
want="#   aux_alpha=0_seed=3 -> a/s_aux_alpha=0_seed=3.h5
#   aux_alpha=0.1_seed=3 -> a/s_aux_alpha=0.1_seed=3.h5
#   aux_alpha=0_seed=1 -> a/s_aux_alpha=0_seed=1.h5
#   aux_alpha=0.1_seed=1 -> a/s_aux_alpha=0.1_seed=1.h5"
grep -q "# sweep: 4 runs (2 grid points x 2 seeds, seeds outermost)" <<<"$out" && [ "$(grep '^#   ' <<<"$out")" = "$want" ] && ok ||
  { bad "moelab config lists the seeded runs"; echo "$out" | tail -6; }

# Two at a time, then one at a time: the same numbers (each run single-threaded).
out=$("$moelab" train --config s.ini --jobs 2 2>&1); rc=$?
if [ $rc -eq 0 ] && grep -q "4 runs, 2 at a time, each single-threaded (--jobs 2" <<<"$out" &&
   grep -q "^\[aux_alpha=0.1_seed=1\] summary: 6 steps" <<<"$out" && grep -q "(4 of 4 done)" <<<"$out"; then ok; else
  bad "train --jobs 2 (exit $rc)"; echo "$out" | tail -5; fi
ls a/s_aux_alpha=0_seed=3.h5 a/s_aux_alpha=0.1_seed=3.h5 a/s_aux_alpha=0_seed=1.h5 a/s_aux_alpha=0.1_seed=1.h5 \
   a/sweep.json >/dev/null 2>&1 && [ -d a/s_aux_alpha=0.1_seed=1_checkpoints ] && ok || { bad "logs named by seed"; ls a; }
out=$("$moelab" train --config s.ini --jobs 1 --out b/s.h5 2>&1); rc=$?
[ $rc -eq 0 ] && grep -q "4 runs, 1 at a time" <<<"$out" && ok || { bad "train --jobs 1 (exit $rc)"; echo "$out" | tail -3; }

$py - <<'PY' || bad "logs and sweep.json"
import json, sys, h5py, numpy as np
err = []
for name in ["aux_alpha=0_seed=3", "aux_alpha=0.1_seed=3", "aux_alpha=0_seed=1", "aux_alpha=0.1_seed=1"]:
    fa, fb = h5py.File(f"a/s_{name}.h5", "r"), h5py.File(f"b/s_{name}.h5", "r")
    for d in ["train/loss", "train/grad_norm", "eval/loss", "router/layer_00/routed", "router/layer_01/mean_prob"]:
        if not np.array_equal(fa[d][()], fb[d][()]):
            err.append(f"{name}: {d} differs between --jobs 2 and --jobs 1")
    seed = int(name.split("seed=")[1])
    cfg = fa.attrs["config"]
    cfg = cfg.decode() if isinstance(cfg, bytes) else cfg
    if f"\nseed = {seed}\n" not in cfg or "seeds =" in cfg:
        err.append(f"{name}: config attribute does not hold seed = {seed} alone")
# Different seeds differ, one seed at two grid points starts alike (same init and data).
l3, l1 = (h5py.File(f"a/s_aux_alpha=0_seed={s}.h5", "r")["train/loss"][()] for s in (3, 1))
if np.array_equal(l3, l1):
    err.append("seeds 3 and 1 gave the same losses")
idx = json.load(open("a/sweep.json"))
if idx["seeds"] != [3, 1] or idx["baseline"] != "aux_alpha=0.1" or idx["planned_runs"] != 4 or idx["finished_runs"] != 4:
    err.append(f"sweep.json head: {idx}")
runs = {r["file"]: r for r in idx["runs"]}
r = runs.get("s_aux_alpha=0.1_seed=1.h5", {})
if (r.get("point"), r.get("seed"), r.get("values"), r.get("name")) != ("aux_alpha=0.1", 1, {"router.aux_alpha": "0.1"}, "aux_alpha=0.1_seed=1"):
    err.append(f"sweep.json run entry: {r}")
groups = [(g["point"], g["seeds"], g["files"]) for g in idx["groups"]]
want = [("aux_alpha=0", [3, 1], ["s_aux_alpha=0_seed=3.h5", "s_aux_alpha=0_seed=1.h5"]),
        ("aux_alpha=0.1", [3, 1], ["s_aux_alpha=0.1_seed=3.h5", "s_aux_alpha=0.1_seed=1.h5"])]
if groups != want:
    err.append(f"sweep.json groups: {groups}")
if err:
    print("\n".join(err))
    sys.exit(1)
PY
[ $? -eq 0 ] && ok

# Nothing is lost: a rerun is refused before any run starts, naming the logs and sweep.json.
cp a/sweep.json before.json
expect_rc "a rerun of a seeded study is refused" 2 "these outputs exist.*" train --config s.ini
out=$("$moelab" train --config s.ini 2>&1)
grep -q "a/s_aux_alpha=0_seed=3.h5" <<<"$out" && grep -q "a/sweep.json" <<<"$out" && cmp -s a/sweep.json before.json && ok ||
  { bad "the refusal names the logs and sweep.json and changes nothing"; echo "$out" | head -8; }
out=$("$moelab" train --config s.ini --overwrite --set train.seeds=1 --set log.checkpoint_every=0 2>&1) && grep -q "(2 of 2 done)" <<<"$out" &&
  [ "$($py -c 'import json; print(json.load(open("a/sweep.json"))["seeds"])')" = "[1]" ] && ok ||
  { bad "--overwrite reruns the study"; echo "$out" | tail -3; }

# One run of a study resumes by narrowing the study to it: same name, log and checkpoints.
"$moelab" train --config s.ini --out c/s.h5 --jobs 2 >/dev/null 2>&1 || bad "study for the resume"
cp c/s_aux_alpha=0.1_seed=1.h5 ref.h5; cp c/sweep.json c_before.json
out=$("$moelab" train --config s.ini --out c/s.h5 --set sweep.router.aux_alpha=0.1 --set train.seeds=1 \
      --resume c/s_aux_alpha=0.1_seed=1_checkpoints/step_000003.ckpt 2>&1); rc=$?
if [ $rc -eq 0 ] && grep -q "1 run, 1 at a time" <<<"$out" && cmp -s c/sweep.json c_before.json; then ok; else
  bad "resume one run of a study (exit $rc)"; echo "$out" | tail -4; fi
$py - <<'PY' && ok || bad "the resumed run's log equals the uninterrupted one"
import sys, h5py, numpy as np
a, b = h5py.File("c/s_aux_alpha=0.1_seed=1.h5", "r"), h5py.File("ref.h5", "r")
for d in ["train/step", "train/loss", "eval/loss", "router/layer_00/routed"]:
    if not np.array_equal(a[d][()], b[d][()]):
        sys.exit(d + " differs")
PY
expect_rc "--resume with several runs names the way out" 2 "--resume continues one run, and this config has 4.*narrow it" \
  train --config s.ini --out c/s.h5 --resume c/s_aux_alpha=0.1_seed=1_checkpoints/step_000003.ckpt

# A failed run stops the study; the runs in flight finish and stay indexed; its exit status.
out=$("$moelab" train --config s.ini --out f/s.h5 --jobs 2 --set log.checkpoint_every=0 \
      --set sweep.router.aux_alpha= --set sweep.data.source=synthetic,brown --set data.path="$tmp/no_corpus" \
      --set sweep.baseline= 2>&1); rc=$?
if [ $rc -eq 1 ] && grep -q "\[source=brown_seed=3\] moelab: error: .*make data" <<<"$out" &&
   grep -q "'source=brown_seed=3' failed (exit status 1)" <<<"$out" &&
   grep -q "1 of 4 runs finished, the rest were not started" <<<"$out" && [ -f f/s_source=synthetic_seed=3.h5 ] &&
   [ ! -e f/s_source=synthetic_seed=1.h5 ] &&
   [ "$($py -c 'import json; print([r["file"] for r in json.load(open("f/sweep.json"))["runs"]])')" = "['s_source=synthetic_seed=3.h5']" ]; then ok
else bad "a failed run stops the study (exit $rc)"; echo "$out" | grep -v "step " | tail -8; fi

# Bad input names the key (exit 2), before anything runs.
expect_rc "empty train.seeds" 2 "train\.seeds is empty" train --config s.ini --out e/s.h5 --set train.seeds=
expect_rc "duplicate seed" 2 "train\.seeds lists seed 3 twice" train --config s.ini --out e/s.h5 --set train.seeds=3,1,3
expect_rc "non-integer seed" 2 "train\.seeds: 'one' is not an integer >= 0" train --config s.ini --out e/s.h5 --set train.seeds=1,one
printf '[train]\nseeds = 1, 2\nseed = 4\n' > both.ini
expect_rc "seed and seeds in one file" 2 "train\.seed and train\.seeds are both given" train --config both.ini --out e/x.h5
expect_rc "baseline that is no grid point" 2 "sweep\.baseline = 'aux_alpha=1' is not a grid point.*aux_alpha=0, aux_alpha=0\.1" \
  train --config s.ini --out e/s.h5 --set sweep.baseline=aux_alpha=1
expect_rc "--jobs 0" 2 "--jobs = 0 must be >= 1" train --config s.ini --out e/s.h5 --jobs 0
expect_rc "--jobs for one run" 2 "--jobs is for a study" train --config s.ini --out e/s.h5 --jobs 2 \
  --set sweep.router.aux_alpha= --set sweep.baseline= --set train.seed=1
[ ! -e e ] && ok || bad "a refused study wrote something: $(ls -R e)"

echo "$passes passed, $fails failed"
[ $fails -eq 0 ]
