#!/usr/bin/env bash
# bench/run.sh: leasefs against the kernel's ext4 and fuse2fs, side by side
# in one run, on the same image. Prints a markdown table of medians and
# ratios (and writes it to $LEASEFS_BENCH_DIR/results.md).
#
# The image is bench/image.sh's (made once and kept in LEASEFS_BENCH_DIR,
# default /var/tmp/leasefs-bench).
#
# Environment: RUNS_COLD (default 5), RUNS_WARM (5), ONLY (a regexp of
# workload names to run).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench: needs root (mounts)" >&2; exit 1; }
for t in hyperfine fuse2fs mkfs.ext4 python3; do
  command -v $t >/dev/null || { echo "bench: needs $t (make bench installs it)" >&2; exit 1; }
done

work=${LEASEFS_BENCH_DIR:-/var/tmp/leasefs-bench}
img=$work/bench.img
tool=$work/benchtool
leasefs=$(pwd)/bin/leasefs
runs_cold=${RUNS_COLD:-5} runs_warm=${RUNS_WARM:-5} only=${ONLY:-.}
mkdir -p "$work/json" "$work/m/kernel" "$work/m/fuse2fs" "$work/m/leasefs"
go build -o "$tool" ./bench/benchtool

bench/image.sh "$work"

mounted() { mountpoint -q "$1"; }
umount_all() { local m; for m in kernel fuse2fs leasefs; do mounted "$work/m/$m" && umount "$work/m/$m"; done; return 0; }
mount_all() {
  mount -o loop,ro "$img" "$work/m/kernel"
  fuse2fs -o ro,allow_other "$img" "$work/m/fuse2fs" >/dev/null
  "$leasefs" mount --image "$img" "$work/m/leasefs"
}
cold() { umount_all; mount_all; sync; echo 3 > /proc/sys/vm/drop_caches; }
trap umount_all EXIT

umount_all; mount_all
entries=$("$tool" walk "$work/m/kernel/tree" 2>&1 | cut -d' ' -f1)
echo "bench: tree of $entries entries; $(nproc) cores; $(uname -r)" >&2

# bench NAME cold|warm 'COMMAND with @ for the mount point'
#
# Cold runs are interleaved: each round remounts everything, drops the
# caches and times one run on each filesystem, rotating the order. On a
# VM the host's cache of the virtual disk drifts from minute to minute;
# interleaving lets all three see the same drift. Warm runs go through
# hyperfine.
bench() {
  local name=$1 mode=$2 cmd=$3
  [[ $name =~ $only ]] || return 0
  echo "bench: $name" >&2
  if [ "$mode" = warm ]; then
    hyperfine -N --runs "$runs_warm" --warmup 1 --export-json "$work/json/$name.json" --style basic \
      -n kernel "${cmd//@/$work/m/kernel}" -n fuse2fs "${cmd//@/$work/m/fuse2fs}" -n leasefs "${cmd//@/$work/m/leasefs}" >&2
    return
  fi
  local order=(kernel fuse2fs leasefs) out="$work/json/$name.times"
  : > "$out"
  for ((r = 0; r < runs_cold; r++)); do
    for ((i = 0; i < 3; i++)); do
      local m=${order[(i + r) % 3]}
      cold
      local t0 t1
      t0=$(date +%s%N)
      bash -c "${cmd//@/$work/m/$m}" >/dev/null
      t1=$(date +%s%N)
      echo "$m $(( (t1 - t0) / 1000 ))" >> "$out"
      echo "  $m: $(( (t1 - t0) / 1000000 )) ms" >&2
    done
  done
}
bench walk-cold cold "$tool walk @/tree"
bench walk-warm warm "$tool walk @/tree"
bench ls-f-100k-cold cold "ls -f @/bigdir"
bench stat-1000-in-100k-cold cold "$tool stat @/bigdir 1000 1"
bench seq-read-1g-cold cold "dd if=@/big.bin of=/dev/null bs=1M status=none"
bench seq-read-1g-warm warm "dd if=@/big.bin of=/dev/null bs=1M status=none"
bench rand-read-20k-cold cold "$tool randread @/big.bin 20000 1"
bench tar-tree-cold cold "tar -C @ -cf - tree | cat"

# Peak RSS of the leasefs server across one more cold read of the whole tree.
rss=
if [[ tar-rss =~ $only ]]; then
  cold
  tar -C "$work/m/leasefs" -cf - tree | cat >/dev/null
  pid=$(pgrep -f "^$leasefs mount --foreground --image $img" | head -1)
  rss=$("$tool" peakrss "$pid")
fi

python3 - "$work/json" "$rss" <<'EOF' | tee "$work/results.md"
import json, os, statistics, sys
d, rss = sys.argv[1], sys.argv[2]
print("| workload | kernel | fuse2fs | leasefs | leasefs / kernel | fuse2fs / leasefs | runs |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for f in sorted(os.listdir(d), key=lambda n: os.path.getmtime(os.path.join(d, n))):
    p = os.path.join(d, f)
    if f.endswith(".json"):
        res = json.load(open(p))["results"]
        r = {x["command"]: x["median"] for x in res}
        runs = len(res[0]["times"])
    else:
        t = {}
        for line in open(p):
            fs, us = line.split()
            t.setdefault(fs, []).append(int(us) / 1e6)
        r = {fs: statistics.median(v) for fs, v in t.items()}
        runs = len(t["kernel"])
    name = f.rsplit(".", 1)[0]
    k, f2, l = r["kernel"], r["fuse2fs"], r["leasefs"]
    fmt = lambda s: f"{s:.3f} s"
    if name.startswith("seq-read"):
        fmt = lambda s: f"{1024 / s:.0f} MiB/s"
        ratio = f"{k / l:.2f}× throughput"
    else:
        ratio = f"{l / k:.2f}× time"
    print(f"| {name} | {fmt(k)} | {fmt(f2)} | {fmt(l)} | {ratio} | {f2 / l:.1f}× | {runs} |")
if rss:
    print(f"\nleasefs peak RSS reading the whole tree (tar, cold): {rss} MiB")
EOF
