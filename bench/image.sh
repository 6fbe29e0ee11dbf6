#!/usr/bin/env bash
# bench/image.sh DIR: makes the bench image DIR/bench.img once (kept while
# DIR/bench.img.done exists). It is written by the kernel, so its
# directories are htree-indexed as on a real host: a copy of /usr/lib,
# /usr/share and /usr/include (>= 100k entries, ~4.5 GB), a directory of
# 100,000 empty files, and a 1 GiB file of random bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$1
img=$work/bench.img
[ -f "$img.done" ] && exit 0
mkdir -p "$work/rw"
tool=$work/benchtool
go build -o "$tool" ./bench/benchtool
echo "bench: making $img (once)" >&2
rm -f "$img"; truncate -s 12G "$img"
mkfs.ext4 -q -F -b 4096 -I 256 -O has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize "$img"
mount -o loop "$img" "$work/rw"
trap 'umount "$work/rw"' EXIT
mkdir "$work/rw/tree"
cp -a /usr/lib /usr/share /usr/include "$work/rw/tree/"
"$tool" mkdir-many "$work/rw/bigdir" 100000
head -c 1G /dev/urandom > "$work/rw/big.bin"
umount "$work/rw"
trap - EXIT
e2fsck -fn "$img" >/dev/null
touch "$img.done"
