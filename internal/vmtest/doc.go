// Package vmtest runs leasefs end to end inside real guest kernels: it
// boots Debian's cloud kernels (5.10, 6.1) under QEMU with an initramfs
// of busybox, the kernel's modules, the static leasefs binary and this
// package's own test binary, which then runs the scenarios inside the VM
// — host agent and guest of the real binary over AF_VSOCK loopback, the
// export on one virtio-blk drive and the same image attached again
// read-only as the guest's device — and reports on the serial console
// in go test's -v format, which the test outside parses.
//
// debian.sh fetches and caches the kernels (apt-get download with a
// private sources list); Initramfs writes the archive; Modules orders
// the modules by what each depends on. examples/qemu/test-vm.sh is the
// QEMU command line, the test's and a user's. The host agent, here and
// in a VM, is internal/hosttest's Agent.
package vmtest
