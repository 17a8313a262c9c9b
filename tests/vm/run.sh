#!/usr/bin/env bash
# Runs one command inside a throw-away guest that boots a real Linux kernel (Debian
# bookworm-backports' 6.12, with the nbd, ublk_drv and loop modules), and exits with the
# command's exit status. The kernel paths of blockd and csi-shim (/dev/nbdN, /dev/ublkbN,
# online ext4 growth) are tested here: the host's own kernel may lack them.
#
#   tests/vm/run.sh [OPTIONS] [--] COMMAND [ARGS...]
#   tests/vm/run.sh --setup          only install and prepare (kernel, initramfs)
#
# The guest sees the host's root file system read-only over 9p, under a writable tmpfs
# overlay, so binaries built on the host run in the guest at the same paths; the command
# runs as root in the current directory, with PATH, HOME, CI, RUST_* and BLOCKD_* / CSI_*
# variables passed through. A sparse scratch disk (virtio-blk, ext4) is mounted at
# /scratch and TMPDIR points into it: tmpfs cannot do O_DIRECT, pools need it.
#
# Nothing is installed into /boot: the kernel .deb is unpacked into a cache
# ($BLOCKD_VM_CACHE, default ~/.cache/blockd-vm). QEMU uses KVM only where /dev/kvm is
# hardware KVM; a paravirtual KVM (kvm_pvm) cannot boot stock kernels, so TCG is used there.
#
# Exit status: the command's, or 125 when the guest could not run it (setup failed, QEMU
# missing or failed, guest timed out) with the reason on stderr.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --setup            prepare only (apt packages, kernel, initramfs), run nothing
  --timeout SECS     power the guest off after SECS (default 1500)
  --mem MIB          guest memory (default 3072)
  --cpus N           guest CPUs (default: the host's, at most 4)
  --scratch SIZE     size of the sparse scratch disk (default 16G)
  --kernel VERSION   a kernel version from bookworm-backports (default: the newest 6.12)
  -h, --help         this text

Example:
  tests/vm/run.sh -- sh -c 'ls /dev/nbd0 /dev/ublk-control && uname -r'
EOF
}

die() {
  echo "tests/vm: $*" >&2
  exit 125
}

setup_only=0
timeout=1500
mem=3072
cpus=$(nproc)
[ "$cpus" -gt 4 ] && cpus=4
scratch_size=16G
kernel_version=""
while [ $# -gt 0 ]; do
  case "$1" in
    --setup) setup_only=1 ;;
    --timeout) timeout=${2:?--timeout needs seconds}; shift ;;
    --mem) mem=${2:?--mem needs MiB}; shift ;;
    --cpus) cpus=${2:?--cpus needs a count}; shift ;;
    --scratch) scratch_size=${2:?--scratch needs a size}; shift ;;
    --kernel) kernel_version=${2:?--kernel needs a version}; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "tests/vm: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
if [ "$setup_only" -eq 0 ] && [ $# -eq 0 ]; then
  echo "tests/vm: no command given (see --help)" >&2
  exit 2
fi

cache="${BLOCKD_VM_CACHE:-$HOME/.cache/blockd-vm}"
mkdir -p "$cache"
here="$(cd "$(dirname "$0")" && pwd)"

# --- host packages ------------------------------------------------------------------------
# QEMU comes from bookworm-backports: the machine's qemu-utils does, and it Breaks
# bookworm's own qemu-system-common. The backports suite is added on the mirror the
# machine already uses.
have() { command -v "$1" >/dev/null 2>&1; }

add_backports() {
  if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 0
  fi
  local mirror
  mirror=$(grep -rhs -m1 '^URIs:.*debian$' /etc/apt/sources.list.d/*.sources | awk '{print $2}' || true)
  [ -n "$mirror" ] || mirror=$(grep -hs -m1 '^deb .*debian/\? bookworm' /etc/apt/sources.list | awk '{print $2}' || true)
  [ -n "$mirror" ] || mirror="http://deb.debian.org/debian"
  echo "tests/vm: adding bookworm-backports from $mirror"
  cat >/etc/apt/sources.list.d/blockd-backports.sources <<EOF
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt_updated=0
}

apt_updated=0
apt_install() {
  [ "$(id -u)" -eq 0 ] && have apt-get || die "missing $*, and cannot apt-get install it (not root or not Debian)"
  if [ "$apt_updated" -eq 0 ]; then
    apt-get update -qq || die "apt-get update failed"
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null ||
    die "apt-get install $* failed"
}

if [ "$(id -u)" -eq 0 ] && have apt-get; then add_backports; fi
need=()
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx insmod || need+=(busybox-static)
have cpio || need+=(cpio)
have modprobe && have depmod || need+=(kmod)
have xz || need+=(xz-utils)
have mkfs.ext4 || need+=(e2fsprogs)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
if ! have qemu-system-x86_64; then
  apt_install -t bookworm-backports qemu-system-x86
fi

# --- the kernel, unpacked into the cache --------------------------------------------------
if [ -z "$kernel_version" ]; then
  # Reuse what the cache holds; ask apt only when it holds nothing.
  kernel_version=$(ls -1 "$cache"/kernels 2>/dev/null | sort -V | tail -1 || true)
fi
if [ -z "$kernel_version" ]; then
  [ "$apt_updated" -eq 1 ] || { apt-get update -qq || die "apt-get update failed"; apt_updated=1; }
  kernel_version=$(apt-cache depends linux-image-6.12-amd64 2>/dev/null |
    awk '/Depends: linux-image-6\.12/ {sub("linux-image-", "", $2); print $2; exit}')
  [ -n "$kernel_version" ] || die "bookworm-backports offers no linux-image-6.12-amd64 (is the suite in apt's sources?)"
fi
kdir="$cache/kernels/$kernel_version"
if [ ! -f "$kdir/ready" ]; then
  echo "tests/vm: fetching kernel $kernel_version"
  tmp=$(mktemp -d "$cache/fetch.XXXXXX")
  (cd "$tmp" && apt-get download "linux-image-$kernel_version" >/dev/null 2>&1) ||
    { rm -rf "$tmp"; die "apt-get download linux-image-$kernel_version failed"; }
  dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/root" || { rm -rf "$tmp"; die "dpkg-deb -x failed"; }
  rm -rf "$kdir"
  mkdir -p "$kdir/lib"
  mv "$tmp/root/boot/vmlinuz-$kernel_version" "$kdir/vmlinuz"
  mv "$tmp/root/lib/modules" "$kdir/lib/modules"
  rm -rf "$tmp"
  depmod -b "$kdir" "$kernel_version" || die "depmod failed"
  touch "$kdir/ready"
fi

# --- the initramfs: busybox and the modules that reach the host's root ---------------------
initrd="$kdir/initrd-$(sha256sum "$here/init" | cut -c1-12).cpio"
if [ ! -f "$initrd" ]; then
  echo "tests/vm: building the initramfs"
  tmp=$(mktemp -d "$cache/initrd.XXXXXX")
  mkdir -p "$tmp"/{bin,dev,proc,sys,mnt,modules}
  cp /bin/busybox "$tmp/bin/busybox"
  for applet in sh mount umount mkdir insmod chroot poweroff sleep cat echo ip ln mknod; do
    ln -s busybox "$tmp/bin/$applet"
  done
  cp "$here/init" "$tmp/init"
  chmod +x "$tmp/init"
  # Module load order (dependencies first), decompressed: busybox insmod reads plain .ko.
  n=0
  for module in 9pnet_virtio 9p overlay virtio_blk; do
    modprobe -d "$kdir" -S "$kernel_version" --show-depends "$module" | awk '$1 == "insmod" {print $2}'
  done | awk '!seen[$0]++' | while read -r ko; do
    n=$((n + 1))
    name=$(printf '%02d-%s' "$n" "$(basename "${ko%.xz}")")
    case "$ko" in
      *.xz) xz -dc "$ko" >"$tmp/modules/$name" ;;
      *) cp "$ko" "$tmp/modules/$name" ;;
    esac
  done
  (cd "$tmp" && find . | cpio -o -H newc --quiet >"$initrd.part") || die "cpio failed"
  mv "$initrd.part" "$initrd"
  rm -rf "$tmp"
fi

[ "$setup_only" -eq 1 ] && { echo "tests/vm: ready (kernel $kernel_version, cache $cache)"; exit 0; }

# --- the run --------------------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/blockd-vm.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

truncate -s "$scratch_size" "$work/scratch.img"
{
  echo "export PATH=$(printf '%q' "$PATH")"
  echo "export HOME=$(printf '%q' "${HOME:-/root}")"
  while IFS='=' read -r name _; do
    case "$name" in
      CI | RUST_BACKTRACE | RUST_LOG | CARGO_TARGET_DIR | BLOCKD_* | CSI_* | BLOCKCTL_* | NEXTEST_* | TEST_*)
        echo "export $name=$(printf '%q' "${!name}")" ;;
    esac
  done < <(env)
  echo "cd $(printf '%q' "$PWD")"
  printf 'exec'
  printf ' %q' "$@"
  echo
} >"$work/cmd.sh"
echo "$kernel_version" >"$work/kernel"

# Hardware KVM is kvm_intel or kvm_amd; kvm_pvm (paravirtual, nested) fails on stock
# kernels. BLOCKD_VM_ACCEL=tcg|kvm overrides the choice.
accel=tcg,thread=multi
cpu=max
if [ -c /dev/kvm ] && [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ] &&
  { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then
  accel=kvm
  cpu=host
fi
case "${BLOCKD_VM_ACCEL:-}" in
  tcg) accel=tcg,thread=multi; cpu=max ;;
  kvm) accel=kvm; cpu=host ;;
esac

echo "tests/vm: booting $kernel_version ($accel, $cpus CPUs, ${mem} MiB) for: $*"
started=$(date +%s)
set +e
timeout --foreground -k 10 "$timeout" qemu-system-x86_64 \
  -nodefaults -no-user-config -display none -no-reboot \
  -machine q35 -accel "$accel" -cpu "$cpu" -smp "$cpus" -m "$mem" \
  -kernel "$kdir/vmlinuz" -initrd "$initrd" \
  -append "console=hvc0 quiet loglevel=4 panic=-1 blockd.modules=$kdir/lib/modules" \
  -device virtio-serial-pci -chardev stdio,id=console,signal=off -device virtconsole,chardev=console \
  -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
  -virtfs "local,path=$work,mount_tag=vmout,security_model=none" \
  -drive "file=$work/scratch.img,format=raw,if=virtio,cache=unsafe,discard=unmap" \
  -nic none </dev/null
qemu_status=$?
set -e
elapsed=$(($(date +%s) - started))

if [ -f "$work/rc" ]; then
  rc=$(cat "$work/rc")
  echo "tests/vm: the command exited with $rc after ${elapsed} s in the guest"
  exit "$rc"
fi
if [ "$qemu_status" -eq 124 ]; then
  die "the guest did not finish within $timeout s (--timeout)"
fi
die "the guest stopped without running the command (qemu exit status $qemu_status, ${elapsed} s)"
