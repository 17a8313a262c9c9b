#!/usr/bin/env bash
# Runs one command inside a throw-away guest that boots a real Linux kernel (Debian
# bookworm-backports' 6.12 by default, with the nbd, ublk_drv and loop modules), and exits
# with the command's exit status. The kernel paths of blockd and csi-shim (/dev/nbdN,
# /dev/ublkbN, online ext4 growth) are tested here: the host's own kernel may lack them.
#
#   tests/vm/run.sh [OPTIONS] [--] COMMAND [ARGS...]
#   tests/vm/run.sh --setup          only install and prepare (kernel, initramfs)
#
# --kernel-suite trixie-backports boots the newest kernel of trixie-backports instead
# (Linux >= 6.16: ublk zero copy with automatic buffer registration, UBLK_F_AUTO_BUF_REG).
# That suite is NOT added to apt's sources (apt would then offer trixie's packages to this
# bookworm host): its InRelease is fetched from the mirror apt uses and verified with gpgv
# against debian-archive-keyring, and the index and the kernel's .debs by their SHA256.
# Without --kernel, the newest kernel of the chosen suite already in the cache is reused
# (bookworm-backports: 6.12.*, trixie-backports: *+deb13-amd64), so a second run downloads
# nothing; the suite is asked only when the cache holds none of its kernels.
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
  --kernel-suite SUITE
                     where the kernel comes from: bookworm-backports (default: Linux
                     6.12, through apt) or trixie-backports (its newest plain amd64
                     kernel, fetched and verified by hand, not through apt's sources)
  --kernel VERSION   a kernel version (uname -r) to boot: from the cache if it holds it,
                     else from the --kernel-suite (default: the newest of that suite in
                     the cache, else the suite's newest)
  -h, --help         this text

Example:
  tests/vm/run.sh -- sh -c 'ls /dev/nbd0 /dev/ublk-control && uname -r'
  tests/vm/run.sh --kernel-suite trixie-backports -- uname -r
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
kernel_suite=bookworm-backports
while [ $# -gt 0 ]; do
  case "$1" in
    --setup) setup_only=1 ;;
    --timeout) timeout=${2:?--timeout needs seconds}; shift ;;
    --mem) mem=${2:?--mem needs MiB}; shift ;;
    --cpus) cpus=${2:?--cpus needs a count}; shift ;;
    --scratch) scratch_size=${2:?--scratch needs a size}; shift ;;
    --kernel) kernel_version=${2:?--kernel needs a version}; shift ;;
    --kernel-suite) kernel_suite=${2:?--kernel-suite needs a suite}; shift ;;
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
# The kernels in the cache that are the suite's default (grep -E on their versions): the
# default must not wander to another suite's newer kernel once both are cached.
case "$kernel_suite" in
  bookworm-backports) kernel_pattern='^6\.12\..*-amd64$' ;;
  trixie-backports) kernel_pattern='^[0-9][0-9.]*\+deb13-amd64$' ;;
  *)
    echo "tests/vm: unknown --kernel-suite $kernel_suite (bookworm-backports or trixie-backports)" >&2
    exit 2
    ;;
esac

cache="${BLOCKD_VM_CACHE:-$HOME/.cache/blockd-vm}"
mkdir -p "$cache"
here="$(cd "$(dirname "$0")" && pwd)"

# --- host packages ------------------------------------------------------------------------
# QEMU comes from bookworm-backports: the machine's qemu-utils does, and it Breaks
# bookworm's own qemu-system-common. The backports suite is added on the mirror the
# machine already uses.
have() { command -v "$1" >/dev/null 2>&1; }

# The Debian mirror the machine's apt uses (the first one found), deb.debian.org if none.
apt_mirror() {
  local mirror
  mirror=$(grep -hs '^URIs:.*debian/\?$' /etc/apt/sources.list.d/*.sources | awk '{print $2; exit}' || true)
  [ -n "$mirror" ] || mirror=$(grep -hs '^deb .*debian/\? bookworm' /etc/apt/sources.list |
    awk '{for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:/) {print $i; exit}}' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  echo "${mirror%/}"
}

add_backports() {
  if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 0
  fi
  local mirror
  mirror=$(apt_mirror)
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
if [ "$kernel_suite" = trixie-backports ]; then
  have curl || need+=(curl)
  have gpgv || need+=(gpgv)
  [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
  # Its kernels may compress their modules with zstd rather than xz (the initramfs holds
  # them decompressed).
  have zstd || need+=(zstd)
fi
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
if ! have qemu-system-x86_64; then
  apt_install -t bookworm-backports qemu-system-x86
fi

# --- the kernel, unpacked into the cache --------------------------------------------------
download() { # URL FILE
  curl -fsSL --retry 3 -o "$2" "$1"
}

# trixie-backports is not in apt's sources (see the top), so its index is fetched here with
# apt's chain of trust: InRelease signed by the archive keys (bookworm's
# debian-archive-keyring holds trixie's), the Packages index's SHA256 from it, and each
# .deb's SHA256 from the index. Writes DIR/Packages.
suite_index() { # DIR
  local dir=$1 dists valid_until expires sha url
  dists="$(apt_mirror)/dists/$kernel_suite"
  download "$dists/InRelease" "$dir/InRelease" || die "cannot download $dists/InRelease"
  # Only the signed text (--output) is read from here on, never the file as downloaded.
  gpgv --keyring /usr/share/keyrings/debian-archive-keyring.gpg --output "$dir/Release" \
    "$dir/InRelease" 2>"$dir/gpgv.log" ||
    { cat "$dir/gpgv.log" >&2; die "$dists/InRelease: the signature does not verify with debian-archive-keyring"; }
  sed -n 's/^gpgv: Good signature from /tests\/vm: InRelease signed by /p' "$dir/gpgv.log"
  # A validly signed but different or stale Release (a mirror replaying an old one) is
  # refused, as apt does.
  grep -qx "Codename: $kernel_suite" "$dir/Release" || die "$dists/InRelease is not $kernel_suite's"
  valid_until=$(sed -n 's/^Valid-Until: //p' "$dir/Release")
  if [ -n "$valid_until" ]; then
    expires=$(date -d "$valid_until" +%s) || die "$dists/InRelease: cannot read Valid-Until: $valid_until"
    [ "$expires" -ge "$(date +%s)" ] || die "$dists/InRelease expired on $valid_until (a stale mirror?)"
  fi
  sha=$(awk '/^SHA256:/ {s = 1; next} /^[^ ]/ {s = 0}
    s && $3 == "main/binary-amd64/Packages.xz" {print $1; exit}' "$dir/Release")
  [ -n "$sha" ] || die "$dists/InRelease lists no main/binary-amd64/Packages.xz"
  # By hash where the archive offers it: the index cannot change under us between the two
  # downloads when the mirror updates.
  url="$dists/main/binary-amd64/Packages.xz"
  grep -qx 'Acquire-By-Hash: yes' "$dir/Release" && url="$dists/main/binary-amd64/by-hash/SHA256/$sha"
  download "$url" "$dir/Packages.xz" || die "cannot download $url"
  [ "$(sha256sum <"$dir/Packages.xz" | cut -d' ' -f1)" = "$sha" ] || die "$url: wrong SHA256"
  xz -dc "$dir/Packages.xz" >"$dir/Packages" || die "cannot decompress $url"
}

# The plain amd64 kernels the index offers (no cloud or rt flavour, no -dbg), newest first.
suite_kernels() { # PACKAGES
  grep -E '^Package: linux-image-[0-9][^-]*(-[0-9]+)?-amd64(-unsigned)?$' "$1" |
    sed -E 's/^Package: linux-image-//; s/-unsigned$//' | sort -Vru
}

# "SHA256 Filename" of each .deb that makes up kernel KVER: linux-image-KVER (the signed
# one; -unsigned only when it is all there is) and every linux-*-KVER it depends on. Newer
# Debian kernels split into an empty linux-image and linux-binary- (vmlinuz),
# linux-modules- and linux-base- (modules.builtin, ...) packages. Fails when one of them is
# missing from the index: a backports index may list an image without its parts.
kernel_debs() { # PACKAGES KVER
  awk -v RS= -F '\n' -v kver="$2" '
    {
      pkg = ver = file = sum = dep = ""
      for (i = 1; i <= NF; i++) {
        if ($i ~ /^Package: /) pkg = substr($i, 10)
        else if ($i ~ /^Version: /) ver = substr($i, 10)
        else if ($i ~ /^Filename: /) file = substr($i, 11)
        else if ($i ~ /^SHA256: /) sum = substr($i, 9)
        else if ($i ~ /^(Pre-)?Depends: /) dep = dep ", " substr($i, index($i, ": ") + 2)
      }
      if (pkg == "" || file == "" || sum == "") next
      deb[pkg] = sum " " file
      deb[pkg "=" ver] = sum " " file
      deps[pkg] = dep
    }
    END {
      image = "linux-image-" kver
      if (!(image in deb)) image = image "-unsigned"
      if (!(image in deb)) exit 1
      print deb[image]
      n = split(deps[image], clauses, / *, */)
      for (c = 1; c <= n; c++) {
        m = split(clauses[c], alts, / *\| */)
        want = 0
        got = ""
        for (a = 1; a <= m; a++) {
          name = alts[a]
          sub(/ .*/, "", name)
          if (name !~ /^linux-/ || substr(name, length(name) - length(kver)) != "-" kver) continue
          want = 1
          key = name
          if (match(alts[a], /\(= [^)]*\)/)) key = name "=" substr(alts[a], RSTART + 3, RLENGTH - 4)
          if (key in deb) { got = deb[key]; break }
        }
        if (want && got == "") exit 1
        if (got != "") print got
      }
    }' "$1" | awk '!seen[$0]++'
}

if [ -z "$kernel_version" ]; then
  # Reuse what the cache holds of the suite; ask the suite only when it holds none.
  kernel_version=$(for ready in "$cache"/kernels/*/ready; do
    [ -f "$ready" ] && basename "$(dirname "$ready")"
  done | grep -E "$kernel_pattern" | sort -V | tail -1 || true)
fi
kernel_index=""
case "$kernel_suite" in
  bookworm-backports)
    if [ -z "$kernel_version" ]; then
      [ "$apt_updated" -eq 1 ] || { apt-get update -qq || die "apt-get update failed"; apt_updated=1; }
      kernel_version=$(apt-cache depends linux-image-6.12-amd64 2>/dev/null |
        awk '/Depends: linux-image-6\.12/ {sub("linux-image-", "", $2); print $2; exit}')
      [ -n "$kernel_version" ] || die "bookworm-backports offers no linux-image-6.12-amd64 (is the suite in apt's sources?)"
    fi
    ;;
  trixie-backports)
    if [ -z "$kernel_version" ] || [ ! -f "$cache/kernels/$kernel_version/ready" ]; then
      kernel_index=$(mktemp -d "$cache/index.XXXXXX")
      trap 'rm -rf "$kernel_index"' EXIT
      suite_index "$kernel_index"
      if [ -z "$kernel_version" ]; then
        for candidate in $(suite_kernels "$kernel_index/Packages"); do
          if kernel_debs "$kernel_index/Packages" "$candidate" >/dev/null; then
            kernel_version=$candidate
            break
          fi
        done
        [ -n "$kernel_version" ] || die "$kernel_suite offers no complete linux-image-*-amd64"
      fi
    fi
    ;;
esac
kdir="$cache/kernels/$kernel_version"
if [ ! -f "$kdir/ready" ]; then
  echo "tests/vm: fetching kernel $kernel_version from $kernel_suite"
  tmp=$(mktemp -d "$cache/fetch.XXXXXX")
  trap 'rm -rf "$tmp" ${kernel_index:+"$kernel_index"}' EXIT
  mkdir "$tmp/debs"
  if [ -z "$kernel_index" ]; then
    (cd "$tmp/debs" && apt-get download "linux-image-$kernel_version" >/dev/null 2>&1) ||
      die "apt-get download linux-image-$kernel_version failed"
  else
    debs=$(kernel_debs "$kernel_index/Packages" "$kernel_version") ||
      die "$kernel_suite offers no complete linux-image-$kernel_version"
    mirror=$(apt_mirror)
    while read -r sha file; do
      deb="$tmp/debs/$(basename "$file")"
      download "$mirror/$file" "$deb" || die "cannot download $mirror/$file"
      [ "$(sha256sum <"$deb" | cut -d' ' -f1)" = "$sha" ] || die "$mirror/$file: wrong SHA256"
    done <<<"$debs"
  fi
  for deb in "$tmp"/debs/*.deb; do
    dpkg-deb -x "$deb" "$tmp/root" || die "dpkg-deb -x $(basename "$deb") failed"
  done
  # bookworm's kernels ship /boot/vmlinuz-VERSION and /lib/modules/VERSION; trixie's ship
  # /usr/lib/modules/VERSION, vmlinuz inside it in the split packages.
  moddir=""
  for dir in "$tmp/root/lib/modules/$kernel_version" "$tmp/root/usr/lib/modules/$kernel_version"; do
    [ -d "$dir/kernel" ] && moddir=$dir
  done
  [ -n "$moddir" ] || die "linux-image-$kernel_version holds no modules"
  vmlinuz=""
  for file in "$tmp/root/boot/vmlinuz-$kernel_version" "$moddir/vmlinuz"; do
    [ -f "$file" ] && vmlinuz=$file
  done
  [ -n "$vmlinuz" ] || die "linux-image-$kernel_version holds no vmlinuz"
  rm -rf "$kdir"
  mkdir -p "$kdir/lib/modules"
  mv "$vmlinuz" "$kdir/vmlinuz"
  mv "$moddir" "$kdir/lib/modules/$kernel_version"
  rm -rf "$tmp"
  depmod -b "$kdir" "$kernel_version" || die "depmod failed"
  touch "$kdir/ready"
fi
[ -z "$kernel_index" ] || rm -rf "$kernel_index"
trap - EXIT

# --- the initramfs: busybox and the modules that reach the host's root ---------------------
initrd="$kdir/initrd-$(sha256sum "$here/init" | cut -c1-12).cpio"
if [ ! -f "$initrd" ]; then
  echo "tests/vm: building the initramfs"
  tmp=$(mktemp -d "$cache/initrd.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
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
    name=$(printf '%02d-%s' "$n" "$(basename "$ko")")
    case "$ko" in
      *.ko.xz) xz -dc "$ko" >"$tmp/modules/${name%.xz}" ;;
      *.ko.zst) zstd -qdc "$ko" >"$tmp/modules/${name%.zst}" ;;
      *.ko.gz) gzip -dc "$ko" >"$tmp/modules/${name%.gz}" ;;
      *) cp "$ko" "$tmp/modules/$name" ;;
    esac
  done
  (cd "$tmp" && find . | cpio -o -H newc --quiet >"$initrd.part") || die "cpio failed"
  mv "$initrd.part" "$initrd"
  rm -rf "$tmp"
  trap - EXIT
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
