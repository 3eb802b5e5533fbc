set -u; export NCCL_NVLS_ENABLE=0
lim() { local s=$1; shift; timeout -k 10 "$s" setsid -w "$@"; }
mkdir -p /tmp/n /tmp/b && tar xzf build-carry/gpu-inst.tgz -C /tmp/n && tar xzf build-carry/base-inst.tgz -C /tmp/b
lim 100 /tmp/n/gpu-inst/moelab_gpu_tests > $OUT/gpu_tests.txt 2>&1; echo "gpu tests rc=$?: $(tail -2 $OUT/gpu_tests.txt | tr '\n' ' ')"
grep -B2 -A10 "FAILED" $OUT/gpu_tests.txt | head -30
for cfg in A B E F; do args=$(python3 experiments/bench/bench_configs.py moelab-args $cfg)
  for side in b n; do
    lim 40 /tmp/$side/gpu-inst/moelab bench $args --set model.dtype=bf16 --backend cuda --iters 20 --warmup 30 > $OUT/${cfg}_$side.txt 2>&1
    echo "$cfg $side: $(grep ' cuda ' $OUT/${cfg}_$side.txt | awk '{print $8}')"
  done; done
args=$(python3 experiments/bench/bench_configs.py moelab-args A)
lim 40 /tmp/n/gpu-inst/moelab bench $args --set model.dtype=bf16 --backend cuda --iters 10 --warmup 10 --breakdown 2>&1 | grep -E "host syncs|step \(sum"
