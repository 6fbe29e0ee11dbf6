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
set -euo pipefail
: "${VHOST:?VHOST=the vhost-user socket of the VM's vhost-device-vsock}" \
	"${KERNEL:?KERNEL=path to a vmlinuz}" "${INITRD:?INITRD=path to an initramfs}" "${IMAGE:?IMAGE=the export's disk}"
case ${ACCEL:=tcg} in
tcg) cpu=${CPU:-max,cx16=off} ;; # see test-vm.sh
kvm) cpu=${CPU:-host} ;;
*) echo "vhost-vm.sh: ACCEL is tcg or kvm, not $ACCEL" >&2; exit 2 ;;
esac
case ${CACHE:=none} in
none | writeback) ;;
*) echo "vhost-vm.sh: CACHE is none or writeback, not $CACHE" >&2; exit 2 ;;
esac
memory=${MEMORY:-512}
monitor=none
[ -z "${MONITOR:-}" ] || monitor=unix:$MONITOR,server=on,wait=off
# vhost-user needs the guest's memory shared with the backend: a memfd.
exec qemu-system-x86_64 \
	-machine q35,accel="$ACCEL" -cpu "$cpu" -smp "${CPUS:-1}" -m "$memory" \
	-object memory-backend-memfd,id=mem,size="${memory}M",share=on -numa node,memdev=mem \
	-display none -monitor "$monitor" -serial stdio -no-reboot \
	-kernel "$KERNEL" -initrd "$INITRD" \
	-append "console=ttyS0 panic=-1 random.trust_cpu=on quiet ${APPEND:-}" \
	-chardev socket,id=vsock,path="$VHOST" -device vhost-user-vsock-pci,chardev=vsock \
	-drive file="$IMAGE",if=virtio,format=raw,readonly=on,cache="$CACHE",file.locking=off
