# Sourced by the GPU study scripts (seeded_gpu_studies.sh, routing_speed_study.sh): unpacks what
# they carry to the GPU machine into a scratch folder removed on exit.
#   in:  $inst  a relocatable install folder, or its .tgz
#        CORPUS (env, default data/gpu_corpus.tgz): the Brown + nlp-corpus tarball, or its folder
#   out: $work (scratch), $M (the moelab binary), $data (the corpus folder)
export NCCL_NVLS_ENABLE=0
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
if [ -f "$inst" ]; then
  mkdir -p "$work/inst" && tar xzf "$inst" -C "$work/inst" || { echo "cannot unpack $inst" >&2; exit 2; }
  inst=$(dirname "$(find "$work/inst" -name moelab -type f -perm -u+x | head -1)")
fi
M="$inst/moelab"
[ -x "$M" ] || { echo "no moelab binary in $inst" >&2; exit 2; }
corpus=${CORPUS:-data/gpu_corpus.tgz}
if [ -f "$corpus" ]; then
  tar xzf "$corpus" -C "$work" || { echo "cannot unpack $corpus" >&2; exit 2; }
  data="$work/brown_nlp"
else
  data=$corpus
fi
[ -f "$data/cs99" ] || { echo "no Brown + nlp-corpus folder at $data (make data-gpu; carry data/gpu_corpus.tgz)" >&2; exit 2; }
