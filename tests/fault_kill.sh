#!/usr/bin/env bash
# moelab: SIGKILL at random moments and exactly in the middle of log and checkpoint writes; after
# every kill nothing is lost (the log reads and holds a prefix of the reference run with
# identical values, every checkpoint verifies, the lock of the dead process does not block) and
# a resume from the newest checkpoint finishes with a log bit-identical to an uninterrupted run.
# Usage: fault_kill.sh MOELAB [ROUNDS]. The schedule is seeded: MOELAB_FAULT_SEED (default 11);
# a failure prints the seed and the round, and the round's kill.
set -u
moelab=$(readlink -f "$1"); rounds=${2:-12}; seed=${MOELAB_FAULT_SEED:-11}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=/usr/bin/python3
$py -c 'import h5py' 2>/dev/null || { echo "FAIL: $py with h5py is needed (make deps installs python3-h5py)"; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
state=$seed
rand() { state=$(( (state * 1103515245 + 12345) % 2147483648 )); echo $(( state / 65536 % $1 )); }

cat "$here/tiny_model.ini" > run.ini
cat >> run.ini <<INI
[router]
aux_alpha = 0.01
bias_update_rate = 0.001
[train]
steps = 30
batch = 2
seq = 16
lr = 0.01
warmup = 2
[log]
eval_every = 10
eval_batches = 1
flush_every = 3
checkpoint_every = 5
out = run.h5
INI

# same_prefix A B: A's rows are a prefix of B's (exact floats); "full" also needs equal length.
check() {
  $py - "$@" <<'PY'
import sys, h5py, numpy as np
a, b, mode = sys.argv[1], sys.argv[2], sys.argv[3]
fa, fb = h5py.File(a, "r"), h5py.File(b, "r")
for name in ["train/step", "train/loss", "train/grad_norm", "train/lr", "eval/step", "eval/loss",
             "router/layer_00/routed", "router/layer_01/mean_prob"]:
    x, y = fa[name][()], fb[name][()]
    if mode == "full" and len(x) != len(y):
        sys.exit(f"{name}: {len(x)} rows, reference {len(y)}")
    if len(x) > len(y) or not np.array_equal(x, y[: len(x)]):
        sys.exit(f"{name}: not a bit-identical prefix of the reference")
n = len(fa["train/step"])
for g in ["router/layer_00", "router/layer_01"]:
    for k in fa[g]:
        if k != "category_counts" and len(fa[g][k]) != n:
            sys.exit(f"{g}/{k}: {len(fa[g][k])} rows, /train has {n}")
PY
}

"$moelab" train --config run.ini --out ref.h5 --set log.checkpoint_dir=ref_ck >/dev/null || { echo "FAIL: reference run"; exit 1; }
count() { MOELAB_FAULT="$1:0" "$moelab" train --config run.ini --out "count_$1.h5" --set "log.checkpoint_dir=count_$1" 2>&1 >/dev/null |
          sed -n 's/^moelab: fault points: \([0-9]*\) hits.*/\1/p'; }
n_log=$(count log.write); n_ck=$(count ckpt.write)
[ "${n_log:-0}" -gt 0 ] && [ "${n_ck:-0}" -gt 0 ] || { echo "FAIL: could not count the write points ($n_log, $n_ck)"; exit 1; }
start=$(date +%s%N); "$moelab" train --config run.ini --out time.h5 --set log.checkpoint_dir=time_ck >/dev/null
ms=$(( ($(date +%s%N) - start) / 1000000 + 1 ))

fails=0
for r in $(seq 1 "$rounds"); do
  rm -rf run.h5 run.h5.* run_checkpoints
  case $(( r % 3 )) in
    0) what="MOELAB_FAULT=log.write:$(( 1 + $(rand "$n_log") )):kill"; (env "$what" "$moelab" train --config run.ini >/dev/null 2>&1) 2>/dev/null ;;
    1) what="MOELAB_FAULT=ckpt.write:$(( 1 + $(rand "$n_ck") )):kill"; (env "$what" "$moelab" train --config run.ini >/dev/null 2>&1) 2>/dev/null ;;
    2) delay=$(rand "$ms"); what="kill -9 after $delay ms"
       "$moelab" train --config run.ini >/dev/null 2>&1 & pid=$!
       sleep "$(printf '0.%03d' "$delay")" 2>/dev/null || sleep 0
       kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null ;;
  esac
  ctx="seed $seed, round $r ($what)"
  if [ -f run.h5 ] && ! err=$(check run.h5 ref.h5 prefix 2>&1); then echo "FAIL: $ctx: log after the kill: $err"; fails=$((fails + 1)); continue; fi
  for ck in run_checkpoints/step_*.ckpt; do
    [ -e "$ck" ] || continue
    "$moelab" generate --checkpoint "$ck" --tokens 1 >/dev/null 2>&1 || { echo "FAIL: $ctx: $ck does not load"; fails=$((fails + 1)); }
  done
  latest=$(ls run_checkpoints/step_*.ckpt 2>/dev/null | sort | tail -1)
  if [ -n "$latest" ]; then out=$("$moelab" train --config run.ini --resume "$latest" 2>&1)
  else out=$("$moelab" train --config run.ini --overwrite 2>&1); fi
  [ $? -eq 0 ] || { echo "FAIL: $ctx: resume from '${latest:-scratch}' failed:"; echo "$out" | tail -3; fails=$((fails + 1)); continue; }
  err=$(check run.h5 ref.h5 full 2>&1) || { echo "FAIL: $ctx: resumed log: $err"; fails=$((fails + 1)); }
done
echo "fault_kill: $rounds rounds (seed $seed), $fails failed"
[ $fails -eq 0 ]
