#!/usr/bin/env bash
# Installs the Debian packages leasefs's tests, demo and benchmarks need,
# when they are missing. Usage: scripts/deps.sh [test|demo|bench]
set -euo pipefail

want=(e2fsprogs fuse3 attr)
# The examples' tests: unit files, the mount helper, an apt mirror; the
# guest-kernel tests: QEMU, a static busybox for the VM, xz for modules.
# mmdebstrap builds the Debian root the systemd VM test boots.
test_extra=(systemd util-linux rsync apt-utils dpkg-dev qemu-system-x86 busybox-static xz-utils mmdebstrap)
case "${1:-test}" in
  test) want+=("${test_extra[@]}") ;;
  demo) ;;
  bench) want+=(fuse2fs hyperfine) ;;
  *) echo "usage: $0 [test|demo|bench]" >&2; exit 2 ;;
esac


missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
  echo "leasefs: missing packages: ${missing[*]}; this is not a Debian-like system, install them by hand" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "leasefs: missing packages: ${missing[*]}; run as root (sudo make …) so they can be installed, or install them yourself" >&2
  exit 1
fi
echo "leasefs: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/tmp/leasefs-apt.log 2>&1; then
  echo "leasefs: could not install ${missing[*]}; see /tmp/leasefs-apt.log" >&2
  exit 1
fi
