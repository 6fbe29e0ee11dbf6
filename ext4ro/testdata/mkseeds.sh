#!/usr/bin/env bash
# Makes the small images the fuzz targets start from (seed-*.img.gz).
# Each holds an indexed directory, fast and slow symlinks, an xattr block,
# a sparse file whose extent tree has a leaf block, and a hard link.
set -euo pipefail
cd "$(dirname "$0")"
src=$(mktemp -d); trap 'rm -rf "$src"' EXIT
mkdir -p "$src/dir" "$src/small"
for i in $(seq 1 120); do : > "$src/dir/entry-with-a-longer-name-$i"; done
echo hello > "$src/small/a"
ln -s a "$src/small/fast"
ln -s "$(printf 'x%.0s' $(seq 1 80))" "$src/small/slow"
ln "$src/small/a" "$src/small/hardlink"
head -c 600 /dev/zero | tr '\0' v > "$src/xval"; setfattr -n user.big -v "$(cat "$src/xval")" "$src/small/a"; rm "$src/xval"
setfattr -n user.small -v 1 "$src/small/fast" 2>/dev/null || true
for i in 0 1 2 3 4 5 6; do printf 'chunk %d' "$i" | dd of="$src/small/sparse" bs=1 seek=$((i * 8192)) conv=notrunc status=none; done
mk() { # name fstype features...
  local out=$1 fs=$2; shift 2
  rm -f "$out"; truncate -s 512K "$out"
  E2FSPROGS_FAKE_TIME=1600000000 "mkfs.$fs" -q -F -b 1024 -N 160 "$@" -d "$src" "$out"
  e2fsck -fyD "$out" >/dev/null 2>&1 || [ $? -le 1 ]
  gzip -9nf "$out"
}
mk seed-ext4.img ext4 -O ^has_journal,extent,metadata_csum,64bit,dir_nlink,extra_isize -I 256
mk seed-inline.img ext4 -O ^has_journal,extent,metadata_csum,inline_data -I 512
mk seed-ext2.img ext2 -I 128
ls -l seed-*.img.gz
