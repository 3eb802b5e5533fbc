#!/usr/bin/env bash
# moelab on two GPUs of one host (issue 9): the equivalence tests, the NCCL peer bandwidth, the
# 300-step Brown curves at 1 GPU / ep=2 / dp=2, and throughput at a fixed per-GPU batch.
# Usage (on the GPU machine, from the repository root): parallel_h200x2.sh INSTALL_DIR OUT_DIR
# INSTALL_DIR: a relocatable install with moelab_gpu_tests copied beside moelab. Needs data/brown.
# PARTS (environment) picks what runs, default all: "tests nccl brown proc tput".
set -u
PARTS=${PARTS:-"tests nccl brown proc tput"}
want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
inst=$(readlink -f "$1"); final=$(readlink -f "$2"); mkdir -p "$final"
out=$(mktemp -d)   # everything goes here; $final gets the summary, the Brown logs and one archive
trap 'cp "$out/summary.txt" "$out"/brown_*.h5 "$final"/ 2>/dev/null; tar czf "$final/all_logs.tgz" -C "$out" . ; rm -rf "$out"' EXIT
export NCCL_NVLS_ENABLE=0   # NVLink multicast must stay off on these machines
M="$inst/moelab"
log() { echo "== $*" | tee -a "$out/summary.txt"; }
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee -a "$out/summary.txt"

if want tests; then
log "gpu tests (op test, NCCL communicator, parallel equivalence)"
timeout -k 10 240 "$inst/moelab_gpu_tests" "[parallel]" 2>&1 | grep -E "warning|WARN|relative|largest|passed|failed|FAILED" | tee -a "$out/summary.txt"
timeout -k 10 240 "$inst/moelab_gpu_tests" 2>&1 | tail -3 | tee -a "$out/summary.txt"
fi
if want nccl; then
log "NCCL all-to-all vs send/recv bandwidth"
timeout -k 10 120 "$inst/moelab_gpu_tests" "[bench][nccl]" 2>&1 | tail -25 | tee -a "$out/summary.txt"
fi
if want brown; then

log "Brown, 300 steps, f32: one GPU, ep=2, dp=2 (same global batch 16 x 128)"
for layout in "1gpu:" "ep2:--set parallel.ep=2" "dp2:--set parallel.dp=2"; do
  name=${layout%%:*}; sets=${layout#*:}
  timeout -k 10 150 "$M" train --config experiments/configs/brown_small.ini --backend cuda --set train.steps=300 \
    --set log.eval_every=50 --set log.checkpoint_every=0 $sets --out "$out/brown_$name.h5" --overwrite \
    > "$out/brown_$name.txt" 2>&1
  echo "$name: rc=$? $(grep summary "$out/brown_$name.txt")" | tee -a "$out/summary.txt"
done

fi
if want proc; then
log "one process per GPU (--rank/--world, NCCL id through a file), ep=2, the same 300 Brown steps"
rm -f "$out/nccl.id"
for r in 0 1; do
  timeout -k 10 150 "$M" train --config experiments/configs/brown_small.ini --backend cuda --set train.steps=300 \
    --set log.eval_every=50 --set log.checkpoint_every=0 --set parallel.ep=2 --rank $r --world 2 \
    --nccl-id "$out/nccl.id" --out "$out/proc_ep2.h5" --overwrite > "$out/proc_rank$r.txt" 2>&1 &
done
wait
/usr/bin/env python3 - "$out" <<'PY' | tee -a "$out/summary.txt"
import sys, h5py, numpy as np
out = sys.argv[1]
a = h5py.File(f"{out}/proc_ep2.h5", "r")["train/loss"][:]
b = h5py.File(f"{out}/brown_ep2.h5", "r")["train/loss"][:]
print(f"processes vs threads, ep=2: max |loss difference| = {np.max(np.abs(a - b)):.3e} over {len(a)} steps")
PY

fi
if want tput; then
log "throughput, bf16, 4 layers d 1024, 8 experts x 4096 top-2, 32 x 512 tokens per GPU, 80 steps"
T="--set model.layers=4 --set model.d_model=1024 --set model.heads=8 --set model.experts=8 --set model.top_k=2
   --set model.d_expert=4096 --set model.moe_every=1 --set model.dtype=bf16 --set train.seq=512 --set train.steps=80
   --set train.warmup=5 --set train.lr=1e-4 --set log.eval_every=0 --set log.checkpoint_every=0 --set log.flush_every=80
   --set data.source=synthetic --set router.aux_alpha=0.01"
LAYOUTS=("1gpu:--set train.batch=32" "dp2:--set train.batch=64 --set parallel.dp=2"
         "dp2_no_overlap:--set train.batch=64 --set parallel.dp=2 --set parallel.overlap_grad_reduce=false"
         "ep2:--set train.batch=64 --set parallel.ep=2" "ep2_nonblocking:--set train.batch=64 --set parallel.ep=2"
         "1gpu_again:--set train.batch=32")
for layout in "${LAYOUTS[@]}"; do
  name=${layout%%:*}; sets=${layout#*:}
  case $name in *nonblocking) export MOELAB_NCCL_BLOCKING=0 ;; *) export MOELAB_NCCL_BLOCKING=1 ;; esac
  timeout -k 10 150 "$M" train --config experiments/configs/brown_small.ini --backend cuda $T $sets \
    --out "$out/tput_$name.h5" --overwrite > "$out/tput_$name.txt" 2>&1
  echo "$name: rc=$? $(tail -1 "$out/tput_$name.txt" | cut -c1-150)" | tee -a "$out/summary.txt"
done
/usr/bin/env python3 - "$out" <<'PY' | tee -a "$out/summary.txt"
import sys, h5py, numpy as np
out = sys.argv[1]
# Per-step tokens/s ramps up over the first ~20 steps and varies +-15% from step to step:
# medians of steps 41-80, with the interquartile range; the one-GPU baseline is the mean of the
# two one-GPU runs (first and last in the call).
FIRST = 40
rows, med1 = [], []
for name, gpus in (("1gpu", 1), ("dp2", 2), ("dp2_no_overlap", 2), ("ep2", 2), ("ep2_nonblocking", 2), ("1gpu_again", 1)):
    try:
        f = h5py.File(f"{out}/tput_{name}.h5", "r")
    except OSError as e:
        rows.append((name, gpus, None, str(e))); continue
    tps = f["train/tokens_per_sec"][FIRST:]
    med = float(np.median(tps)); q1, q3 = np.percentile(tps, [25, 75])
    if gpus == 1: med1.append(med)
    share, gbs = "-", "-"
    if "parallel" in f:
        step_s = np.median(32 * 512 * gpus / tps)
        comm = np.median(f["parallel/comm_seconds"][FIRST:], axis=0)
        share = f"{float(np.mean(comm)) / step_s:.1%}"
        sent = np.median(f["parallel/a2a_sent_bytes"][FIRST:], axis=0)
        a2a = np.median(f["parallel/a2a_seconds"][FIRST:], axis=0)
        if sent.max() > 0: gbs = f"{float(np.mean(sent)) / float(np.mean(a2a)) / 1e9:.1f}"
    rows.append((name, gpus, (med, q1, q3, share, gbs), None))
base = float(np.mean(med1)) if med1 else float("nan")
print(f"one-GPU baseline: {base:,.0f} tokens/s (mean of {', '.join(f'{m:,.0f}' for m in med1)})")
print("| layout | GPUs | tokens/s (median, steps 41-80) | IQR | per GPU | scaling vs 1 GPU | comm share of step | a2a GB/s per rank |")
print("|---|---|---|---|---|---|---|---|")
for name, gpus, r, err in rows:
    if r is None:
        print(f"| {name} | {gpus} | (no log: {err}) |"); continue
    med, q1, q3, share, gbs = r
    print(f"| {name} | {gpus} | {med:,.0f} | {q1:,.0f}-{q3:,.0f} | {med / gpus:,.0f} | {med / base:.2f}x | {share} | {gbs} |")
PY
fi
ls -la "$out" | tail -n +2 | awk '{print $5, $9}' >> "$out/summary.txt"
