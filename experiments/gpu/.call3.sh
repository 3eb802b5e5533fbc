set -u; export NCCL_NVLS_ENABLE=0
lim() { local s=$1; shift; timeout -k 10 "$s" setsid -w "$@"; }
mkdir -p /tmp/n && tar xzf build-carry/gpu-inst.tgz -C /tmp/n
T=/tmp/n/gpu-inst/moelab_gpu_tests; M=/tmp/n/gpu-inst/moelab
lim 300 $T > $OUT/gpu_tests.txt 2>&1; echo "gpu tests rc=$?: $(tail -2 $OUT/gpu_tests.txt | tr '\n' ' ')"
grep -B2 -A12 -i "failed\|FAILED" $OUT/gpu_tests.txt | head -60
lim 200 $T "[bench][ggemm]" > $OUT/ggemm_bench.txt 2>&1; echo "ggemm bench rc=$?"; grep "^|" $OUT/ggemm_bench.txt
: > $OUT/table.txt
for cfg in A B C D E F; do
  args=$(python3 experiments/bench/bench_configs.py moelab-args $cfg)
  for g in auto mma; do
    MOELAB_GROUPED_GEMM=$g lim 120 $M bench $args --set model.dtype=bf16 --backend cuda --iters 20 > $OUT/${cfg}_$g.txt 2>&1
    echo "$cfg $g $(grep ' cuda ' $OUT/${cfg}_$g.txt | tail -1 | awk '{print $8, $11}')" >> $OUT/table.txt
  done; done
for s in fine mixtral; do args=$(python3 experiments/bench/bench_configs.py moe-moelab-args $s)
  for g in auto mma; do
    MOELAB_GROUPED_GEMM=$g lim 120 $M bench moe-layer $args --backend cuda --set model.dtype=bf16 --iters 20 > $OUT/moe_${s}_$g.txt 2>&1
    echo "moe $s $g: $(grep 'moe-layer' $OUT/moe_${s}_$g.txt | tail -1 | cut -c1-400)" >> $OUT/table.txt
  done; done
cat $OUT/table.txt
