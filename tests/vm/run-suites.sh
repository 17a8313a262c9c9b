#!/bin/sh
# tests/vm/run-suites.sh [MODE=]EXE... -- [TEST-ARGS...]: runs each libtest executable one
# test at a time with TEST-ARGS (a filter, for instance), all of them even when one fails,
# and exits with the first failure's status. An entry MODE=EXE runs EXE with
# BLOCKD_TEST_ATTACH=MODE (the attacher the CSI node tests use: nbd, ublk, fuse-loop).
# tests/vm/kernel-suite.sh runs it in the guest.
entries=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  entries="$entries $1"
  shift
done
[ $# -gt 0 ] && shift
status=0
for entry in $entries; do
  case "$entry" in
    *=*)
      mode=${entry%%=*}
      exe=${entry#*=}
      echo "=== $(basename "$exe") with BLOCKD_TEST_ATTACH=$mode"
      BLOCKD_TEST_ATTACH=$mode "$exe" --test-threads 1 --color never "$@"
      ;;
    *)
      echo "=== $(basename "$entry")"
      "$entry" --test-threads 1 --color never "$@"
      ;;
  esac
  rc=$?
  [ "$status" -eq 0 ] && status=$rc
done
exit "$status"
