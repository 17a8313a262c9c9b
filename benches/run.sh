#!/usr/bin/env bash
# benches/run.sh [--quick] [--out DIR] [--engine-figures | --no-engine-figures]
#                 [--profile release|dev] [--bin-dir DIR]
#
# Side-by-side fio benchmark of blockd against the physical limit and its userspace peers,
# all measured in one run, on files in one scratch directory on one filesystem:
#
#   raw             fio io_uring + O_DIRECT on a preallocated file (the physical limit)
#   blockd          blockd's NBD export (release build, sparse pool file), fio nbd engine
#   qemu-nbd        qemu-nbd on a raw preallocated file (--cache=none --aio=io_uring)
#   qemu-nbd-qcow2  the same on a qcow2 image (the userspace thin + snapshot peer)
#   nbdkit          nbdkit's file plugin (cache=none)
#
# and, where the kernel has the driver (else each is listed in the report as "skipped:"
# with the reason), the kernel block devices, with fio io_uring + O_DIRECT on the device:
#
#   loop               a loop device (--direct-io=on) on raw's file (root, /dev/loop-control)
#   blockd-kernel-nbd  a blockd volume on /dev/nbdN: nbd-client through csi-nbd-proxy, as
#                      csi-shim attaches it in production (root, /dev/nbd*, nbd-client)
#   blockd-ublk        a blockd volume on /dev/ublkbN (`blockctl attach VOL --ublk`)
#
# and, for the two blockd devices, the restart stall: the longest I/O pause fio sees, and
# its I/O errors, while blockd is killed (SIGKILL) and restarted under a random read/write
# load.
#
# Every system gets the same fio binary and the same options; only the target differs
# (--filename for raw and the devices, --uri for the NBD servers). Writes DIR/results.json,
# DIR/restart-stall.json, DIR/report.md, DIR/chart.png, and DIR/fio/ (every fio JSON
# output and the exact command lines).
#
# --quick: 512 MiB data files, 4 s per time-based run (BLOCKD_BENCH_SECONDS overrides the
# seconds, BLOCKD_BENCH_DATA_MIB the data size; the smoke test uses both). Full: 2 GiB,
# 18 s per run after 2 s of ramp, and the 4 KiB random reads in 5 rounds (each system's
# median run counts; BLOCKD_BENCH_ROUNDS overrides, --quick runs 1). Every workload runs on every system back to back, so
# load drifts little within a comparison.
# Both modes end with the engine figures (metadata bytes per TiB, RSS with 1 TiB of thin
# volumes, startup time with 1 M mapped chunks, snapshot creation time against volume
# size; a few seconds); --no-engine-figures skips them.
#
# --profile dev runs debug binaries (no release build, so no second RocksDB compile): for
# checking that the harness works (the test suite's smoke test), never for figures; the
# report says so. --bin-dir DIR runs the binaries already built in DIR (blockd, blockctl,
# bench-report, engine-figures, csi-nbd-proxy) and builds nothing: the test guest, which
# runs what the host built, uses it. On an emulated CPU (QEMU TCG, as in the test guest)
# the report says its figures mean nothing.
#
# Environment: CARGO_TARGET_DIR (default $HOME/.cache/blockd-target),
# BLOCKD_BENCH_SECONDS, BLOCKD_BENCH_DATA_MIB, BLOCKD_BENCH_ROUNDS,
# BLOCKD_BENCH_SCRATCH (parent of the scratch directory; default DIR).
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$script_dir/.." && pwd)"

log() { printf 'run.sh: %4ss %s\n' "$SECONDS" "$*" >&2; }
die() {
  echo "run.sh: error: $*" >&2
  exit 1
}

# --- arguments -------------------------------------------------------------------------
quick=0
out="$repo/bench-out"
engine_figures=1
profile=release
bin_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --out)
      [ $# -ge 2 ] || die "--out needs a directory"
      out="$2"
      shift
      ;;
    --out=*) out="${1#--out=}" ;;
    --engine-figures) engine_figures=1 ;;
    --no-engine-figures) engine_figures=0 ;;
    --profile)
      [ $# -ge 2 ] || die "--profile needs release or dev"
      profile="$2"
      shift
      ;;
    --profile=*) profile="${1#--profile=}" ;;
    --bin-dir)
      [ $# -ge 2 ] || die "--bin-dir needs a directory"
      bin_dir="$2"
      shift
      ;;
    --bin-dir=*) bin_dir="${1#--bin-dir=}" ;;
    -h | --help)
      sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument '$1' (usage: benches/run.sh [--quick] [--out DIR] [--engine-figures|--no-engine-figures] [--profile release|dev] [--bin-dir DIR])" ;;
  esac
  shift
done
# The selection matches what else builds that profile, so that RocksDB's C++ is shared:
# tools/run.sh builds release with `--workspace --bins`; the test suite builds debug with
# `--workspace --bins --tests` (dev-dependencies change some features, hence the hash).
case "$profile" in
  release) profile_flag=(--release --workspace --bins) profile_dir=release ;;
  dev) profile_flag=(--workspace --bins --tests) profile_dir=debug ;;
  *) die "--profile is release or dev, not '$profile'" ;;
esac

if [ "$quick" = 1 ]; then
  data_size=$((512 << 20)) # each data file/volume every read and overwrite runs on
  seconds=4
  ramp=0
  ft_ios=8192
  cow_ios=2048
else
  data_size=$((2 << 30))
  seconds=18
  ramp=2
  ft_ios=32768
  cow_ios=8192
fi
seconds="${BLOCKD_BENCH_SECONDS:-$seconds}"
# The 4 KiB random reads (the targets' workloads) run this many times, every system once
# per round, and each system's median run is its result: a shared machine's load swings
# between runs more than the differences the targets ask about (on the 2-vCPU VM the
# figures were taken on, one system swung 3x between rounds), and a median of five rides
# out two bad rounds.
if [ "$quick" = 1 ]; then rounds=1; else rounds=5; fi
rounds="${BLOCKD_BENCH_ROUNDS:-$rounds}"
case "$rounds" in
  '' | *[!0-9]* | 0) die "BLOCKD_BENCH_ROUNDS must be a positive integer, got '$rounds'" ;;
esac
case "$seconds" in
  '' | *[!0-9]* | 0) die "BLOCKD_BENCH_SECONDS must be a positive integer, got '$seconds'" ;;
esac
if [ -n "${BLOCKD_BENCH_DATA_MIB:-}" ]; then
  case "$BLOCKD_BENCH_DATA_MIB" in
    '' | *[!0-9]* | 0) die "BLOCKD_BENCH_DATA_MIB must be a positive number of MiB, got '$BLOCKD_BENCH_DATA_MIB'" ;;
  esac
  [ "$BLOCKD_BENCH_DATA_MIB" -ge 16 ] || die "BLOCKD_BENCH_DATA_MIB must be at least 16 (MiB), got $BLOCKD_BENCH_DATA_MIB"
  data_size=$((BLOCKD_BENCH_DATA_MIB << 20))
fi
# The restart stall: fio runs stall_runtime seconds on a blockd device; blockd is killed
# stall_kill_at seconds in and restarted at once (I/O still in flight when runtime ends
# completes after the restart, so a slow restart still shows in full).
stall_kill_at=$((seconds < 4 ? 2 : seconds / 2))
stall_runtime=$((stall_kill_at * 2 + 2))
# First-touch runs write into a fresh 64 GiB target (1 M chunks: few writes hit a chunk
# twice); they and the post-snapshot runs are
# bounded by an I/O count (every write should hit a chunk/cluster not written before), with
# a time cap so a slow system cannot stall the run.
ft_size=$((64 << 30))
cap=$((seconds < 5 ? 5 : seconds))
chunk=65536 # blockd's chunk and qcow2's cluster size

mkdir -p "$out" || die "cannot create the output directory $out"
out="$(cd "$out" && pwd)"
scratch_parent="${BLOCKD_BENCH_SCRATCH:-$out}"
mkdir -p "$scratch_parent" || die "cannot create $scratch_parent"
started=$(date +%s)

# Space at the peak: three data files (raw, qcow2, blockd's pool) with a 64 KiB copy per
# post-snapshot write in two of them; later blockd's pool and qcow2's first-touch image
# (64 KiB per write); plus a margin.
need_bytes=$((5 * data_size + 2 * cow_ios * chunk)) # + the kernel devices' two volumes
ft_need=$((data_size + cow_ios * chunk + ft_ios * chunk))
[ "$need_bytes" -ge "$ft_need" ] || need_bytes=$ft_need
need_bytes=$((need_bytes + (256 << 20)))
avail_bytes=$(($(df --output=avail -k "$scratch_parent" | tail -1) * 1024))
if [ "$avail_bytes" -lt "$need_bytes" ]; then
  die "$scratch_parent has $((avail_bytes >> 20)) MiB free; this run needs about $((need_bytes >> 20)) MiB (set BLOCKD_BENCH_SCRATCH to another directory, or use --quick)"
fi

# --- cleanup: every device we attach, every server we start, the scratch directory ------
pids=()
scratch=""
loop_dev=""  # the loop device on raw's file
knbd_dev=""  # /dev/nbdN (nbd-client through csi-nbd-proxy)
ublk_vol=""  # the volume attached with `blockctl attach --ublk`
# detach_devices: the kernel devices go first, while the servers behind them still run
# (a device whose server is gone holds its I/O until a timeout).
detach_devices() {
  if [ -n "$ublk_vol" ]; then
    timeout 60 "$blockctl_bin" --api "$api" detach "$ublk_vol" >/dev/null 2>&1 ||
      log "  warning: blockctl detach $ublk_vol failed"
    ublk_vol=""
  fi
  if [ -n "$knbd_dev" ]; then
    timeout 60 nbd-client -d "$knbd_dev" >/dev/null 2>&1 || log "  warning: nbd-client -d $knbd_dev failed"
    knbd_dev=""
  fi
  if [ -n "$loop_dev" ]; then
    losetup -d "$loop_dev" 2>/dev/null || log "  warning: losetup -d $loop_dev failed"
    loop_dev=""
  fi
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  detach_devices
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "$scratch" ] && [ -d "$scratch" ]; then
    rm -rf "$scratch"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- tools -----------------------------------------------------------------------------
have() { command -v "$1" >/dev/null 2>&1; }
need=()
have fio || need+=(fio)
have qemu-nbd || need+=(qemu-utils)
have qemu-img || need+=(qemu-utils)
have nbdkit || need+=(nbdkit)
have gnuplot || need+=(gnuplot-nox)
if [ ${#need[@]} -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  if [ "$(id -u)" -eq 0 ] && have apt-get; then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
      die "apt-get install ${need[*]} failed"
  else
    die "missing ${need[*]} and cannot apt-get install them (not root, or no apt-get)"
  fi
fi
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (Debian's fio does)"
if [ "$(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo 0)" != 0 ]; then
  die "io_uring is disabled (/proc/sys/kernel/io_uring_disabled); raw and qemu-nbd need it"
fi

# --- build -----------------------------------------------------------------------------
if [ -n "$bin_dir" ]; then
  [ -d "$bin_dir" ] || die "--bin-dir $bin_dir is not a directory"
  bin="$(cd "$bin_dir" && pwd)"
  for b in blockd blockctl bench-report engine-figures; do
    [ -x "$bin/$b" ] || die "--bin-dir $bin has no executable $b (build with: cargo build --workspace --bins)"
  done
  log "using the binaries in $bin (no build)"
else
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/blockd-target}"
  have cargo || die "cargo not found"
  log "building blockd, blockctl and the bench tools ($profile, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
  (
    cd "$repo" || exit 1
    # The whole workspace's binaries, not `-p ...`: a narrower selection resolves the
    # features of bindgen's dependencies differently and would compile RocksDB's C++ a
    # second time instead of sharing the release build `tools/run.sh` (README) makes.
    cargo build "${profile_flag[@]}" --quiet
  ) || die "cargo build ($profile) failed"
  bin="$CARGO_TARGET_DIR/$profile_dir"
fi
blockd_bin="$bin/blockd"
blockctl_bin="$bin/blockctl"
report_bin="$bin/bench-report"

# --- scratch, logs ---------------------------------------------------------------------
scratch="$(mktemp -d "$scratch_parent/scratch.XXXXXX")" || die "cannot create a scratch directory"
mkdir -p "$scratch/logs"
rm -rf "$out/fio"
mkdir -p "$out/fio"
rm -f "$out/results.json" "$out/report.md" "$out/chart.png" "$out/engine-figures.json" \
  "$out/restart-stall.json"
runs="$out/fio/runs.tsv"
skipped="$out/fio/skipped.tsv" # system<TAB>why it was not measured
stalls="$out/fio/stalls.tsv"   # system<TAB>fio JSON<TAB>kill-to-ready ms<TAB>fio status<TAB>command
: >"$runs"
: >"$skipped"
: >"$stalls"

# --- machine info ----------------------------------------------------------------------
# An emulated CPU (QEMU's TCG, as in the test guest of tests/vm/run.sh where no hardware
# KVM exists) makes every figure an emulation artefact: the report says so.
emulated=""
cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
case "$cpu_model" in
  *TCG*) emulated="yes ($cpu_model)" ;;
esac
{
  printf 'nproc\t%s\n' "$(nproc)"
  printf 'kernel\t%s\n' "$(uname -r)"
  printf 'cpu\t%s\n' "$cpu_model"
  [ -z "$emulated" ] || printf 'emulated\t%s\n' "$emulated"
  printf 'memory\t%s\n' "$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
  printf 'filesystem\t%s\n' "$(df -T "$scratch" | awk 'NR == 2 {print $2 " on " $1 " (" $7 ")"}')"
  printf 'scratch\t%s\n' "$scratch"
  printf 'fio\t%s\n' "$(fio --version)"
  printf 'qemu-nbd\t%s\n' "$(qemu-nbd --version | head -1)"
  printf 'nbdkit\t%s\n' "$(nbdkit --version | head -1)"
  if have nbd-client; then
    printf 'nbd-client\t%s\n' "$(nbd-client -V 2>&1 | head -1)"
  fi
  printf 'blockd\t%s\n' "$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)"
  printf 'mode\t%s\n' "$([ "$quick" = 1 ] && echo quick || echo full)"
  if [ -n "$bin_dir" ]; then
    printf 'build\t%s\n' "prebuilt binaries from $bin"
  else
    printf 'build\t%s\n' "$([ "$profile" = release ] && echo release || echo 'dev (debug binaries: a harness check, not figures)')"
  fi
  printf 'seconds\t%s\n' "$seconds"
  printf 'ramp_seconds\t%s\n' "$ramp"
  printf 'data_size\t%s\n' "$data_size"
  printf 'first_touch_size\t%s\n' "$ft_size"
  printf 'first_touch_ios\t%s\n' "$ft_ios"
  printf 'after_snapshot_ios\t%s\n' "$cow_ios"
  printf 'date\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$out/machine.tsv"

# --- fio -------------------------------------------------------------------------------
# Options every run shares, then the workload's, then the target's.
common=(--output-format=json --group_reporting --numjobs=1 --randrepeat=0 --norandommap)
timed=(--time_based "--runtime=$seconds" "--ramp_time=$ramp")
workload_args() {
  case "$1" in
    randread-4k-qd1) echo "--rw=randread --bs=4k --iodepth=1 ${timed[*]} --size=$data_size" ;;
    randread-4k-qd32) echo "--rw=randread --bs=4k --iodepth=32 ${timed[*]} --size=$data_size" ;;
    randwrite-4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32 ${timed[*]} --size=$data_size" ;;
    seqread-1m-qd8) echo "--rw=read --bs=1M --iodepth=8 ${timed[*]} --size=$data_size" ;;
    seqwrite-1m-qd8) echo "--rw=write --bs=1M --iodepth=8 ${timed[*]} --size=$data_size" ;;
    # 4 KiB writes at random 64 KiB-aligned offsets: nearly every write is the first into
    # its chunk (blockd) or cluster (qcow2), so these measure allocation / copy-on-write,
    # not overwrites. Bounded by an I/O count (with a time cap) to bound the space used.
    randwrite-4k-qd32-first-touch)
      echo "--rw=randwrite --bs=4k --blockalign=64k --iodepth=32 --number_ios=$ft_ios --runtime=$cap --size=$ft_size"
      ;;
    randwrite-4k-qd32-after-snapshot)
      echo "--rw=randwrite --bs=4k --blockalign=64k --iodepth=32 --number_ios=$cow_ios --runtime=$cap --size=$data_size"
      ;;
    prefill) echo "--rw=write --bs=1M --iodepth=8 --size=$data_size" ;;
    *) die "unknown workload $1" ;;
  esac
}
# The data workloads in the order they run: reads first, then overwrites; each one runs
# on every system in turn.
data_workloads=(randread-4k-qd1 randread-4k-qd32 seqread-1m-qd8 randwrite-4k-qd32 seqwrite-1m-qd8)
# The userspace systems; the kernel devices that could be set up join them (set-up below).
systems=(raw blockd qemu-nbd qemu-nbd-qcow2 nbdkit)
total_runs=32 # 5 systems x (5 data workloads + first-touch) + 2 after-snapshot, + below
run_no=0

# run_fio SYSTEM WORKLOAD TARGET_ARGS...: one fio run; its JSON (from the first '{', as
# fio's nbd engine prints a line before it) goes to DIR/fio/SYSTEM__WORKLOAD.json.
run_fio() {
  local system="$1" workload="$2"
  shift 2
  local -a wl
  read -r -a wl <<<"$(workload_args "$workload")"
  local -a cmd=(fio "--name=$workload" "${common[@]}" "${wl[@]}" "$@")
  local base="$out/fio/${system}__${workload}${round_suffix:-}"
  if [ "$workload" != prefill ]; then
    run_no=$((run_no + 1))
    log "[$run_no/$total_runs] $system $workload"
  else
    log "  $system: prefill $((data_size >> 20)) MiB"
  fi
  # Write back what earlier runs left dirty in our files (page cache, the VM disk's
  # host-side cache) before measuring, so that one system's write-back does not land in the
  # next one's run. Only our files: a global sync would wait for everyone's on a shared box.
  local t0=$SECONDS f
  local -a ours=()
  for f in "$scratch"/*.raw "$scratch"/*.qcow2 "$scratch"/blockd-pool.img; do
    [ -f "$f" ] && ours+=("$f")
  done
  [ ${#ours[@]} -eq 0 ] || sync -- "${ours[@]}" || true
  [ $((SECONDS - t0)) -lt 3 ] || log "  (waited $((SECONDS - t0)) s for write-back first)"
  if ! "${cmd[@]}" >"$base.out" 2>"$base.err"; then
    cat "$base.err" >&2
    die "fio failed for $system $workload: ${cmd[*]}"
  fi
  sed -n '/^{/,$p' "$base.out" >"$base.json"
  rm -f "$base.out"
  [ -s "$base.json" ] || die "fio printed no JSON for $system $workload (see $base.err)"
  [ -s "$base.err" ] || rm -f "$base.err"
  printf '%s\t%s\t%s\t%s\n' "$system" "$workload" "${base##*/}.json" "${cmd[*]}" >>"$runs"
  if [ "$workload" != prefill ]; then
    "$report_bin" summary "$base.json" | sed 's/^/run.sh:     /' >&2 || true
  fi
}

# --- servers ---------------------------------------------------------------------------
declare -A server_pids=()
# start_server NAME SOCKET CMD...: starts a server in the background, logging to
# scratch/logs/NAME.log, and waits for its unix socket.
start_server() {
  local name="$1" sock="$2"
  shift 2
  rm -f "$sock" # a stale socket blocks some servers from starting
  "$@" >>"$scratch/logs/$name.log" 2>&1 &
  local pid=$!
  server_pids[$name]=$pid
  pids+=("$pid")
  local i
  for i in $(seq 300); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 20 "$scratch/logs/$name.log" >&2 || true
      die "$name exited during start-up: $*"
    fi
    [ -S "$sock" ] && return 0
    [ "$i" -lt 300 ] && sleep 0.1
  done
  tail -n 20 "$scratch/logs/$name.log" >&2 || true
  die "$name did not create its socket $sock within 30 s"
}

# stop_servers NAME...: SIGTERM them all, then wait for each (SIGKILL after 120 s). A
# server stopping after heavy writes may take a while: it flushes, and the VM's disk
# flushes its host-side cache; stopping several at once overlaps those waits.
stop_servers() {
  local name pid i p t0=$SECONDS
  local -a stopping=()
  for name in "$@"; do
    pid="${server_pids[$name]:-}"
    [ -n "$pid" ] || continue
    kill -TERM "$pid" 2>/dev/null || true
    stopping+=("$pid")
    unset "server_pids[$name]"
  done
  for pid in "${stopping[@]+"${stopping[@]}"}"; do
    for i in $(seq 1200); do
      kill -0 "$pid" 2>/dev/null || break
      [ "$i" -lt 1200 ] && sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local kept=()
    for p in "${pids[@]}"; do
      [ "$p" = "$pid" ] || kept+=("$p")
    done
    pids=("${kept[@]+"${kept[@]}"}")
  done
  [ $((SECONDS - t0)) -lt 5 ] || log "  stopping $* took $((SECONDS - t0)) s (flushing)"
}

nbd_uri() { echo "nbd+unix:///?socket=$scratch/$1.sock"; }
qemu_nbd() { # qemu_nbd NAME FORMAT FILE
  local sock="$scratch/$1.sock"
  start_server "$1" "$sock" qemu-nbd -t -k "$sock" -f "$2" --cache=none --aio=io_uring "$3"
}
nbdkit_file() { # nbdkit_file FILE
  local sock="$scratch/nbdkit.sock"
  start_server nbdkit "$sock" nbdkit -f -U "$sock" file "file=$1" cache=none
}
fresh_sparse() { # fresh_sparse FILE SIZE
  rm -f "$1"
  truncate -s "$2" "$1"
}
ctl() { "$blockctl_bin" --api "$api" "$@"; }

# target_of SYSTEM: sets tgt to SYSTEM's fio target options (raw: the data file; the
# kernel devices: the device; the others: their NBD URI).
declare -A dev_of=()
target_of() {
  case "$1" in
    raw) tgt=(--ioengine=io_uring --direct=1 "--filename=$raw") ;;
    loop | blockd-kernel-nbd | blockd-ublk) tgt=(--ioengine=io_uring --direct=1 "--filename=${dev_of[$1]}") ;;
    blockd) tgt=(--ioengine=nbd "--uri=$blockd_uri") ;;
    *) tgt=(--ioengine=nbd "--uri=$(nbd_uri "$1")") ;;
  esac
}
tgt=()
blockd_uri=""

# skip_system SYSTEM REASON: SYSTEM is not measured in this run; the report says why.
skip_system() {
  log "  $1: skipped: $2"
  printf '%s\t%s\n' "$1" "$2" >>"$skipped"
}

# Kernel NBD connections, as csi-shim's default: one per CPU, 1 to 4.
knbd_connections=$(nproc)
[ "$knbd_connections" -le 4 ] || knbd_connections=4

# setup_loop: a loop device with direct I/O on raw's (prefilled) file.
setup_loop() {
  [ "$(id -u)" -eq 0 ] || { skip_system loop "needs root (losetup)"; return 0; }
  have losetup || { skip_system loop "losetup is not installed (util-linux's mount package)"; return 0; }
  [ -e /dev/loop-control ] || { skip_system loop "no /dev/loop-control (the loop driver is not loaded)"; return 0; }
  local dev
  if ! dev=$(losetup -f --show --direct-io=on "$raw" 2>"$scratch/logs/losetup.log"); then
    skip_system loop "losetup -f --show --direct-io=on failed: $(head -1 "$scratch/logs/losetup.log")"
    return 0
  fi
  loop_dev="$dev"
  local dio
  dio=$(cat "/sys/block/${dev#/dev/}/loop/dio" 2>/dev/null || echo "?")
  printf 'loop\t%s on %s, direct I/O %s\n' "$dev" "$raw" "$([ "$dio" = 1 ] && echo on || echo "OFF ($dio)")" >>"$out/machine.tsv"
  dev_of[loop]="$dev"
  systems+=(loop)
}

# free_nbd_device: the first /dev/nbdN with no connection (size 0, no pid).
free_nbd_device() {
  local d n
  for d in /sys/block/nbd*; do
    [ -e "$d" ] || continue
    n="${d##*/}"
    if [ "$(cat "$d/size" 2>/dev/null)" = 0 ] && [ ! -e "$d/pid" ]; then
      echo "/dev/$n"
      return 0
    fi
  done
  return 1
}

# setup_knbd: volume data-knbd on /dev/nbdN the way csi-shim attaches it in production:
# csi-nbd-proxy between the kernel and blockd (so a blockd restart costs a pause, not the
# connection), nbd-client handing the kernel the connections over netlink.
setup_knbd() {
  local name=blockd-kernel-nbd
  compgen -G '/dev/nbd[0-9]*' >/dev/null || { skip_system $name "no /dev/nbd* (the kernel nbd module is not loaded: modprobe nbd)"; return 0; }
  [ "$(id -u)" -eq 0 ] || { skip_system $name "needs root (nbd-client)"; return 0; }
  have nbd-client || { skip_system $name "nbd-client is not installed (apt-get install nbd-client)"; return 0; }
  [ -x "$bin/csi-nbd-proxy" ] || { skip_system $name "$bin/csi-nbd-proxy is missing (cargo build --workspace --bins)"; return 0; }
  local dev uri
  dev=$(free_nbd_device) || { skip_system $name "every /dev/nbd* is in use"; return 0; }
  ctl volume create data-knbd --size "$data_size" >/dev/null || die "blockctl volume create data-knbd failed"
  uri="$(ctl export data-knbd)" || die "blockctl export data-knbd failed"
  local proxy_sock="$scratch/knbd-proxy.sock"
  start_server knbd-proxy "$proxy_sock" "$bin/csi-nbd-proxy" --listen "$proxy_sock" \
    --upstream-socket "${uri##*socket=}" --export data-knbd
  # The I/O timeout is above the proxy's reconnect window (120 s), as csi-shim sets it.
  if ! nbd-client -u "$proxy_sock" "$dev" -N data-knbd -C "$knbd_connections" -b 4096 -t 180 \
    >>"$scratch/logs/nbd-client.log" 2>&1; then
    skip_system $name "nbd-client -u $proxy_sock $dev failed: $(tail -1 "$scratch/logs/nbd-client.log")"
    return 0
  fi
  knbd_dev="$dev"
  local i
  for i in $(seq 100); do
    [ "$(cat "/sys/block/${dev#/dev/}/size" 2>/dev/null || echo 0)" != 0 ] && break
    sleep 0.1
  done
  [ "$(cat "/sys/block/${dev#/dev/}/size" 2>/dev/null || echo 0)" != 0 ] || die "$dev has no size after nbd-client connected"
  printf 'kernel-nbd\t%s, %s connection(s) through csi-nbd-proxy\n' "$dev" "$knbd_connections" >>"$out/machine.tsv"
  dev_of[$name]="$dev"
  systems+=($name)
  target_of $name
  run_fio $name prefill "${tgt[@]}"
}

# setup_ublk: volume data-ublk on /dev/ublkbN through `blockctl attach --ublk`, which
# prints exactly one line, the device.
setup_ublk() {
  local name=blockd-ublk
  [ -e /dev/ublk-control ] || { skip_system $name "no /dev/ublk-control (the ublk_drv module is not loaded: modprobe ublk_drv)"; return 0; }
  ctl volume create data-ublk --size "$data_size" >/dev/null || die "blockctl volume create data-ublk failed"
  local printed
  if ! printed=$(ctl attach data-ublk --ublk 2>"$scratch/logs/ublk-attach.log"); then
    skip_system $name "blockctl attach data-ublk --ublk failed: $(grep -v '^[[:space:]]*$' "$scratch/logs/ublk-attach.log" | head -1)"
    return 0
  fi
  ublk_vol=data-ublk
  if [ "$(printf '%s\n' "$printed" | wc -l)" != 1 ] || [ ! -b "$printed" ]; then
    skip_system $name "blockctl attach --ublk printed '$(printf '%s' "$printed" | tr '\n' ' ')', not one line naming a block device"
    return 0
  fi
  printf 'ublk\t%s\n' "$printed" >>"$out/machine.tsv"
  dev_of[$name]="$printed"
  systems+=($name)
  target_of $name
  run_fio $name prefill "${tgt[@]}"
}

# restart_blockd: SIGKILL (a crash), then the same command line on the same state.
restart_blockd() {
  local pid="${server_pids[blockd]}" p
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local kept=()
  for p in "${pids[@]}"; do
    [ "$p" = "$pid" ] || kept+=("$p")
  done
  pids=("${kept[@]+"${kept[@]}"}")
  start_server blockd "$api" "${blockd_cmd[@]}"
  local i
  for i in $(seq 600); do
    ctl status >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "blockd does not answer on $api within 60 s of its restart (log: $scratch/logs/blockd.log)"
}

# run_stall SYSTEM: fio (random 4 KiB reads and writes, 16 in flight) on SYSTEM's device;
# stall_kill_at seconds in, blockd is killed and restarted. The JSON holds the longest
# completion latency (the longest pause any I/O saw) and, with --continue_on_error=all,
# every I/O error counted (total_err) instead of fio stopping at the first.
run_stall() {
  local system="$1"
  local base="$out/fio/${system}__restart-stall"
  local -a cmd=(fio --name=restart-stall "${common[@]}" --rw=randrw --rwmixread=70 --bs=4k
    --iodepth=16 --time_based "--runtime=$stall_runtime" "--size=$data_size"
    --continue_on_error=all --ioengine=io_uring --direct=1 "--filename=${dev_of[$system]}")
  log "restart stall: $system (blockd killed ${stall_kill_at} s into a ${stall_runtime} s run)"
  "${cmd[@]}" >"$base.out" 2>"$base.err" &
  local fio_pid=$!
  pids+=("$fio_pid")
  sleep "$stall_kill_at"
  local t0 t1
  t0=$(date +%s%N)
  restart_blockd
  t1=$(date +%s%N)
  local ready_ms=$(((t1 - t0) / 1000000))
  log "  blockd killed and answering again in ${ready_ms} ms"
  # A device that does not recover holds its I/O; fio then never ends: give up after
  # 120 s more than the run should take.
  local waited=0 status
  while kill -0 "$fio_pid" 2>/dev/null && [ "$waited" -lt $((stall_runtime + 120)) ]; do
    sleep 1
    waited=$((waited + 1))
  done
  if kill -0 "$fio_pid" 2>/dev/null; then
    kill -KILL "$fio_pid" 2>/dev/null || true
    wait "$fio_pid" 2>/dev/null || true
    status="hung: fio did not finish within $((stall_runtime + 120)) s (I/O never completed after the restart)"
  else
    set +e
    wait "$fio_pid"
    status="exit $?"
    set -e
  fi
  local p kept=()
  for p in "${pids[@]}"; do
    [ "$p" = "$fio_pid" ] || kept+=("$p")
  done
  pids=("${kept[@]+"${kept[@]}"}")
  sed -n '/^{/,$p' "$base.out" >"$base.json"
  rm -f "$base.out"
  [ -s "$base.err" ] || rm -f "$base.err"
  printf '%s\t%s\t%s\t%s\t%s\n' "$system" "${system}__restart-stall.json" "$ready_ms" "$status" "${cmd[*]}" >>"$stalls"
  "$report_bin" stall "$base.json" | sed 's/^/run.sh:     /' >&2 || true
}

# --- set-up: every system up at once, each on prefilled data ----------------------------
# raw, qemu-nbd and nbdkit share one preallocated file; qcow2 and blockd prefill their own
# thin image through NBD. Then every workload runs on every system back to back, so that
# the machine's load (other builds on the same cores) drifts as little as possible
# between the systems a ratio compares.
raw="$scratch/data.raw"
ft_raw="$scratch/first-touch.raw"
qcow="$scratch/data.qcow2"
ft_qcow="$scratch/first-touch.qcow2"
state="$scratch/blockd"
api="$state/api.sock"

log "set-up: preallocated raw file, qcow2 image, blockd daemon ($((data_size >> 20)) MiB each)"
rm -f "$raw"
fallocate -l "$data_size" "$raw" ||
  die "fallocate $raw failed (filesystem: $(df -T "$scratch" | awk 'NR == 2 {print $2}'))"
target_of raw
run_fio raw prefill "${tgt[@]}"
qemu_nbd qemu-nbd raw "$raw"
nbdkit_file "$raw"

qemu-img create -q -f qcow2 -o cluster_size=$chunk "$qcow" "$data_size" || die "qemu-img create failed"
qemu_nbd qemu-nbd-qcow2 qcow2 "$qcow"
target_of qemu-nbd-qcow2
run_fio qemu-nbd-qcow2 prefill "${tgt[@]}"

mkdir -p "$state"
pool_size=$(((data_size + ft_size) * 2))
blockd_cmd=("$blockd_bin" --state-dir "$state"
  --pool "bench=$scratch/blockd-pool.img,size=$pool_size,chunk=$chunk")
start_server blockd "$api" "${blockd_cmd[@]}"
for _ in $(seq 100); do
  ctl status >/dev/null 2>&1 && break
  sleep 0.1
done
ctl status >/dev/null || die "blockd does not answer on $api (log: $scratch/logs/blockd.log)"
ctl volume create data --size "$data_size" >/dev/null || die "blockctl volume create failed"
blockd_uri="$(ctl export data)" || die "blockctl export failed"
target_of blockd
run_fio blockd prefill "${tgt[@]}"

# --- the kernel devices, where this kernel has them --------------------------------------
log "set-up: kernel devices (loop, kernel NBD, ublk) where this kernel has them"
setup_loop
setup_knbd
setup_ublk
total_runs=$((total_runs + (${#systems[@]} - 5) * ${#data_workloads[@]} + ${#systems[@]} * 2 * (rounds - 1)))
# Report order, so that each device runs right next to what it is compared with.
ordered=()
for s in raw loop blockd blockd-ublk blockd-kernel-nbd qemu-nbd qemu-nbd-qcow2 nbdkit; do
  for t in "${systems[@]}"; do
    [ "$s" = "$t" ] && ordered+=("$s")
  done
done
systems=("${ordered[@]}")

# --- the data workloads, each on every system -------------------------------------------
for w in "${data_workloads[@]}"; do
  n=1
  case "$w" in randread-4k-*) n=$rounds ;; esac
  for r in $(seq "$n"); do
    round_suffix=""
    [ "$r" = 1 ] || round_suffix="-r$r"
    for system in "${systems[@]}"; do
      target_of "$system"
      run_fio "$system" "$w" "${tgt[@]}"
    done
  done
  round_suffix=""
done
# The loop device is done (raw's file goes below).
if [ -n "$loop_dev" ]; then
  losetup -d "$loop_dev" || log "  warning: losetup -d $loop_dev failed"
  loop_dev=""
fi

# --- copy-on-write after a snapshot: blockd, then qcow2 (internal snapshot, server stopped)
ctl snapshot create data bench-snap >/dev/null || die "blockctl snapshot create failed"
target_of blockd
run_fio blockd randwrite-4k-qd32-after-snapshot "${tgt[@]}"
stop_servers qemu-nbd-qcow2
qemu-img snapshot -c bench-snap "$qcow" || die "qemu-img snapshot -c failed"
qemu_nbd qemu-nbd-qcow2 qcow2 "$qcow"
target_of qemu-nbd-qcow2
run_fio qemu-nbd-qcow2 randwrite-4k-qd32-after-snapshot "${tgt[@]}"

# --- first touch: fresh targets ---------------------------------------------------------
stop_servers qemu-nbd nbdkit qemu-nbd-qcow2
rm -f "$raw" "$qcow"
fresh_sparse "$ft_raw" "$ft_size"
run_fio raw randwrite-4k-qd32-first-touch --ioengine=io_uring --direct=1 "--filename=$ft_raw"
ctl volume create first-touch --size "$ft_size" >/dev/null || die "blockctl volume create failed"
ft_uri="$(ctl export first-touch)" || die "blockctl export failed"
run_fio blockd randwrite-4k-qd32-first-touch --ioengine=nbd "--uri=$ft_uri"
fresh_sparse "$ft_raw" "$ft_size"
qemu_nbd qemu-nbd raw "$ft_raw"
target_of qemu-nbd
run_fio qemu-nbd randwrite-4k-qd32-first-touch "${tgt[@]}"
stop_servers qemu-nbd
qemu-img create -q -f qcow2 -o cluster_size=$chunk "$ft_qcow" "$ft_size" || die "qemu-img create failed"
qemu_nbd qemu-nbd-qcow2 qcow2 "$ft_qcow"
target_of qemu-nbd-qcow2
run_fio qemu-nbd-qcow2 randwrite-4k-qd32-first-touch "${tgt[@]}"
stop_servers qemu-nbd-qcow2
fresh_sparse "$ft_raw" "$ft_size"
nbdkit_file "$ft_raw"
target_of nbdkit
run_fio nbdkit randwrite-4k-qd32-first-touch "${tgt[@]}"
stop_servers nbdkit

# --- restart stall: blockd killed and restarted under load on its kernel devices ----------
for system in blockd-ublk blockd-kernel-nbd; do
  if [ -n "${dev_of[$system]:-}" ]; then
    run_stall "$system"
  fi
done
detach_devices
stop_servers knbd-proxy blockd
rm -f "$ft_raw" "$ft_qcow" "$scratch/blockd-pool.img"

# --- engine figures ------------------------------------------------------------------------
if [ "$engine_figures" = 1 ]; then
  log "engine figures (metadata per TiB, RSS with 1 TiB of thin volumes, startup, snapshots)"
  BLOCKD_BENCH_SCRATCH="$scratch" "$bin/engine-figures" >"$out/engine-figures.json" ||
    die "engine-figures failed"
fi

# --- report ----------------------------------------------------------------------------
elapsed=$(($(date +%s) - started))
printf 'elapsed_seconds\t%s\n' "$elapsed" >>"$out/machine.tsv"
"$report_bin" report --out "$out" || die "bench-report failed"
log "done in ${elapsed}s: $out/report.md, $out/results.json, $out/chart.png"
