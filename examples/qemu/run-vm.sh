#!/bin/bash
# Starts a QEMU/KVM guest that mounts the host's leasefs export "mirror".
# The export's device goes to the guest read-only and uncached on the
# host (cache=none: QEMU reads it with O_DIRECT, past the host's page
# cache); the guest reaches the host agent over vhost-vsock (the host is
# CID 2 to it). Run as root on the host, with the host agent running
# (leasefs-host.service, or 'leasefs host ... --listen vsock:5000').
set -euo pipefail

GUEST_CID=${GUEST_CID:-3}                       # unique per VM on this host
EXPORT_DEVICE=${EXPORT_DEVICE:-/dev/vg0/mirror} # --export mirror=DEVICE:MOUNTPOINT
ROOT_IMAGE=${ROOT_IMAGE:-/var/lib/vms/vm1.qcow2}
MEMORY=${MEMORY:-1024}

[ -e /dev/vhost-vsock ] || modprobe vhost_vsock || {
	echo "run-vm.sh: /dev/vhost-vsock is missing and the vhost_vsock module will not load" >&2
	exit 1
}

exec qemu-system-x86_64 \
	-machine q35,accel=kvm -cpu host -smp 2 -m "$MEMORY" \
	-nographic \
	-drive file="$ROOT_IMAGE",if=virtio,format=qcow2 \
	-drive file=${EXPORT_DEVICE},if=virtio,format=raw,readonly=on,cache=none \
	-device vhost-vsock-pci,guest-cid=${GUEST_CID} \
	-nic user,model=virtio-net-pci
