#!/bin/bash
# Boots a VM whose vsock device is rust-vmm's vhost-device-vsock, a
# vhost-user backend that speaks Firecracker's hybrid-vsock convention on
# the host: the VM's connection to CID 2 port P arrives on the Unix socket
# UDS_PATH_P, where 'leasefs host --listen hvsock-dir:DIR:P' (UDS_PATH in
# DIR) or '--listen hvsock:UDS_PATH:P' serves it. No /dev/vhost-vsock, no
# KVM needed. Start the backend first, one per VM:
#
#   vhost-device-vsock --guest-cid 3 --socket /run/vhost/vm3.sock \
#       --uds-path /run/leasefs-vms/vm3.vsock &
#   VHOST=/run/vhost/vm3.sock KERNEL=vmlinuz INITRD=initrd.img \
#       IMAGE=/dev/vg0/mirror ./vhost-vm.sh
#
# IMAGE is the export's disk, attached read-only: the guest's --device
# (/dev/vda here). CACHE=none (the default) reads it with O_DIRECT, past
# the host's page cache; CACHE=writeback shares the host's page cache
# among the VMs. MONITOR=PATH puts QEMU's monitor on a Unix socket
# (stop, cont, quit). ACCEL=kvm where KVM works; TCG otherwise.
# ROOT=root.img adds a root disk, read-write, as the first drive (vda):
# the export's disk is then vdb. APPEND adds to the kernel command line
# (mount.usr= and friends to boot with /usr from leasefs: see
# docs/operations.md, "Booting from leasefs").
#
# VHOST=none boots a VM with no vsock device, whose memory is then
# private (vhost-user needs it shared): for comparisons, for KSM.
#
# Snapshots: QEMU will not save a VM with a vhost-user vsock device, so
# HOTPLUG=1 puts it on a PCIe root port, from which the monitor can
# unplug it before a save and plug a new one after a restore:
#
#   (qemu) device_del vsock0
#   (qemu) migrate "exec:cat > vm.snap"
#
# and INCOMING=vm.snap (with HOTPLUG=1, and VHOST empty: no device)
# restores one copy, paused; then, with a new vhost-device-vsock each:
#
#   (qemu) chardev-add socket,id=vsock1,path=/run/vhost/copy1.sock
#   (qemu) device_add vhost-user-vsock-pci,chardev=vsock1,id=vsock1,bus=rp0
#   (qemu) cont
#
# The guest sees its vsock transport go and a new one come, as on a
# Firecracker snapshot's restore.
set -euo pipefail
: "${KERNEL:?KERNEL=path to a vmlinuz}" "${INITRD:?INITRD=path to an initramfs}" "${IMAGE:?IMAGE=the disk of the export}"
[ -n "${VHOST:-}" ] || [ -n "${INCOMING:-}" ] || { echo "vhost-vm.sh: VHOST=the vhost-user socket of the VM's vhost-device-vsock" >&2; exit 2; }
memory=${MEMORY:-512}
# vhost-user needs the guest's memory shared with the backend: a memfd.
mem=(-m "$memory" -object memory-backend-memfd,id=mem,size="${memory}M",share=on -numa node,memdev=mem)
vsock=()
if [ "${VHOST:-}" = none ]; then
	mem=(-m "$memory")
elif [ "${HOTPLUG:-}" = 1 ]; then
	vsock=(-device pcie-root-port,id=rp0,chassis=1,slot=1)
	[ -z "${VHOST:-}" ] || vsock+=(-chardev socket,id=vsock0,path="$VHOST" -device vhost-user-vsock-pci,chardev=vsock0,id=vsock0,bus=rp0)
else
	vsock=(-chardev socket,id=vsock0,path="$VHOST" -device vhost-user-vsock-pci,chardev=vsock0,id=vsock0)
fi
incoming=()
[ -z "${INCOMING:-}" ] || incoming=(-S -incoming "exec:cat $(printf %q "$INCOMING")")
case ${ACCEL:=tcg} in
tcg) cpu=${CPU:-max,cx16=off} ;; # see test-vm.sh
kvm) cpu=${CPU:-host} ;;
*) echo "vhost-vm.sh: ACCEL is tcg or kvm, not $ACCEL" >&2; exit 2 ;;
esac
case ${CACHE:=none} in
none | writeback) ;;
*) echo "vhost-vm.sh: CACHE is none or writeback, not $CACHE" >&2; exit 2 ;;
esac
root=()
[ -z "${ROOT:-}" ] || root=(-drive file="$ROOT",if=virtio,format=raw,cache=unsafe)
monitor=none
[ -z "${MONITOR:-}" ] || monitor=unix:$MONITOR,server=on,wait=off
exec qemu-system-x86_64 \
	-machine q35,accel="$ACCEL" -cpu "$cpu" -smp "${CPUS:-1}" "${mem[@]}" \
	-display none -monitor "$monitor" -serial stdio -no-reboot \
	-kernel "$KERNEL" -initrd "$INITRD" \
	-append "console=ttyS0 panic=-1 random.trust_cpu=on quiet ${APPEND:-}" \
	"${vsock[@]}" "${incoming[@]}" "${root[@]}" \
	-drive file="$IMAGE",if=virtio,format=raw,readonly=on,cache="$CACHE",file.locking=off
