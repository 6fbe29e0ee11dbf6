#!/usr/bin/env bash
# The one-machine demo of leasefs: a host agent publishes generations of an
# ext4 export that a writer keeps changing; two guest agents (one reading
# file data from the shared image, one through the host) follow them; a
# reader in a guest keeps a file open across its replacement. On a machine
# without VMs, a Unix socket stands in for vsock.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$PWD/bin/leasefs
[ -x "$bin" ] || { echo "demo: run 'make demo' (it builds $bin first)" >&2; exit 1; }
if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root for FUSE, the loop mount and freezing (try: sudo make demo)" >&2
  exit 1
fi

work=$(mktemp -d /var/tmp/leasefs-demo.XXXXXX)
export_dir=$work/export ga=$work/guest-a gb=$work/guest-b
host_pid=
cleanup() {
  set +e
  exec 7<&- 2>/dev/null
  for d in "$ga" "$gb"; do mountpoint -q "$d" 2>/dev/null && umount "$d"; done
  [ -n "$host_pid" ] && kill "$host_pid" 2>/dev/null && wait "$host_pid" 2>/dev/null
  mountpoint -q "$export_dir" 2>/dev/null && umount "$export_dir"
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
publish() { "$bin" publish --control "unix:$work/control.sock" "$@" mirror; }
sum() { sha256sum "$1" | cut -c1-16; }

step "the host's export: an ext4 image, loop-mounted read-write, holding a small package mirror"
mkdir -p "$export_dir" "$ga" "$gb" "$work/state"
truncate -s 256M "$work/export.img"
mkfs.ext4 -q -F -b 4096 -O has_journal,extent,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize "$work/export.img"
mount -o loop "$work/export.img" "$export_dir"
dev=$(findmnt -n -o SOURCE "$export_dir")
mkdir -p "$export_dir/dists/stable" "$export_dir/pool"
echo "Release: version 1" > "$export_dir/dists/stable/Release"
for i in $(seq 1 20); do head -c 200K /dev/urandom > "$export_dir/pool/pkg$i.deb"; done
head -c 16M /dev/urandom > "$export_dir/pool/big.deb"
echo "$dev mounted at $export_dir"

step "the host agent (leasefs host), serving on a Unix socket, publishing only when told"
"$bin" host --export "mirror=$dev:$export_dir" --listen "unix:$work/host.sock" \
  --control "unix:$work/control.sock" --state-dir "$work/state" --auto-publish off \
  >"$work/host.out" 2>"$work/host.log" &
host_pid=$!
for _ in $(seq 100); do grep -q '^ready' "$work/host.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^ready' "$work/host.out" || { echo "the host agent did not start:"; cat "$work/host.log"; exit 1; }
grep generation "$work/host.out"

step "two guests: A reads file data from the shared image, B through the host"
"$bin" guest --connect "unix:$work/host.sock" --export mirror --device "$work/export.img" "$ga"
"$bin" guest --connect "unix:$work/host.sock" --export mirror "$gb"
for g in "$ga" "$gb"; do echo "$(basename "$g"): $(cat "$g/dists/stable/Release"), $(ls "$g/pool" | wc -l) packages"; done

step "a reader in guest A opens pool/big.deb and keeps it open"
exec 7<"$ga/pool/big.deb"
old=$(sum "$export_dir/pool/big.deb")
echo "big.deb as opened: sha256 $old…"

for round in 2 3 4; do
  step "the writer syncs the mirror (atomic replaces, a new package), then publishes"
  echo "Release: version $round" > "$export_dir/dists/stable/Release.new"
  mv "$export_dir/dists/stable/Release.new" "$export_dir/dists/stable/Release"
  head -c 16M /dev/urandom > "$export_dir/pool/big.deb.new" && mv "$export_dir/pool/big.deb.new" "$export_dir/pool/big.deb"
  head -c 100K /dev/urandom > "$export_dir/pool/new$round.deb"
  echo "guest A before publishing: $(ls "$ga/pool" | wc -l) packages (nothing half-synced is visible)"
  publish --label "release-$round" # the upstream revision, shown by status on both sides
  sleep 0.3
  for g in "$ga" "$gb"; do
    echo "$(basename "$g"): $(cat "$g/dists/stable/Release"), $(ls "$g/pool" | wc -l) packages, big.deb $(sum "$g/pool/big.deb")…"
  done
done

step "the reader's open big.deb, replaced three times on the host since it was opened"
now=$(sha256sum <&7 | cut -c1-16)
echo "read through the open file: sha256 $now…  (as opened: $old…)"
[ "$now" = "$old" ] || { echo "DIFFERENT"; exit 1; }
exec 7<&-

step "leasefs status"
"$bin" status --control "unix:$work/control.sock"

step "writes from a guest are refused"
touch "$gb/pool/x" 2>&1 || true

step "cleaning up: guests unmounted, host agent stopped, export unmounted"
