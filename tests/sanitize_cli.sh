#!/usr/bin/env bash
# The CLI contract (cli_contract.sh: bad input, then a tiny train, resume, bench, generate) on a
# sanitizer build of moelab (make test-sanitize). The contract expects some commands to fail, so
# a sanitizer's non-zero exit alone could go unnoticed there: moelab runs behind a shim that keeps
# its stderr, and any ASan/LSan/UBSan report in it fails the test. (log_path would be simpler,
# but GCC's UBSan ignores it when linked with ASan.) Usage: sanitize_cli.sh MOELAB
set -u
moelab=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/moelab" <<SHIM
#!/usr/bin/env bash
err=\$(mktemp -p "$tmp" stderr.XXXXXX)
"$moelab" "\$@" 2>"\$err"; rc=\$?
cat "\$err" >&2
exit \$rc
SHIM
chmod +x "$tmp/moelab"
bash "$(dirname "$0")/cli_contract.sh" "$tmp/moelab"; rc=$?
pattern='runtime error:|==ERROR: [A-Za-z]+Sanitizer|SUMMARY: [A-Za-z]+Sanitizer'
if cat "$tmp"/stderr.* 2>/dev/null | grep -qE "$pattern"; then
  grep -lE "$pattern" "$tmp"/stderr.* | xargs cat >&2
  echo "FAIL: sanitizer report(s) in moelab's output" >&2
  exit 1
fi
exit $rc
