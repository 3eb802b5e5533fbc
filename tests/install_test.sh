#!/usr/bin/env bash
# moelab relocatable install: `cmake --install` into a folder, move the folder, and run the
# binary there with an empty environment; every library it loads (except the C library and the
# CUDA driver) must come from the folder's lib/. Usage: install_test.sh BUILD_DIR
set -eu
build=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
MOELAB_INSTALL_NO_CUDA_LIBS=1 cmake --install "$build" --prefix "$tmp/a" > "$tmp/install.log"
mv "$tmp/a" "$tmp/moved"   # relocated: nothing may point at the old prefix
out=$(env -i "$tmp/moved/moelab" config --set train.seed=7 --get train.seed)
[ "$out" = "7" ] || { echo "FAIL: relocated moelab printed '$out'"; exit 1; }
deps=$(env -i ldd "$tmp/moved/moelab")
if grep -q "not found" <<<"$deps"; then echo "FAIL: unresolved:"; grep "not found" <<<"$deps"; exit 1; fi
for lib in libboost_program_options libhdf5 libgomp libstdc++; do
  line=$(grep "$lib" <<<"$deps" | head -1)
  [ -z "$line" ] && continue
  grep -q "$tmp/moved/lib/" <<<"$line" || { echo "FAIL: $lib does not come from the install folder: $line"; exit 1; }
done
echo "relocatable install: $(ls "$tmp/moved/lib" | wc -l) libraries bundled"
echo "1 passed, 0 failed"
