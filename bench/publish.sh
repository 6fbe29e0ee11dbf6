#!/usr/bin/env bash
# bench/publish.sh: what a publish costs the host, on the bench image (a
# kernel-written copy of /usr, >= 200k inodes; bench/image.sh) loop-mounted
# read-write and exported by `leasefs host --auto-publish off`, as an
# operator runs it (expedited RCU on, the default).
#
# Each round starts the agent (its first publish is the full capture),
# then rewrites N of the small files under churn/ and runs `leasefs
# publish`, for N = 0, 10, 100, 1000; then once more with 100 changed, a
# full scan (--full-scan-every 5: the safety net's cost). It reads each
# freeze and its steps from the agent's "published" log lines, and the
# agent's RSS after the round. With LEASEFS_BEFORE, another build is run
# the same way, rounds alternating between the two.
#
# Prints a markdown table (also written to $LEASEFS_BENCH_DIR/publish-results.md).
# Environment: ROUNDS (5), LEASEFS (bin/leasefs), LEASEFS_BEFORE.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench-publish: needs root (mounts, FIFREEZE)" >&2; exit 1; }
for t in mkfs.ext4 python3 findmnt; do
  command -v $t >/dev/null || { echo "bench-publish: needs $t" >&2; exit 1; }
done

work=${LEASEFS_BENCH_DIR:-/var/tmp/leasefs-bench}
img=$work/bench.img
leasefs=${LEASEFS:-$(pwd)/bin/leasefs}
rounds=${ROUNDS:-5}
pub=$work/publish
bench/image.sh "$work"
mkdir -p "$pub/mnt"
out=$pub/samples
: > "$out"
builds=(after)
declare -A bin=([after]=$leasefs)
if [ -n "${LEASEFS_BEFORE:-}" ]; then builds=(before after); bin[before]=$LEASEFS_BEFORE; fi

host_pid=
cleanup() {
  if [ -n "$host_pid" ]; then kill "$host_pid" 2>/dev/null || true; wait "$host_pid" 2>/dev/null || true; fi
  umount "$pub/mnt" 2>/dev/null || true
}
trap cleanup EXIT

mount -o loop "$img" "$pub/mnt"
dev=$(findmnt -no SOURCE "$pub/mnt")
mkdir -p "$pub/mnt/churn"
for i in $(seq 0 999); do [ -f "$pub/mnt/churn/f$i" ] || echo "$i" > "$pub/mnt/churn/f$i"; done
sync
inodes=$(df --output=iused "$pub/mnt" | tail -1 | tr -d ' ')
echo "bench-publish: $inodes inodes in use; $(nproc) cores; $(uname -r)" >&2

# publish BUILD LABEL: one publish, its log line tagged with LABEL.
publish() {
  "${bin[$1]}" publish --control "unix:$pub/control.sock" usr > /dev/null
  echo "$1 $2 $(grep 'published:' "$pub/host.log" | tail -1)" >> "$out"
}

for ((r = 0; r < rounds; r++)); do
  for ((i = 0; i < ${#builds[@]}; i++)); do
    b=${builds[(i + r) % ${#builds[@]}]}
    rm -rf "$pub/state" "$pub/control.sock" "$pub/guest.sock"
    "${bin[$b]}" host --export "usr=$dev:$pub/mnt" --listen "unix:$pub/guest.sock" --control "unix:$pub/control.sock" \
      --state-dir "$pub/state" --auto-publish off --full-scan-every 5 > "$pub/host.out" 2> "$pub/host.log" &
    host_pid=$!
    for _ in $(seq 1200); do grep -q '^ready$' "$pub/host.out" && break; sleep 0.1; done
    grep -q '^ready$' "$pub/host.out" || { echo "bench-publish: host not ready" >&2; cat "$pub/host.log" >&2; exit 1; }
    echo "$b first $(grep 'published:' "$pub/host.log" | tail -1)" >> "$out"
    for n in 0 10 100 1000; do
      for ((f = 0; f < n; f++)); do echo "$r $n" > "$pub/mnt/churn/f$f"; done
      publish "$b" "$n"
    done
    for ((f = 0; f < 100; f++)); do echo "$r full" > "$pub/mnt/churn/f$f"; done
    publish "$b" full
    echo "$b rss $(awk '/^VmRSS/ { print $2 }' "/proc/$host_pid/status") $(awk '/^VmHWM/ { print $2 }' "/proc/$host_pid/status")" >> "$out"
    kill "$host_pid"; wait "$host_pid" 2>/dev/null || true
    host_pid=
  done
done

python3 - "$out" "$inodes" "${builds[@]}" <<'EOF' | tee "$work/publish-results.md"
import re, statistics, sys
path, inodes, builds = sys.argv[1], sys.argv[2], sys.argv[3:]
units = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1, "s": 1e3, "m": 6e4, "h": 3.6e6}
def dur(v):
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ns|µs|us|ms|s|m|h)", v))
rows, rss = {}, {}
for line in open(path):
    b, label, rest = line.split(" ", 2)
    if label == "rss":
        rss.setdefault(b, []).append([int(x) / 1024 for x in rest.split()])
        continue
    kv = dict(re.findall(r"(\w+)=(\S+)", rest))
    rows.setdefault((b, label), []).append(kv)
steps = ["sync", "precapture", "fifreeze", "scan", "fithaw", "merge"]
names = {"first": "first publish (full capture)", "0": "0 files changed", "10": "10 files changed",
         "100": "100 files changed", "1000": "1,000 files changed", "full": "full scan (safety net), 100 changed"}
print(f"{inodes} inodes in use; median (max) of each, in ms; steps are medians")
print()
print("| publish | build | freeze | " + " | ".join(steps) + " |")
print("| --- | --- | --- | " + " | ".join("---" for _ in steps) + " |")
for label in names:
    for b in builds:
        kvs = rows.get((b, label), [])
        if not kvs:
            continue
        fr = [dur(kv["frozen"]) for kv in kvs]
        cells = [f"{statistics.median([dur(kv[s]) for kv in kvs]):.1f}" if s in kvs[0] else "" for s in steps]
        print(f"| {names[label]} | {b} | {statistics.median(fr):.1f} ({max(fr):.1f}) | " + " | ".join(cells) + " |")
print()
for b in builds:
    r = rss.get(b, [])
    if r:
        print(f"host agent RSS after a round, {b}: median {statistics.median(x[0] for x in r):.0f} MiB, peak {max(x[1] for x in r):.0f} MiB")
EOF
