#!/usr/bin/env bash
# Fetches Debian's cloud kernel of one release and unpacks it, once, into
# the cache: kernel.sh RELEASE CACHE prints CACHE/RELEASE, which then
# holds vmlinuz and lib/modules/VERSION. RELEASE is a Debian suite
# (bullseye, bookworm, bookworm-backports). The machine's own apt lists
# are left alone: apt reads a private sources list and keeps its lists
# and downloads under CACHE.
set -euo pipefail
release=$1 cache=$2
out=$cache/$release
if [ -e "$out/vmlinuz" ]; then echo "$out"; exit 0; fi

apt=$cache/apt-$release
rm -rf "$apt" "$out.tmp"
mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$out.tmp"
echo "deb http://deb.debian.org/debian $release main" >"$apt/sources.list"
opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
  -o APT::Default-Release="$release" -o Debug::NoLocking=1)
if ! apt-get "${opts[@]}" update -qq >"$apt/log" 2>&1; then
  echo "kernel.sh: apt-get update for $release failed:" >&2; tail -5 "$apt/log" >&2; exit 1
fi
# The metapackage names the current kernel; its image package holds the
# kernel and its modules.
image=$(apt-cache "${opts[@]}" depends linux-image-cloud-amd64 2>>"$apt/log" |
  sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\(-unsigned\)\?\)$/\1/p' | sort -V | tail -1)
if [ -z "$image" ]; then
  echo "kernel.sh: no cloud kernel image in $release" >&2; exit 1
fi
(cd "$apt" && apt-get "${opts[@]}" download -qq "$image" >>"$apt/log" 2>&1) || {
  echo "kernel.sh: apt-get download $image failed:" >&2; tail -5 "$apt/log" >&2; exit 1
}
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
