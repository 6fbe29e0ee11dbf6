#!/bin/bash
# Boots the VM leasefs's guest-kernel tests boot (internal/vmtest, make
# test-vm), for a look by hand: a Debian kernel, the tests' initramfs,
# and one ext4 image attached twice — read-write as /dev/vda, the
# export the host agent freezes and publishes, and read-only as
# /dev/vdb, the shared device the guest reads file data from, as a VM
# on a leasefs host would have it. Host agent and guest run inside the
# one VM and talk over AF_VSOCK loopback (CID 1).
#
#   KERNEL=vmlinuz INITRD=initramfs.cpio IMAGE=export.img ./test-vm.sh
#
# ACCEL=kvm uses KVM, CPU=MODEL another CPU model than TCG's or KVM's
# default below. ACCEL=kvm (it fails to start a vCPU on some hosts; TCG, the
# default, always works, about 5 s to userspace). The console is this
# terminal; the VM powers off when its init ends.
set -euo pipefail
: "${KERNEL:?KERNEL=path to a vmlinuz}" "${INITRD:?INITRD=path to an initramfs}" "${IMAGE:?IMAGE=path to an ext4 image}"
case ${ACCEL:=tcg} in
# Without CMPXCHG16B: under QEMU 7.2's TCG, 6.12 double-faults within
# seconds at a per-CPU cmpxchg16b in its slab allocator otherwise
# (docs/operations.md, "Kernels").
tcg) cpu=${CPU:-max,cx16=off} ;;
kvm) cpu=${CPU:-host} ;;
*) echo "test-vm.sh: ACCEL is tcg or kvm, not $ACCEL" >&2; exit 2 ;;
esac
# ROOT=root.img boots a root filesystem: it is the first drive (vda), the
# export's two follow (vdb read-write, vdc read-only).
root=()
if [ -n "${ROOT:-}" ]; then root=(-drive file="$ROOT",if=virtio,format=raw,cache=unsafe); fi
exec qemu-system-x86_64 \
	-machine q35,accel="$ACCEL" -cpu "$cpu" -smp "${CPUS:-2}" -m "${MEMORY:-1536}" \
	-display none -monitor none -serial stdio -no-reboot \
	-kernel "$KERNEL" -initrd "$INITRD" \
	-append "console=ttyS0 panic=-1 random.trust_cpu=on quiet ${APPEND:-}" \
	"${root[@]}" \
	-drive file="$IMAGE",if=virtio,format=raw,cache=none,file.locking=off \
	-drive file="$IMAGE",if=virtio,format=raw,cache=none,file.locking=off,readonly=on
