#!/usr/bin/env bash
# bench/live.sh: the live guest (leasefs host + leasefs guest --device, over a
# Unix socket) against the host's own kernel mount of the same filesystem,
# side by side in one run. Prints a markdown table (also written to
# $LEASEFS_BENCH_DIR/live-results.md).
#
#   - cold walk of the bench tree (find DIR -printf '%s %m\n'), each run on
#     a fresh guest mount after dropping the caches, interleaved with the
#     same walk on the host's mount and on a static mount of the same
#     device (leasefs mount: FUSE's own cost); the guest's RSS after it;
#   - warm walk (the same mount, walked once before);
#   - reading 1 GiB cold and warm, on the host and a guest in each
#     --page-cache mode, and how the page cache grows when N guests read
#     the same 256 MiB;
#   - guests idle on a small export (2,000 files): RSS of each of N; and
#     how long after a publish a new name is visible in all of 16 and 64.
#
# The bench image is bench/run.sh's (made once, kept in LEASEFS_BENCH_DIR,
# default /var/tmp/leasefs-bench): a kernel-written copy of /usr (>= 100k
# entries). It is mounted read-write here and exported by a host agent.
#
# Environment: RUNS_COLD (5), RUNS_WARM (5), GUESTS (16), WALKS_ONLY=1
# (the walks and nothing else), LEASEFS (the
# binary to measure, bin/leasefs), LEASEFS_BEFORE (another build, e.g. of
# an older commit, measured the same way in the same run, as "before"),
# LEASEFS_BEFORE_HOST=1 (its guests of the bench tree served by a host
# agent of that build too, beside this build's, on the same mount).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench-live: needs root (mounts)" >&2; exit 1; }
for t in mkfs.ext4 python3 find; do
  command -v $t >/dev/null || { echo "bench-live: needs $t" >&2; exit 1; }
done

work=${LEASEFS_BENCH_DIR:-/var/tmp/leasefs-bench}
img=$work/bench.img
leasefs=${LEASEFS:-$(pwd)/bin/leasefs}
before=${LEASEFS_BEFORE:-}
runs_cold=${RUNS_COLD:-5} runs_warm=${RUNS_WARM:-5} guests=${GUESTS:-16}
live=$work/live
bench/image.sh "$work"
mkdir -p "$live"
out=$live/times
: > "$out"

# The pids of what this script starts, one per line (command substitutions
# run in subshells, so an array would not see them).
pidfile=$live/pids
: > "$pidfile"
cleanup() {
  local m p
  for m in $(awk -v d="$live/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  while read -r p; do kill "$p" 2>/dev/null || true; done < "$pidfile"
  sleep 1
  for m in "$live/host" "$live/small-host"; do umount "$m" 2>/dev/null || true; done
}
trap cleanup EXIT

# start_host NAME IMG MOUNTPOINT: loop-mounts IMG read-write and exports it.
start_host() {
  local name=$1 image=$2 mnt=$3 dev
  mkdir -p "$mnt"
  mount -o loop "$image" "$mnt"
  dev=$(findmnt -no SOURCE "$mnt")
  run_host "$leasefs" "$name" "$name" "$dev" "$mnt"
  echo "$dev"
}

# run_host BINARY EXPORT NAME DEVICE MOUNTPOINT: a host agent exporting
# the mounted DEVICE as EXPORT, its sockets and state named NAME.
run_host() {
  local bin=$1 export=$2 name=$3 dev=$4 mnt=$5
  mkdir -p "$live/$name-state"
  "$bin" host --export "$export=$dev:$mnt" --listen "unix:$live/$name.sock" --control "unix:$live/$name-control.sock" \
    --state-dir "$live/$name-state" --auto-publish off --max-conns-per-guest 1024 --max-sessions-per-guest 1024 > "$live/$name-host.out" 2> "$live/$name-host.log" &
  echo $! >> "$pidfile"
  echo $! > "$live/$name-host.pid"
  for _ in $(seq 600); do grep -q '^ready$' "$live/$name-host.out" && break; sleep 0.1; done
  grep -q '^ready$' "$live/$name-host.out" || { echo "bench-live: host $name not ready" >&2; cat "$live/$name-host.log" >&2; exit 1; }
}

# guest BINARY EXPORT DEVICE DIR: mounts a guest in the foreground (in the
# background of this script) and prints its pid once it is mounted. With
# LEASEFS_BEFORE_HOST=1 the before build's guests of the bench export
# talk to a host agent of their own build.
guest() {
  local bin=$1 export=$2 device=$3 dir=$4 sock=$2
  shift 4
  [ "$bin" = "$before" ] && [ "$export" = bench ] && [ "${LEASEFS_BEFORE_HOST:-0}" = 1 ] && sock=bench-before
  mkdir -p "$dir"
  LEASEFS_RUN_DIR=$live/run "$bin" guest --foreground --connect "unix:$live/$sock.sock" --export "$export" \
    ${device:+--device "$device"} "$@" "$dir" > /dev/null 2>> "$live/guests.log" &
  local pid=$!
  echo "$pid" >> "$pidfile"
  for _ in $(seq 200); do mountpoint -q "$dir" && break; sleep 0.05; done
  mountpoint -q "$dir" || { echo "bench-live: guest at $dir did not mount" >&2; tail "$live/guests.log" >&2; exit 1; }
  echo "$pid"
}

stop_guest() { umount "$1"; wait "$2" 2>/dev/null || true; }

rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

walk() { find "$1" -printf '%s %m\n' > /dev/null; }

timed() { # timed LABEL COMMAND...: appends "LABEL microseconds" to $out
  local label=$1; shift
  local t0 t1
  t0=$(date +%s%N); "$@"; t1=$(date +%s%N)
  echo "$label $(( (t1 - t0) / 1000 ))" >> "$out"
}

dev=$(start_host bench "$img" "$live/host")
if [ -n "$before" ] && [ "${LEASEFS_BEFORE_HOST:-0}" = 1 ]; then
  run_host "$before" bench bench-before "$dev" "$live/host"
fi
builds=(after)
declare -A bin=([after]=$leasefs)
if [ -n "$before" ]; then builds=(before after); bin[before]=$before; fi
entries=$(find "$live/host/tree" | wc -l)
echo "bench-live: tree of $entries entries; $(nproc) cores; $(uname -r)" >&2

# Cold walks, interleaved: kernel, the static mount of the same device
# (leasefs mount: the same FUSE server and reader, no host: what FUSE
# itself costs), then each build, rotating the order.
for ((r = 0; r < runs_cold; r++)); do
  order=(kernel static "${builds[@]}")
  for ((i = 0; i < ${#order[@]}; i++)); do
    who=${order[(i + r) % ${#order[@]}]}
    sync; echo 3 > /proc/sys/vm/drop_caches
    if [ "$who" = kernel ]; then
      timed walk-cold-kernel walk "$live/host/tree"
    elif [ "$who" = static ]; then
      mkdir -p "$live/g-static"
      "$leasefs" mount --allow-dirty-journal --image "$dev" "$live/g-static"
      timed walk-cold-static walk "$live/g-static/tree"
      umount "$live/g-static"
    else
      pid=$(guest "${bin[$who]}" bench "$dev" "$live/g-$who")
      timed "walk-cold-$who" walk "$live/g-$who/tree"
      echo "rss-walk-$who $(rss_kib "$pid")" >> "$out"
      stop_guest "$live/g-$who" "$pid"
    fi
    echo "  cold $who: $(grep "^walk-cold-$who " "$out" | tail -1)" >&2
  done
done

# The host agents' RSS, once their guests have walked everything.
echo "rss-host-after $(rss_kib "$(cat "$live/bench-host.pid")")" >> "$out"
[ -f "$live/bench-before-host.pid" ] && echo "rss-host-before $(rss_kib "$(cat "$live/bench-before-host.pid")")" >> "$out"

# Warm walks: each mount walked once, then timed in interleaved rounds.
declare -A wdir=([kernel]=$live/host/tree) wpid=()
for who in "${builds[@]}"; do
  wpid[$who]=$(guest "${bin[$who]}" bench "$dev" "$live/g-$who"); wdir[$who]=$live/g-$who/tree
done
for who in kernel "${builds[@]}"; do walk "${wdir[$who]}"; done
for ((r = 0; r < runs_warm; r++)); do
  order=(kernel "${builds[@]}")
  for ((i = 0; i < ${#order[@]}; i++)); do
    who=${order[(i + r) % ${#order[@]}]}
    timed "walk-warm-$who" walk "${wdir[$who]}"
    echo "  warm $who: $(tail -1 "$out")" >&2
  done
done
for who in "${builds[@]}"; do stop_guest "$live/g-$who" "${wpid[$who]}"; done

# WALKS_ONLY=1: the walks are all this run measures.
if [ "${WALKS_ONLY:-0}" != 1 ]; then

# Reading 1 GiB (big.bin): cold (fresh mounts, caches dropped) and warm
# (read again), on the host's mount and on a guest in each page-cache
# mode. Then 16 guests each read the same 256 MiB: how much the page
# cache grows, in each mode.
tool=$work/benchtool
go build -o "$tool" ./bench/benchtool
readbig() { dd if="$1/big.bin" of=/dev/null bs=1M count="${2:-1024}" status=none; }
cached_kib() { awk '/^Cached:/ { print $2 }' /proc/meminfo; }
for ((r = 0; r < runs_cold; r++)); do
  for who in kernel guest host; do
    sync; echo 3 > /proc/sys/vm/drop_caches
    if [ "$who" = kernel ]; then
      timed read-cold-kernel readbig "$live/host"; timed read-warm-kernel readbig "$live/host"
    else
      pid=$(guest "$leasefs" bench "$dev" "$live/r-$who" --page-cache "$who")
      timed "read-cold-$who" readbig "$live/r-$who"; timed "read-warm-$who" readbig "$live/r-$who"
      stop_guest "$live/r-$who" "$pid"
    fi
    echo "  read $who: $(tail -2 "$out" | tr '\n' ' ')" >&2
  done
done
for mode in guest host; do
  sync; echo 3 > /proc/sys/vm/drop_caches
  gp=()
  for g in $(seq 1 "$guests"); do gp+=("$(guest "$leasefs" bench "$dev" "$live/m-$mode-$g" --page-cache "$mode")"); done
  before=$(cached_kib)
  for g in $(seq 1 "$guests"); do readbig "$live/m-$mode-$g" 256; done
  echo "cache-growth-$mode $(( $(cached_kib) - before ))" >> "$out"
  echo "  $guests guests, --page-cache=$mode: page cache +$(( ($(cached_kib) - before) / 1024 )) MiB" >&2
  for g in $(seq 1 "$guests"); do stop_guest "$live/m-$mode-$g" "${gp[$((g - 1))]}"; done
done

# Guests on a small export: idle memory, and how long after a publish a
# new name is visible in all of them (16, then 64).
small=$live/small.img
if [ ! -f "$small.done" ]; then
  rm -f "$small"; mkdir -p "$live/small-src"
  for d in $(seq 0 19); do
    mkdir -p "$live/small-src/d$d"
    for f in $(seq 0 99); do echo "file $d/$f" > "$live/small-src/d$d/f$f"; done
  done
  mkfs.ext4 -q -F -b 4096 -d "$live/small-src" "$small" 256M
  touch "$small.done"
fi
small_dev=$(start_host small "$small" "$live/small-host")
for who in "${builds[@]}"; do
  gp=()
  for g in $(seq 1 "$guests"); do
    gp+=("$(guest "${bin[$who]}" small "$small_dev" "$live/s-$who-$g")")
    ls -lR "$live/s-$who-$g" > /dev/null
  done
  sleep 5
  for g in $(seq 1 "$guests"); do
    echo "rss-idle-small-$who $(rss_kib "${gp[$((g - 1))]}")" >> "$out"
    stop_guest "$live/s-$who-$g" "${gp[$((g - 1))]}"
  done
done
publish_visible() { # publish_visible N DIRS...: a new name in all of them
  local n=$1; shift
  for i in $(seq 1 5); do
    echo x > "$live/small-host/new-$n-$i"
    "$leasefs" publish --control "unix:$live/small-control.sock" small > /dev/null
    echo "visible-$n $("$tool" visible "new-$n-$i" "$@" | awk '{ printf "%d", $1 * 1000 }')" >> "$out"
  done
}
vp=() vd=()
for n in 16 64; do
  while [ ${#vd[@]} -lt "$n" ]; do
    d=$live/v-${#vd[@]}; vd+=("$d"); vp+=("$(guest "$leasefs" small "$small_dev" "$d")")
  done
  publish_visible "$n" "${vd[@]}"
  echo "  publish to visible in $n guests: $(grep "^visible-$n " "$out" | awk '{ print $2 / 1000 }' | tr '\n' ' ')ms" >&2
done
for i in "${!vd[@]}"; do stop_guest "${vd[$i]}" "${vp[$i]}"; done
fi

python3 - "$out" "$entries" "$guests" "${builds[@]}" <<'EOF' | tee "$work/live-results.md"
import statistics, sys
path, entries, guests, builds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
v = {}
for line in open(path):
    k, n = line.split()
    v.setdefault(k, []).append(int(n))
med = lambda k: statistics.median(v[k])
rng = lambda k, div, unit: f"{min(v[k]) / div:.2f}–{max(v[k]) / div:.2f} {unit}"
print(f"| {entries:,} entries | " + " | ".join(["host kernel"] + [f"guest ({b})" for b in builds]) + " |")
print("| --- |" + " ---: |" * (1 + len(builds)))
# A guest's walk against the kernel's of the same round: the rounds
# interleave, so the disk cache's drift between rounds (2-4x on this VM)
# cancels in each ratio; their spread is what two runs must agree within.
for kind in ("cold", "warm"):
    k = med(f"walk-{kind}-kernel")
    cells = [f"{k / 1e6:.2f} s ({rng(f'walk-{kind}-kernel', 1e6, 's')})"]
    for b in builds:
        g = med(f"walk-{kind}-{b}")
        ratios = sorted(x / y for x, y in zip(v[f"walk-{kind}-{b}"], v[f"walk-{kind}-kernel"]))
        cells.append(f"{g / 1e6:.2f} s; {statistics.median(ratios):.2f}× the kernel (rounds {ratios[0]:.2f}–{ratios[-1]:.2f}×)")
    print(f"| {kind} walk, median of {len(v[f'walk-{kind}-kernel'])} | " + " | ".join(cells) + " |")
if "walk-cold-static" in v:
    ratios = sorted(x / y for x, y in zip(v["walk-cold-static"], v["walk-cold-kernel"]))
    print(f"| cold walk of the static mount (`leasefs mount`, no host), median | – | " +
          f"{med('walk-cold-static') / 1e6:.2f} s; {statistics.median(ratios):.2f}× the kernel (rounds {ratios[0]:.2f}–{ratios[-1]:.2f}×) |" +
          " |" * (len(builds) - 1))
print("| guest RSS after a cold walk | – | " + " | ".join(f"{med(f'rss-walk-{b}') / 1024:.0f} MiB" for b in builds) + " |")
print("| host agent RSS after the cold walks | – | " + " | ".join(f"{med(f'rss-host-{b}') / 1024:.0f} MiB" if f"rss-host-{b}" in v else "(the same agent)" for b in builds) + " |")
if "read-cold-kernel" not in v:
    sys.exit(0)  # WALKS_ONLY
print(f"| RSS of each of {guests} guests idle on 2,000 files | – | " +
      " | ".join(f"{med(f'rss-idle-small-{b}') / 1024:.1f} MiB (max {max(v[f'rss-idle-small-{b}']) / 1024:.1f})" for b in builds) + " |")
print()
print("| reading 1 GiB (dd bs=1M) | host kernel | guest, --page-cache=guest | guest, --page-cache=host |")
print("| --- | ---: | ---: | ---: |")
for kind in ("cold", "warm"):
    cells = [f"{1024 / (med(f'read-{kind}-{w}') / 1e6):.0f} MiB/s" for w in ("kernel", "guest", "host")]
    print(f"| {kind}, median | " + " | ".join(cells) + " |")
print(f"| page cache growth, {guests} guests reading the same 256 MiB | – | " +
      " | ".join(f"{med(f'cache-growth-{m}') / 1024:.0f} MiB" for m in ("guest", "host")) + " |")
print()
print("| publish → a new name visible in every guest | median | max |")
print("| --- | ---: | ---: |")
for n in (16, 64):
    print(f"| {n} guests | {med(f'visible-{n}') / 1000:.1f} ms | {max(v[f'visible-{n}']) / 1000:.1f} ms |")
EOF
