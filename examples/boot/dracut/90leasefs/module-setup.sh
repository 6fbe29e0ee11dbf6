#!/bin/bash
# dracut module: /usr (or another filesystem the system runs from)
# mounted from leasefs before the switch to the real root. Install the
# directory as /usr/lib/dracut/modules.d/90leasefs, then
# dracut --add leasefs -f. The kernel command line says what to mount, as
# systemd reads it: mount.usr=EXPORT mount.usrfstype=fuse.leasefs
# mount.usrflags=connect=vsock:2:5000,device=/dev/vdb,storage-daemon
# (docs/operations.md, "Booting from leasefs").

check() { require_binaries leasefs || return 1; return 255; }

depends() { echo base; }

installkernel() { hostonly='' instmods fuse vsock vmw_vsock_virtio_transport virtio_blk virtio_pci; }

install() {
	inst_binary "$(command -v leasefs)" /usr/bin/leasefs
	ln_r /usr/bin/leasefs /usr/sbin/mount.fuse.leasefs
	# After the root is mounted at /sysroot, before the switch.
	inst_hook pre-pivot 50 "$moddir/leasefs-mount-usr.sh"
}
