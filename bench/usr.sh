#!/usr/bin/env bash
# bench/usr.sh: program starts from a shared /usr, as a VM booted from
# leasefs runs them: a Debian 13 /usr (python3, perl, git; built once by
# internal/vmtest/debian.sh split, cached in /var/cache/leasefs-vm) on a
# loop-mounted ext4, exported by `leasefs host`, and the same programs run
# in two chroots: one whose /usr is the host's ext4 itself (the kernel's),
# one whose /usr is a guest mount of the export (--device: data from the
# disk). Warm: each command runs once in each before timing, then RUNS
# times, alternating between the two. Prints the median of each, and the
# ratio, as a markdown table.
# Environment: RUNS (20), LEASEFS (bin/leasefs), GUEST_ARGS (extra flags
# for the guest, e.g. "--page-cache host").
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench/usr.sh: needs root (mounts, chroot)" >&2; exit 1; }
runs=${RUNS:-20}
leasefs=${LEASEFS:-$(pwd)/bin/leasefs}
cache=${LEASEFS_VM_CACHE:-/var/cache/leasefs-vm}
mkdir -p "$cache"
usrimg=$(internal/vmtest/debian.sh split trixie "$cache" | tail -1)
work=$(mktemp -d /var/tmp/leasefs-usr.XXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for m in lfs/usr lfs/dev lfs/proc native/usr native/dev native/proc guest export; do umount -l "$work/$m" 2>/dev/null || true; done
  sleep 0.5
  rm -rf "$work"
}
trap cleanup EXIT
cp --sparse=always "$usrimg" "$work/usr.img"
mkdir -p "$work/export" "$work/guest" "$work/state"
mount -o loop "$work/usr.img" "$work/export"
dev=$(findmnt -n -o SOURCE "$work/export")
"$leasefs" host --config "" --export "usr=$dev:$work/export" --listen "unix:$work/guest.sock" \
  --control "unix:$work/control.sock" --state-dir "$work/state" --auto-publish off >"$work/host.out" 2>"$work/host.log" &
pids+=($!)
until grep -q '^ready$' "$work/host.out"; do sleep 0.1; done
LEASEFS_RUN_DIR=$work/run "$leasefs" guest --connect "unix:$work/guest.sock" --export usr --device "$dev" ${GUEST_ARGS:-} \
  --log "$work/guest.log" "$work/guest"
for r in native lfs; do
  mkdir -p "$work/$r/usr" "$work/$r/dev" "$work/$r/proc" "$work/$r/etc" "$work/$r/tmp"
  for l in bin sbin lib lib64; do ln -s "usr/$l" "$work/$r/$l"; done
  cp /etc/passwd /etc/group "$work/$r/etc/"
  mount --bind /dev "$work/$r/dev"
  mount -t proc proc "$work/$r/proc"
done
mount --bind "$work/export" "$work/native/usr"
mount --bind "$work/guest" "$work/lfs/usr"
cmds=(
  "python3 -c 'import email, http.client, xml.dom.minidom'"
  "perl -e 1"
  "git --version"
  "for i in 1 2 3 4; do ls / >/dev/null; cat /etc/passwd >/dev/null; wc -l /etc/group >/dev/null; date >/dev/null; id >/dev/null; done"
)
names=("python3 import email, http.client, xml.dom.minidom" "perl -e 1" "git --version" "sh calling 20 coreutils")
ms() { local s=$(date +%s%N); chroot "$1" /bin/sh -c "$2" >/dev/null 2>&1; echo $(( ($(date +%s%N) - s) / 1000 )); }
median() { sort -n | awk '{a[NR]=$1} END {m=a[int((NR+1)/2)]; printf "%.1f", m/1000}'; }
echo "| program start (warm) | host ext4 (ms, median of $runs) | leasefs guest (ms) | ratio |"
echo "| --- | --- | --- | --- |"
for i in "${!cmds[@]}"; do
  c=${cmds[$i]}
  ms "$work/native" "$c" >/dev/null; ms "$work/lfs" "$c" >/dev/null
  : >"$work/a"; : >"$work/b"
  for _ in $(seq "$runs"); do
    ms "$work/native" "$c" >>"$work/a"
    ms "$work/lfs" "$c" >>"$work/b"
  done
  a=$(median <"$work/a"); b=$(median <"$work/b")
  echo "| ${names[$i]} | $a | $b | $(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", b/a}') |"
done
