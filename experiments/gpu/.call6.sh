set -u; export NCCL_NVLS_ENABLE=0
lim() { local s=$1; shift; timeout -k 10 "$s" setsid -w "$@"; }
mkdir -p /tmp/n && tar xzf build-carry/gpu-inst.tgz -C /tmp/n
CONFIGS="D E F" PARTS="moelab compile" BUDGET_S=420 PACK=1 T_COMPILE=200 \
  bash experiments/bench/compare.sh /tmp/n/gpu-inst $OUT/cmp2 2>&1 | tail -30
lim 150 /tmp/n/gpu-inst/moelab_gpu_tests > $OUT/gpu_tests.txt 2>&1; echo "gpu tests rc=$?: $(tail -2 $OUT/gpu_tests.txt | tr '\n' ' ')"
