#!/usr/bin/env bash
# The whole test suite, as CI and a newcomer run it: installs what is missing, then
# fmt check, clippy -D warnings, and every test of the workspace.
#
# A persistent CARGO_TARGET_DIR outside the clone keeps the RocksDB C++ build between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
step_start=$SECONDS
# Prints how long the previous step took, then names the next one.
step() {
  echo "test.sh: ($((SECONDS - step_start)) s) $*"
  step_start=$SECONDS
}

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/blockd-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

# --- system packages (Debian), installed only when absent -------------------------------
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have clang || need+=(clang)
have g++ || need+=(g++)                                        # RocksDB C++
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)   # bindgen for librocksdb-sys
have qemu-img || need+=(qemu-utils)
have nbdinfo || need+=(libnbd-bin)
have fio || need+=(fio)
have openssl || need+=(openssl)                                # NBD-over-TLS test certificates
have nbdkit || need+=(nbdkit)
have nbd-client || need+=(nbd-client)                          # kernel NBD bench system (guest)
have gnuplot || need+=(gnuplot-nox)
have mkfs.ext4 || need+=(e2fsprogs)
have mkfs.xfs || need+=(xfsprogs)
have losetup || need+=(mount)
have python3 || need+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
have kubectl || need+=(kubernetes-client)                     # kubectl kustomize (offline)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && have apt-get; then
    echo "test.sh: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "test.sh: missing packages ${need[*]} and cannot apt-get install them (not root?)" >&2
    exit 1
  fi
fi

# --- Python tools, in a private venv (offline Kubernetes manifest validation) ------------
export BLOCKD_VENV="${BLOCKD_VENV:-$HOME/.cache/blockd-venv}"
if [ ! -x "$BLOCKD_VENV/bin/kubernetes-validate" ]; then
  echo "test.sh: installing kubernetes-validate into $BLOCKD_VENV"
  python3 -m venv "$BLOCKD_VENV"
  "$BLOCKD_VENV/bin/pip" install -q --disable-pip-version-check kubernetes-validate
fi

# --- checks ----------------------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
if have cargo-nextest; then
  # Doc tests first (nextest does not run them), so that the suite's summary closes the log.
  cargo test --workspace --doc -q
  cargo nextest run --workspace --no-fail-fast --test-threads "${TEST_THREADS:-2}"
else
  cargo test --workspace --no-fail-fast -- --test-threads "${TEST_THREADS:-2}"
fi

# The wire decoders under libFuzzer for a few seconds each, on the stable toolchain (no
# sanitizer: see fuzz/README.md), with a target directory of their own so that the fuzz
# flags never invalidate the workspace build.
step "cargo fuzz (fuzz/), ${FUZZ_SECONDS:-5} s per target"
fuzz_target_dir="$HOME/.cache/blockd-fuzz-target"
have cargo-fuzz || CARGO_TARGET_DIR="$fuzz_target_dir" cargo install cargo-fuzz --locked
(
  cd fuzz
  export CARGO_TARGET_DIR="$fuzz_target_dir"
  for target in $(cargo fuzz list); do
    log="$CARGO_TARGET_DIR/fuzz-$target.log"
    if cargo fuzz run -s none "$target" -- -max_total_time="${FUZZ_SECONDS:-5}" >"$log" 2>&1; then
      echo "test.sh: fuzz $target: $(grep -E '^Done' "$log" || echo done)"
    else
      cat "$log"
      echo "test.sh: fuzz target $target failed; the input is in fuzz/artifacts/$target/" >&2
      exit 1
    fi
  done
)

# The kernel suite (real /dev/nbdN, online ext4 growth) inside one guest boot: the host's
# kernel may lack the modules. tests/vm/kernel-suite.sh installs QEMU and the kernel.
step "kernel suite (tests/vm/kernel-suite.sh), $SECONDS s since the start"
tests/vm/kernel-suite.sh
