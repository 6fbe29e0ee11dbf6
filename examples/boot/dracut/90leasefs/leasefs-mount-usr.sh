#!/bin/sh
# dracut pre-pivot hook: mounts /sysroot/usr from leasefs as the kernel
# command line's mount.usr=, mount.usrfstype=fuse.leasefs and
# mount.usrflags= say (see module-setup.sh).
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh
[ "$(getarg mount.usrfstype=)" = fuse.leasefs ] || return 0
usr=$(getarg mount.usr=)
flags=$(getarg mount.usrflags=)
modprobe -q fuse
modprobe -q vmw_vsock_virtio_transport
info "Mounting /usr from leasefs export $usr"
/usr/bin/leasefs mount-helper "$usr" "$NEWROOT/usr" -o "$flags" || die "leasefs: cannot mount /usr (export $usr, $flags)"
