#!/bin/bash
# sync-mirror.sh SOURCE DEST: bring an apt mirror at DEST (a directory on a
# leasefs export) up to date with SOURCE (an rsync source: a directory or
# rsync://host/debian/), and publish it to the guests in two steps, as
# Debian's ftpsync does:
#
#   1. copy what is new or changed; --delay-updates renames each changed
#      file into place at the very end, so the copy takes seconds, not the
#      whole transfer. Then publish: guests move to a generation with the
#      new indices and every file they name.
#   2. delete what the new indices no longer name, then publish again.
#
# Guests only see published generations, and the host agent publishes
# only when told (run it with --auto-publish off), so no guest ever sees
# the mirror half-synced. The environment names the agent:
#   LEASEFS_CONTROL (default unix:/run/leasefs/control.sock)
#   LEASEFS_EXPORT  (default mirror)
set -euo pipefail

if [ $# -ne 2 ]; then
	echo "usage: sync-mirror.sh SOURCE DEST" >&2
	exit 2
fi
src=${1%/}/ dest=${2%/}/
control=${LEASEFS_CONTROL:-unix:/run/leasefs/control.sock}
export=${LEASEFS_EXPORT:-mirror}
leasefs=${LEASEFS:-leasefs}

# --modify-window=-1: compare times to the nanosecond; by default rsync
# takes a file changed within the same second at the same size as unchanged.
rsync -a --modify-window=-1 --delay-updates "$src" "$dest"
"$leasefs" publish --control "$control" "$export"
rsync -a --modify-window=-1 --delete --existing --ignore-existing "$src" "$dest"
"$leasefs" publish --control "$control" "$export"
