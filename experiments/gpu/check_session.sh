#!/usr/bin/env bash
# One GPU call that checks a session's CUDA changes and measures what they bought.
#
# Usage (on the GPU machine, from the repository root): check_session.sh INSTALL_DIR OUT_DIR
#   INSTALL_DIR  a relocatable install with moelab and, beside it, moelab_gpu_tests (README, "GPU")
#   OUT_DIR      gets one log per part and summary.txt (also printed at the end)
# PARTS (default "tests crosscheck summary"):
#   tests       moelab_gpu_tests, every case (op test, NCCL with >= 2 GPUs, imported HF models)
#   crosscheck  `moelab crosscheck` (CPU f64 against CUDA f32 and bf16) on the features of the
#               imported architectures: q/k/v biases + dense layer + gated shared expert of its
#               own width + Hugging Face's aux loss; per-head q/k norm with head_dim != d/heads;
#               whole-projection q/k norm
#   summary     `moelab bench --breakdown` of configs A, B, D (experiments/bench/bench_configs.py),
#               bf16, with the router's one-copy summary and with MOELAB_ROUTER_SUMMARY=separate,
#               alternated twice in this one call: step ms and host syncs per step
# Every run has a time limit and runs in its own process group.
set -u
[ $# -eq 2 ] || { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
inst=$(readlink -f "$1")
mkdir -p "$2" && out=$(readlink -f "$2")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PARTS=${PARTS:-"tests crosscheck summary"}
export NCCL_NVLS_ENABLE=0
want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
summary="$out/summary.txt"
: > "$summary"
lim() { local s=$1; shift; timeout -k 10 "$s" setsid -w "$@"; }

if want tests; then
  lim 300 "$inst/moelab_gpu_tests" > "$out/gpu_tests.txt" 2>&1
  echo "moelab_gpu_tests rc=$?: $(tail -3 "$out/gpu_tests.txt" | tr '\n' ' ')" >> "$summary"
  grep -E "gpu hf parity" "$out/gpu_tests.txt" >> "$summary"
fi

if want crosscheck; then
  # The quickstart model on synthetic data (no corpus to carry).
  base="--config $here/experiments/configs/quickstart.ini --set train.backend=cuda --set data.source=synthetic"
  i=0
  for sets in \
      "--set model.qkv_bias=true --set model.layers=3 --set model.moe_every=1 --set model.dense_layers=1 --set model.shared_experts=1 --set model.shared_width=40 --set model.shared_gate=true --set router.aux_convention=hf --set router.aux_alpha=0.05" \
      "--set model.qk_norm=head --set model.head_dim=24 --set model.top_k=1" \
      "--set model.qk_norm=projection --set router.normalize=false"; do
    i=$((i + 1))
    # shellcheck disable=SC2086
    lim 240 "$inst/moelab" crosscheck $base $sets --out "$out/crosscheck_$i.h5" > "$out/crosscheck_$i.txt" 2>&1
    echo "crosscheck $i rc=$? ($sets): $(grep -iE 'pass|fail|beyond' "$out/crosscheck_$i.txt" | tail -2 | tr '\n' ' ')" >> "$summary"
  done
fi

if want summary; then
  echo "| config | mode | step ms | host syncs / step |" >> "$summary"
  echo "|---|---|---|---|" >> "$summary"
  for cfg in A B D; do
    args=$(python3 "$here/experiments/bench/bench_configs.py" moelab-args "$cfg")
    for rep in 1 2; do
      for mode in fused separate; do
        log="$out/bench_${cfg}_${mode}_$rep.txt"
        # shellcheck disable=SC2086
        MOELAB_ROUTER_SUMMARY=$mode lim 240 "$inst/moelab" bench $args --set model.dtype=bf16 --backend cuda \
          --iters 20 --breakdown > "$log" 2>&1
        # The bench line: run backend dtype tokens fwd bwd adamw step tokens/s.
        step=$(awk '$2 == "cuda" { print $8; exit }' "$log")
        syncs=$(awk '/host syncs per step/ { print $NF; exit }' "$log")
        echo "| $cfg | $mode ($rep) | ${step:-?} | ${syncs:-?} |" >> "$summary"
      done
    done
  done
fi
cat "$summary"
