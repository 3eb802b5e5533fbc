#!/usr/bin/env bash
# moelab on a GPU machine under compute-sanitizer (issue "Nothing lost, ever"): the cross-backend
# op test and a short training run (f32 and bf16, with checkpoints and a resume), each under
# memcheck and racecheck. Usage: sanitize.sh INSTALL_DIR OUT_DIR, where INSTALL_DIR is a
# relocatable install (cmake --install) with moelab_gpu_tests copied beside moelab. Prints one
# line per run (tool, what, errors reported) and exits non-zero if any run reported anything.
set -u
inst=$(readlink -f "$1"); out=$(readlink -f "$2"); mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cat > "$work/tiny.ini" <<INI
[model]
layers = 2
d_model = 64
heads = 4
experts = 8
top_k = 2
d_expert = 64
moe_every = 1
[router]
aux_alpha = 0.01
z_loss = 0.001
noise = jitter
capacity_factor = 1.25
[train]
steps = 4
batch = 4
seq = 32
backend = cuda
[log]
eval_every = 2
eval_batches = 1
checkpoint_every = 2
flush_every = 1
INI
status=0
summary=()
san() {  # san TOOL NAME CMD...: runs CMD under compute-sanitizer TOOL, logs to $out/NAME.log
  local tool=$1 name=$2; shift 2
  local t0=$SECONDS
  compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local line; line=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$out/$name.log" | tail -1)
  summary+=("$(printf '%-10s %-34s rc=%-3s %4ss  %s' "$tool" "$name" "$rc" $((SECONDS - t0)) "${line:-no summary line}")")
  [ $rc -eq 0 ] || status=1
}
cd "$work"
for tool in memcheck racecheck; do
  san $tool "optest_$tool" "$inst/moelab_gpu_tests"
  for dt in f32 bf16; do
    san $tool "train_${dt}_$tool" "$inst/moelab" train --config tiny.ini --set model.dtype=$dt --out "run_${dt}_$tool.h5"
    san $tool "resume_${dt}_$tool" "$inst/moelab" train --config tiny.ini --set model.dtype=$dt --set train.steps=5 \
        --out "run_${dt}_$tool.h5" --resume "run_${dt}_${tool}_checkpoints/step_000002.ckpt"
  done
done
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit $status
