set -u; export NCCL_NVLS_ENABLE=0
lim() { local s=$1; shift; timeout -k 10 "$s" setsid -w "$@"; }
mkdir -p /tmp/n && tar xzf build-carry/gpu-inst.tgz -C /tmp/n
lim 150 /tmp/n/gpu-inst/moelab_gpu_tests > $OUT/gpu_tests.txt 2>&1; echo "gpu tests rc=$?: $(tail -2 $OUT/gpu_tests.txt | tr '\n' ' ')"
grep -B2 -A12 "FAILED" $OUT/gpu_tests.txt | head -40
CONFIGS="A B C D E F" PARTS="gemm moelab compile moe" MOE_SHAPES="fine mixtral" BUDGET_S=440 PACK=1 T_COMPILE=120 \
  bash experiments/bench/compare.sh /tmp/n/gpu-inst $OUT/final 2>&1 | sed -n '/^Dense/,$p'
