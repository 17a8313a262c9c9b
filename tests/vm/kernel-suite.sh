#!/usr/bin/env bash
# The kernel suite: the tests that need a real kernel's block drivers, run inside one boot
# of the test guest (tests/vm/run.sh) with bookworm-backports' 6.12, then a second, shorter
# boot with trixie-backports' newer kernel. Builds on the host; the guest runs the built
# binaries through its read-only view of the host.
#
#   tests/vm/kernel-suite.sh [TEST-FILTER...]
#
# What runs in the guest:
#   - tests/tests/csi_node.rs with BLOCKD_TEST_ATTACH=nbd: the whole CSI node suite on real
#     /dev/nbdN (mount and block volumes, ext4 and xfs, read-only publish, stats, restage,
#     online growth of ext4 and xfs, SIGKILL of blockd and of csi-shim under fio verify);
#   - tests/tests/csi_static_ephemeral.rs, the same way: a statically provisioned volume
#     staged from `blockctl volume pv`'s handle, and inline ephemeral volumes (crashes
#     between their steps included) on /dev/nbdN;
#   - both again with BLOCKD_TEST_ATTACH=ublk: every node test on /dev/ublkbN served by
#     blockd itself, SIGKILL of blockd under a mounted, written volume included (the
#     device is recovered in place, fio verifies with 0 errors, no I/O error in dmesg);
#   - tests/tests/ublk.rs: blockctl attach/detach --ublk, read-only snapshots, discard
#     and write-zeroes, QoS, and recovery after SIGTERM and SIGKILL;
#   - tests/tests/bench_smoke.rs: benches/run.sh as a smoke test with the kernel devices
#     (loop, blockd on /dev/nbdN through csi-nbd-proxy, blockd on /dev/ublkbN) and their
#     restart stalls; the guest's CPU is emulated, so its report says the figures mean
#     nothing;
#   - tests/tests/kbench.rs with BLOCKD_TEST_ATTACH=ublk: the kbench example's fio job
#     file on a volume csi-shim staged on /dev/ublkbN;
#   - in the second boot: tests/tests/ublk.rs again on trixie-backports' newer kernel
#     (tests/vm/run.sh --kernel-suite trixie-backports, Linux >= 6.16), where blockd serves
#     ublk with zero copy (automatic buffer registration); BLOCKD_TEST_UBLK_ZERO_COPY=1
#     makes those tests insist on it.
#
# The "kernel: N passed, M failed" closing line counts the tests of both boots. The exit
# status is nonzero when a test of either boot failed; a boot that could not run its guest
# at all (run.sh's 125) skips or fails the suite as below.
#
# The variable BLOCKD_KERNEL_ATTACH (default "nbd ublk") chooses the attachers the node
# suites run with.
#
# Where QEMU cannot run at all, the suite fails under CI=true (a degraded CI must turn red)
# and skips with the reason elsewhere.
set -euo pipefail
cd "$(dirname "$0")/../.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/blockd-target}"
ci=0
case "${CI:-}" in true | TRUE | True | 1) ci=1 ;; esac

skip_or_fail() {
  if [ "$ci" -eq 1 ]; then
    echo "kernel suite: FAILED: $* (CI=true: the kernel suite cannot be skipped)" >&2
    exit 1
  fi
  echo "kernel suite: skipping: $*" >&2
  exit 0
}

if ! tests/vm/run.sh --setup; then
  skip_or_fail "the guest test bed cannot be prepared (see above)"
fi
command -v qemu-system-x86_64 >/dev/null || skip_or_fail "QEMU is not installed"

# Host-side builds: the binaries and the test executables, with the package set and
# features of `cargo test --workspace` (a narrower `-p` build would compile RocksDB again).
suites=(csi_node csi_static_ephemeral ublk bench_smoke kbench)
mapfile -t exes < <(cargo build --quiet --workspace --bins --tests --message-format=json |
  python3 -c 'import json,sys
want = sys.argv[1:]
found = {}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] in want and m.get("executable"):
        found[m["target"]["name"]] = m["executable"]
for name in want:
    print(found.get(name, ""))' "${suites[@]}")
for i in "${!suites[@]}"; do
  [ -x "${exes[$i]:-}" ] || { echo "kernel suite: cannot find the ${suites[$i]} test executable" >&2; exit 1; }
done

bin="$CARGO_TARGET_DIR/debug"
export BLOCKD_BIN="$bin/blockd" BLOCKCTL_BIN="$bin/blockctl" CSI_SHIM_BIN="$bin/csi-shim"
read -r -a attachers <<<"${BLOCKD_KERNEL_ATTACH:-nbd ublk}"
# The node suites once per attacher, then the ublk frontend's own tests, the benchmark
# smoke test and kbench.
runs=()
for mode in "${attachers[@]}"; do
  runs+=("$mode=${exes[0]}" "$mode=${exes[1]}")
done
runs+=("${exes[2]}" "${exes[3]}" "ublk=${exes[4]}")
export RUST_BACKTRACE=1
# tests/tests/ublk.rs must find ublk in the guest (on the host it checks the refusal).
export BLOCKD_TEST_UBLK=1

started=$(date +%s)
set +e
# One boot: every kernel test in it. One test at a time: under TCG the guest's two CPUs
# are slow, and the tests time their helpers out generously but not without limit.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Every suite runs even when one fails (tests/vm/run-suites.sh, inside the guest). It runs
# from CARGO_TARGET_DIR, next to the test executables: the guest may not see this checkout
# (a clone under /tmp is hidden by the guest's own /tmp), but it sees those.
runner="$CARGO_TARGET_DIR/blockd-run-suites.sh"
cp tests/vm/run-suites.sh "$runner"
tests/vm/run.sh --timeout 3600 -- "$runner" "${runs[@]}" -- "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "kernel suite: guest part took $(($(date +%s) - started)) s, exit status $status"

# The second boot, even when the first failed (its tests are independent): the ublk
# frontend's tests on trixie-backports' kernel, which has UBLK_F_AUTO_BUF_REG (Linux 6.16;
# bookworm-backports stops at 6.12). BLOCKD_TEST_UBLK_ZERO_COPY=1 reaches the guest like
# every BLOCKD_* variable, and only in this boot: the 6.12 boot must not demand zero copy.
started=$(date +%s)
set +e
BLOCKD_TEST_UBLK_ZERO_COPY=1 tests/vm/run.sh --kernel-suite trixie-backports --timeout 3600 -- \
  "$runner" "${exes[2]}" -- "$@" 2>&1 | tee -a "$log"
zc_status=${PIPESTATUS[0]}
set -e
echo "kernel suite: zero-copy boot (trixie-backports) took $(($(date +%s) - started)) s, exit status $zc_status"
# The libtest "test result: ok. 11 passed; 0 failed; ..." lines of every suite, summed,
# as the plain closing line.
passed=$(sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\1/p' "$log" | awk '{s+=$1} END {if (NR) print s}')
failed=$(sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\2/p' "$log" | awk '{s+=$1} END {if (NR) print s}')
if [ -n "$passed" ]; then
  echo "kernel: ${passed} passed, ${failed} failed"
fi
# A test failure in either boot decides the status: a guest that could not run in the
# other boot must not turn it into a skip.
for boot_status in "$status" "$zc_status"; do
  if [ "$boot_status" -ne 0 ] && [ "$boot_status" -ne 125 ]; then
    exit "$boot_status"
  fi
done
if [ "$status" -eq 125 ] || [ "$zc_status" -eq 125 ]; then
  skip_or_fail "the guest could not run the suite (see above)"
fi
exit 0
