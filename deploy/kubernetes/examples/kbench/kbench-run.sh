#!/bin/sh
# kbench-run.sh: runs kbench.fio on every directory under $KBENCH_VOLUMES (one volume each,
# named after the directory), one volume after the other, then prints the table
# (kbench-table.py): each volume's figures and their ratio to the $KBENCH_BASELINE volume.
#
# Environment (defaults in brackets):
#   KBENCH_VOLUMES   directory whose subdirectories are the volumes [/volumes]
#   KBENCH_RESULTS   where each volume's fio JSON goes [/tmp/kbench-results]
#   KBENCH_BASELINE  the volume the others are compared to [hostpath]
#   KBENCH_SIZE      test file size [4G]; KBENCH_RUNTIME seconds per job [30];
#   KBENCH_RAMP      seconds of ramp per job [5]
# Needs fio and python3; where they are missing and apt-get exists (the Job's Debian
# image), installs them first.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
volumes=${KBENCH_VOLUMES:-/volumes}
results=${KBENCH_RESULTS:-/tmp/kbench-results}
baseline=${KBENCH_BASELINE:-hostpath}
KBENCH_SIZE=${KBENCH_SIZE:-4G}
KBENCH_RUNTIME=${KBENCH_RUNTIME:-30}
KBENCH_RAMP=${KBENCH_RAMP:-5}
export KBENCH_SIZE KBENCH_RUNTIME KBENCH_RAMP

if ! command -v fio >/dev/null 2>&1 || ! command -v python3 >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "kbench: installing fio and python3" >&2
    if ! { apt-get update -qq >/dev/null &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fio python3 >/dev/null; }; then
      echo "kbench: error: apt-get install fio python3 failed (no network? use an image with both)" >&2
      exit 1
    fi
  else
    echo "kbench: error: this image has no fio or no python3, and no apt-get to install them" >&2
    exit 1
  fi
fi
[ -d "$volumes" ] || { echo "kbench: error: $volumes is not a directory" >&2; exit 1; }
[ -d "$volumes/$baseline" ] || {
  echo "kbench: error: no baseline volume $volumes/$baseline (KBENCH_BASELINE)" >&2
  exit 1
}

mkdir -p "$results"
set -- # the JSON outputs of this run, in order
for dir in "$volumes"/*/; do
  [ -d "$dir" ] || continue
  name=$(basename "$dir")
  echo "kbench: $name: fio $here/kbench.fio (size $KBENCH_SIZE, ${KBENCH_RAMP}+${KBENCH_RUNTIME} s per job)" >&2
  if ! KBENCH_FILE="${dir}kbench.data" fio --output-format=json --output="$results/$name.json" \
    "$here/kbench.fio"; then
    echo "kbench: error: fio failed on $name ($dir)" >&2
    exit 1
  fi
  rm -f "${dir}kbench.data"
  set -- "$@" "$results/$name.json"
done
[ $# -gt 0 ] || { echo "kbench: error: no volume under $volumes" >&2; exit 1; }
exec python3 "$here/kbench-table.py" --baseline "$baseline" "$@"
