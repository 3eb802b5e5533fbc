set -u; export NCCL_NVLS_ENABLE=0
lim() { local s=$1; shift; timeout -k 10 "$s" setsid -w "$@"; }
mkdir -p /tmp/n && tar xzf build-carry/gpu-inst.tgz -C /tmp/n
T=/tmp/n/gpu-inst/moelab_gpu_tests; M=/tmp/n/gpu-inst/moelab
lim 120 $T "gpu ops: grouped_gemm*" > $OUT/gpu_ggemm_ops.txt 2>&1; echo "grouped gemm ops rc=$?: $(tail -2 $OUT/gpu_ggemm_ops.txt | tr '\n' ' ')"
grep -B2 -A12 "FAILED" $OUT/gpu_ggemm_ops.txt | head -40
lim 200 $T "[bench][ggemm]" > $OUT/ggemm_bench.txt 2>&1; echo "ggemm bench rc=$?"; grep "^|" $OUT/ggemm_bench.txt
: > $OUT/table.txt
for cfg in A B C D E F D E A; do
  args=$(python3 experiments/bench/bench_configs.py moelab-args $cfg)
  for g in auto grouped; do
    case "$cfg$g" in [ABCF]grouped) continue;; esac
    MOELAB_GROUPED_GEMM=$g lim 120 $M bench $args --set model.dtype=bf16 --backend cuda --iters 20 > $OUT/${cfg}_$g.txt 2>&1
    echo "$cfg $g $(grep ' cuda ' $OUT/${cfg}_$g.txt | tail -1 | awk '{print $8, $11}')" >> $OUT/table.txt
  done; done
for s in fine; do args=$(python3 experiments/bench/bench_configs.py moe-moelab-args $s)
  for g in auto per_expert; do
    MOELAB_GROUPED_GEMM=$g lim 120 $M bench moe-layer $args --backend cuda --set model.dtype=bf16 --iters 20 > $OUT/moe_${s}_$g.txt 2>&1
    echo "moe $s $g: $(grep 'moe-layer' $OUT/moe_${s}_$g.txt | tail -1 | cut -c60-300)" >> $OUT/table.txt
  done; done
cat $OUT/table.txt
