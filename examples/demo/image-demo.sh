#!/usr/bin/env bash
# The one-machine demo: build a small ext4 image, mount it with leasefs,
# show that it reads exactly what the kernel's own ext4 reads, unmount.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=bin/leasefs
[ -x "$bin" ] || { echo "demo: run 'make demo' (it builds $bin first)" >&2; exit 1; }
if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root for FUSE and the kernel's loop mount (try: sudo make demo)" >&2
  exit 1
fi

work=$(mktemp -d /tmp/leasefs-demo.XXXXXX)
mnt=$work/leasefs kmnt=$work/kernel
cleanup() {
  for d in "$mnt" "$kmnt"; do mountpoint -q "$d" 2>/dev/null && umount "$d" || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a small tree: a few documents, a symlink, a hard link, an xattr, 2,000 names in one directory"
mkdir -p "$work/src/docs" "$work/src/many" "$mnt" "$kmnt"
for i in 1 2 3; do printf 'Document %d\nwritten by the demo\n' "$i" > "$work/src/docs/doc$i.txt"; done
ln -s docs/doc1.txt "$work/src/latest"
ln "$work/src/docs/doc2.txt" "$work/src/docs/doc2-hardlink.txt"
setfattr -n user.origin -v demo "$work/src/docs/doc3.txt"
for i in $(seq 1 2000); do : > "$work/src/many/entry-$i"; done
head -c 8M /dev/urandom > "$work/src/random.bin"

step "an ext4 image of it (mkfs.ext4 -d, then e2fsck -D to index the big directory)"
truncate -s 64M "$work/demo.img"
mkfs.ext4 -q -F -O has_journal,extent,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize -d "$work/src" "$work/demo.img"
e2fsck -fyD "$work/demo.img" >/dev/null 2>&1 || [ $? -le 1 ]

step "leasefs mount --image demo.img (returns once the mount is ready)"
"$bin" mount --image "$work/demo.img" "$mnt"
grep " $mnt " /proc/mounts

step "a listing and a file, through leasefs"
ls -l "$mnt" "$mnt/docs"
cat "$mnt/latest"
getfattr -n user.origin "$mnt/docs/doc3.txt" 2>/dev/null | grep user

step "the same image through the kernel's ext4 (read-only loop mount)"
mount -o loop,ro "$work/demo.img" "$kmnt"
snap() { (cd "$1" && find . -printf '%p %y %m %U:%G %s %n %i %T@ %l\n' | sort && find . -type f -exec sha256sum {} + | sort -k2); }
if diff <(snap "$kmnt") <(snap "$mnt") >/dev/null; then
  echo "identical: $(find "$mnt" | wc -l) entries — names, types, modes, owners, sizes, links, inode numbers, times, targets and every byte"
else
  echo "DIFFERENT:"; diff <(snap "$kmnt") <(snap "$mnt") | head; exit 1
fi

step "writes are refused: the view is read-only"
touch "$mnt/new" 2>&1 || true

step "umount ends the server"
umount "$mnt"; umount "$kmnt"
sleep 0.2
pgrep -f "leasefs mount --foreground --image $work/demo.img" >/dev/null && { echo "server still running"; exit 1; }
echo "done: unmounted, server gone"
