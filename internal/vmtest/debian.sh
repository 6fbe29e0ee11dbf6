#!/usr/bin/env bash
# Fetches what the VM tests need from Debian, once, into a cache, and
# prints where it is:
#
#   debian.sh kernel RELEASE CACHE   Debian's cloud kernel of RELEASE (a
#                                    suite: bullseye, bookworm,
#                                    bookworm-backports), unpacked: prints
#                                    CACHE/RELEASE, holding vmlinuz and
#                                    lib/modules/VERSION
#   debian.sh vhost CACHE            rust-vmm's vhost-device-vsock, from
#                                    sid (it needs only libc6 >= 2.34):
#                                    prints the program's path
#   debian.sh root SUITE CACHE       a Debian root filesystem of SUITE
#                                    with systemd, made by mmdebstrap, as
#                                    an ext4 image: prints its path
#   debian.sh split SUITE CACHE      the same with python3 and perl, as two
#                                    ext4 images: the root without the
#                                    contents of /usr, and /usr: prints
#                                    their paths, one per line
#
# The machine's own apt lists are left alone: apt reads a private
# sources list and keeps its lists and downloads under CACHE.
set -euo pipefail

# download RELEASE PACKAGE DIR: PACKAGE's .deb from RELEASE into DIR,
# where PACKAGE may be a command printing the name given apt-cache's
# options.
download() {
  local release=$1 package=$2 apt=$3
  rm -rf "$apt"
  mkdir -p "$apt/lists/partial" "$apt/archives/partial"
  echo "deb http://deb.debian.org/debian $release main" >"$apt/sources.list"
  opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
    -o APT::Default-Release="$release" -o Debug::NoLocking=1)
  if ! apt-get "${opts[@]}" update -qq >"$apt/log" 2>&1; then
    echo "debian.sh: apt-get update for $release failed:" >&2; tail -5 "$apt/log" >&2; exit 1
  fi
  if [ "$package" = cloud-kernel ]; then
    # The metapackage names the current kernel; its image package holds
    # the kernel and its modules.
    package=$(apt-cache "${opts[@]}" depends linux-image-cloud-amd64 2>>"$apt/log" |
      sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\(-unsigned\)\?\)$/\1/p' | sort -V | tail -1)
    if [ -z "$package" ]; then
      echo "debian.sh: no cloud kernel image in $release" >&2; exit 1
    fi
  fi
  (cd "$apt" && apt-get "${opts[@]}" download -qq "$package" >>"$apt/log" 2>&1) || {
    echo "debian.sh: apt-get download $package from $release failed:" >&2; tail -5 "$apt/log" >&2; exit 1
  }
  echo "$package"
}

case ${1:-} in
kernel)
  release=$2 cache=$3
  out=$cache/$release
  if [ -e "$out/vmlinuz" ]; then echo "$out"; exit 0; fi
  apt=$cache/apt-$release
  rm -rf "$out.tmp" && mkdir -p "$out.tmp"
  image=$(download "$release" cloud-kernel "$apt")
  dpkg-deb -x "$apt"/"$image"_*.deb "$out.tmp/root"
  cp "$out.tmp"/root/boot/vmlinuz-* "$out.tmp/vmlinuz"
  mkdir -p "$out.tmp/lib"
  if [ -d "$out.tmp/root/lib/modules" ]; then mv "$out.tmp/root/lib/modules" "$out.tmp/lib/"; else mv "$out.tmp/root/usr/lib/modules" "$out.tmp/lib/"; fi
  # busybox insmod loads only plain .ko files.
  find "$out.tmp/lib/modules" -name '*.ko.xz' -exec xz -d {} +
  echo "$image" >"$out.tmp/package"
  rm -rf "$out.tmp/root" "$apt"
  mv "$out.tmp" "$out"
  echo "$out"
  ;;
vhost)
  cache=$2
  out=$cache/vhost-device-vsock
  if [ -x "$out/vhost-device-vsock" ]; then echo "$out/vhost-device-vsock"; exit 0; fi
  apt=$cache/apt-sid
  rm -rf "$out.tmp" && mkdir -p "$out.tmp"
  download sid vhost-device-vsock "$apt" >/dev/null
  dpkg-deb -x "$apt"/vhost-device-vsock_*.deb "$out.tmp/root"
  mv "$out.tmp/root/usr/bin/vhost-device-vsock" "$out.tmp/"
  rm -rf "$out.tmp/root" "$apt"
  mv "$out.tmp" "$out"
  echo "$out/vhost-device-vsock"
  ;;
root)
  suite=$2 cache=$3
  out=$cache/root-$suite.img
  if [ -e "$out" ]; then echo "$out"; exit 0; fi
  tmp=$cache/root-$suite.tmp
  rm -rf "$tmp" && mkdir -p "$tmp/tree"
  # No recommends: systemd as init, udev, and what the tests run in it.
  if ! mmdebstrap --variant=minbase --include=systemd-sysv,udev,util-linux,mount,procps,e2fsprogs,kmod \
    --customize-hook='echo leasefs-vm >"$1/etc/hostname"' \
    --customize-hook='ln -sf /dev/null "$1/etc/systemd/system/getty@tty1.service"' \
    "$suite" "$tmp/root.tar" http://deb.debian.org/debian >"$tmp/log" 2>&1; then
    echo "debian.sh: mmdebstrap $suite failed:" >&2; tail -5 "$tmp/log" >&2; exit 1
  fi
  tar -C "$tmp/tree" -xf "$tmp/root.tar"
  mkfs.ext4 -q -F -L root -d "$tmp/tree" "$tmp/root.img" 2G
  mv "$tmp/root.img" "$out"
  rm -rf "$tmp"
  echo "$out"
  ;;
split)
  suite=$2 cache=$3
  root=$cache/split-$suite-root.img usr=$cache/split-$suite-usr.img
  if [ -e "$root" ] && [ -e "$usr" ]; then printf '%s\n%s\n' "$root" "$usr"; exit 0; fi
  tmp=$cache/split-$suite.tmp
  rm -rf "$tmp" && mkdir -p "$tmp/tree"
  if ! mmdebstrap --variant=minbase --include=systemd-sysv,udev,util-linux,mount,procps,e2fsprogs,kmod,python3,perl,git \
    --customize-hook='echo leasefs-vm >"$1/etc/hostname"' \
    "$suite" "$tmp/root.tar" http://deb.debian.org/debian >"$tmp/log" 2>&1; then
    echo "debian.sh: mmdebstrap $suite failed:" >&2; tail -5 "$tmp/log" >&2; exit 1
  fi
  tar -C "$tmp/tree" -xf "$tmp/root.tar"
  mkfs.ext4 -q -F -L usr -d "$tmp/tree/usr" "$tmp/usr.img" 2G
  rm -rf "$tmp/tree/usr" && mkdir "$tmp/tree/usr"
  mkfs.ext4 -q -F -L root -d "$tmp/tree" "$tmp/root.img" 512M
  mv "$tmp/usr.img" "$usr" && mv "$tmp/root.img" "$root"
  rm -rf "$tmp"
  printf '%s\n%s\n' "$root" "$usr"
  ;;
*)
  echo "usage: debian.sh kernel RELEASE CACHE | debian.sh vhost CACHE | debian.sh root SUITE CACHE | debian.sh split SUITE CACHE" >&2; exit 2 ;;
esac
