set -u; export NCCL_NVLS_ENABLE=0
mkdir -p /tmp/n && tar xzf build-carry/gpu-inst.tgz -C /tmp/n
CONFIGS="A B C" PARTS="gemm moelab compile moe" MOE_SHAPES="fine mixtral" BUDGET_S=540 PACK=1 T_COMPILE=200 \
  bash experiments/bench/compare.sh /tmp/n/gpu-inst $OUT/cmp1 2>&1 | tail -40
