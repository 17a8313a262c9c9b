#!/bin/sh
# tests/vm/run-suites.sh EXE... -- [TEST-ARGS...]: runs each libtest executable one test at
# a time with TEST-ARGS (a filter, for instance), all of them even when one fails, and
# exits with the first failure's status. tests/vm/kernel-suite.sh runs it in the guest.
exes=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  exes="$exes $1"
  shift
done
[ $# -gt 0 ] && shift
status=0
for exe in $exes; do
  "$exe" --test-threads 1 --color never "$@"
  rc=$?
  [ "$status" -eq 0 ] && status=$rc
done
exit "$status"
