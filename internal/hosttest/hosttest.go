// Package hosttest is the one host harness of leasefs's tests: a fresh
// loop-mounted export (Export, Serve), and the host agent on it, run as
// its tests need it —
//
//   - Agent: the 'leasefs host' binary (or a program that runs it, such
//     as a fake systemd), started, signalled and started again as a
//     supervisor would, ready when it prints "ready" (cmd/leasefs, and
//     internal/vmtest on the machine that runs the VMs and in a VM);
//   - InProcess: the host agent's library in the test's own process,
//     whose freeze and server a test can reach into (guestagent).
//
// Publish and Status ask a running agent through its control socket,
// as an operator does.
package hosttest

import (
	"cmp"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"testing"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// Export makes a fresh ext4 image of sizeMiB with 4 KiB blocks, mounts
// it read-write through a loop device, and returns its image, mount and
// device; all go when t ends.
func Export(t testing.TB, sizeMiB int) (img, mnt, dev string) {
	t.Helper()
	testenv.RequireLoop(t)
	img = imgtest.Mkfs(t, "ext4", "", sizeMiB, "-b", "4096", "-O", imgtest.Features)
	mnt, dev = Serve(t, img)
	return img, mnt, dev
}

// Serve mounts image img read-write through a loop device, until t
// ends, and returns its mount and device.
func Serve(t testing.TB, img string) (mnt, dev string) {
	t.Helper()
	mnt = imgtest.KernelMount(t, img, "rw")
	return mnt, imgtest.LoopDevice(t, mnt)
}

// Publish runs 'bin publish' of export through control and returns the
// generation it made.
func Publish(bin, control, export string) (uint64, error) {
	out, err := exec.Command(bin, "publish", "--control", control, export).CombinedOutput()
	var gen uint64
	if _, serr := fmt.Sscanf(string(out), export+": generation %d,", &gen); err != nil || serr != nil {
		return 0, fmt.Errorf("leasefs publish: %v %s", cmp.Or(err, serr), strings.TrimSpace(string(out)))
	}
	return gen, nil
}

// Status runs 'bin status --json' through control.
func Status(bin, control string) (*hostagent.Status, error) {
	out, err := exec.Command(bin, "status", "--json", "--control", control).Output()
	if err != nil {
		return nil, fmt.Errorf("leasefs status: %w %s", err, testenv.StderrOf(err))
	}
	var st hostagent.Status
	if err := json.Unmarshal(out, &st); err != nil {
		return nil, fmt.Errorf("leasefs status: %w", err)
	}
	return &st, nil
}

// ReadOnly binds dir read-only at a new directory, until t ends: an
// oracle of what the writer left, whose reads change nothing (not even
// an access time).
func ReadOnly(t testing.TB, dir string) string {
	t.Helper()
	ro := t.TempDir()
	imgtest.Run(t, "mount", "--bind", dir, ro)
	t.Cleanup(func() { imgtest.Unmount(t, ro) })
	imgtest.Run(t, "mount", "-o", "remount,bind,ro", ro)
	return ro
}
