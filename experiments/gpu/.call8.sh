set -u; export NCCL_NVLS_ENABLE=0
lim() { local s=$1; shift; timeout -k 10 "$s" setsid -w "$@"; }
mkdir -p /tmp/n && tar xzf build-carry/gpu-inst.tgz -C /tmp/n; M=/tmp/n/gpu-inst/moelab
for rep in 1 2; do for cfg in E F D; do for w in 3 30; do
  args=$(python3 experiments/bench/bench_configs.py moelab-args $cfg)
  lim 60 $M bench $args --set model.dtype=bf16 --backend cuda --iters 20 --warmup $w > $OUT/${cfg}_w${w}_$rep.txt 2>&1
  echo "$cfg warmup $w run $rep: $(grep ' cuda ' $OUT/${cfg}_w${w}_$rep.txt | awk '{print "fwd", $5, "bwd", $6, "opt", $7, "step", $8}')"
done; done; done
