set -u; export NCCL_NVLS_ENABLE=0
lim() { local s=$1; shift; timeout -k 10 "$s" setsid -w "$@"; }
mkdir -p /tmp/b /tmp/n && tar xzf build-carry/base-inst.tgz -C /tmp/b && tar xzf build-carry/gpu-inst.tgz -C /tmp/n
B=/tmp/b/gpu-inst/moelab; N=/tmp/n/gpu-inst/moelab
lim 240 /tmp/n/gpu-inst/moelab_gpu_tests "gpu ops:*" > $OUT/gpu_ops.txt 2>&1; echo "gpu ops rc=$?: $(tail -2 $OUT/gpu_ops.txt | tr '\n' ' ')"
: > $OUT/table.txt
for rep in 1 2; do for cfg in A B C D E F; do
  args=$(python3 experiments/bench/bench_configs.py moelab-args $cfg)
  for side in base new; do bin=$B; [ $side = new ] && bin=$N
    lim 120 $bin bench $args --set model.dtype=bf16 --backend cuda --iters 20 > $OUT/${cfg}_${side}_$rep.txt 2>&1
    echo "$cfg $side $rep $(grep ' cuda ' $OUT/${cfg}_${side}_$rep.txt | tail -1 | awk '{print $8, $11}')" >> $OUT/table.txt
  done; done; done
for g in grouped per_expert; do args=$(python3 experiments/bench/bench_configs.py moelab-args A)
  MOELAB_GROUPED_GEMM=$g lim 120 $N bench $args --set model.dtype=bf16 --backend cuda --iters 20 > $OUT/A_new_$g.txt 2>&1
  echo "A new-$g $(grep ' cuda ' $OUT/A_new_$g.txt | tail -1 | awk '{print $8, $11}')" >> $OUT/table.txt; done
CONFIGS="D" lim 200 bash experiments/gpu/kernel_census.sh /tmp/n/gpu-inst $OUT/census > /dev/null 2>&1
head -20 $OUT/census/census.md
cat $OUT/table.txt
