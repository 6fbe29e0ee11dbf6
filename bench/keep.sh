#!/usr/bin/env bash
# bench/keep.sh: the kernel memory the host agent pins to keep the
# generations guests are on whole (--keep-files): an ext4 of FILES small
# files (9000 by default: this machine allows a process 20,000
# descriptors, and the keeper takes at most half) is exported by
# `leasefs host`, once keeping its files and once not (--keep-files 0),
# ROUNDS times, alternating. After the first publish the caches are
# dropped: what slab memory is left is what the agent's descriptors pin.
# Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench/keep.sh: needs root (mounts, FIFREEZE)" >&2; exit 1; }
files=${FILES:-9000}
rounds=${ROUNDS:-3}
leasefs=${LEASEFS:-$(pwd)/bin/leasefs}
work=$(mktemp -d /var/tmp/leasefs-keep.XXXX)
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  umount "$work/mnt" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
truncate -s 1G "$work/img"
mkfs.ext4 -q -N $((files + 20000)) "$work/img"
mkdir -p "$work/mnt" "$work/state"
mount -o loop "$work/img" "$work/mnt"
dev=$(findmnt -n -o SOURCE "$work/mnt")
python3 - "$work/mnt" "$files" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, "d%03d" % (i // 1000))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%04d" % (i % 1000)), "w") as f:
        f.write("x" * (i % 300))
PY
slab() { awk '/^Slab:/ {print $2}' /proc/meminfo; }
settle() { sync; echo 3 >/proc/sys/vm/drop_caches; sleep 1; }
echo "| run | --keep-files | files kept | slab after the first publish, caches dropped (KiB) | first publish |"
echo "| --- | --- | --- | --- | --- |"
for r in $(seq "$rounds"); do
  for keep in 0 262144; do
    settle
    base=$(slab)
    start=$(date +%s%N)
    "$leasefs" host --config "" --export "bench=$dev:$work/mnt" --listen "unix:$work/guest.sock" \
      --control "unix:$work/control.sock" --state-dir "$work/state" --auto-publish off --keep-files "$keep" \
      >"$work/out" 2>"$work/log" &
    pid=$!
    until grep -q '^ready$' "$work/out"; do kill -0 $pid || { cat "$work/log"; exit 1; }; sleep 0.1; done
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    kept=$("$leasefs" status --json --control "unix:$work/control.sock" | python3 -c 'import json,sys; print(json.load(sys.stdin)["exports"][0]["kept_files"])')
    settle
    now=$(slab)
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
    echo "| $r | $keep | $kept | $((now - base)) | ${ms} ms (start to ready) |"
  done
done
