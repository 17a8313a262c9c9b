#!/usr/bin/env bash
# tools/run.sh BINARY [ARGS...] — build the workspace's release binaries once and run one.
#
#   tools/run.sh blockd                      # the daemon on its embedded default (./blockd-data)
#   tools/run.sh blockctl volume list        # any other binary of the workspace
#
# Why not plain `cargo run --release --bin blockd` (which works too): this script shares
# one target directory ($CARGO_TARGET_DIR, default $HOME/.cache/blockd-target) and one
# feature resolution (`--workspace --bins`) with tools/test.sh and benches/run.sh, so the
# RocksDB C++ library is compiled once per profile on a machine instead of once per
# command. It also installs the build's system prerequisites (clang and libclang for
# bindgen, a C++ compiler for RocksDB) when they are missing and it runs as root.
set -euo pipefail

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  echo
  echo "binaries: blockd blockctl blockd-demo csi-shim csi-nbd-proxy csi-fuse-nbd"
}

case "${1:-}" in
  "" | -h | --help) usage; [ -n "${1:-}" ]; exit ;;
esac
bin="$1"
shift

repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/blockd-target}"

have() { command -v "$1" >/dev/null 2>&1; }
have cargo || { echo "run.sh: cargo not found: install Rust (rustup or Debian's cargo) first" >&2; exit 1; }
need=()
have clang || need+=(clang)
have g++ || need+=(g++)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && have apt-get; then
    echo "run.sh: installing the build prerequisites ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "run.sh: missing build prerequisites: ${need[*]} (sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
fi

if [ ! -x "$CARGO_TARGET_DIR/release/blockd" ]; then
  echo "run.sh: building release binaries into $CARGO_TARGET_DIR (the first build compiles RocksDB's C++: 10-15 minutes on 2 cores)" >&2
fi
(cd "$repo" && cargo build --release --quiet --workspace --bins)

exe="$CARGO_TARGET_DIR/release/$bin"
if [ ! -x "$exe" ]; then
  echo "run.sh: no binary '$bin' in the workspace" >&2
  usage >&2
  exit 2
fi
exec "$exe" "$@"
