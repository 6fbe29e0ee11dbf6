// Package testenv lets tests require privileges and tools. Without them a
// test skips with the reason — except under CI=true, where the same
// situation fails the test, so nothing privileged silently stops being
// tested. It also has the one helper-process mechanism (helper.go: a
// test binary doubles as the processes its tests start), processes
// stopped for real (Stop), a fake systemd (systemd.go) and the torture
// run (torture.go). The host agent a test runs is internal/hosttest's.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// InCI reports whether the tests run in CI (CI=true).
func InCI() bool { return os.Getenv("CI") == "true" }

// Unavailable skips t, or fails it in CI.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if InCI() {
		t.Fatalf("required in CI but unavailable: "+format, args...)
	}
	t.Skipf("skipped: "+format, args...)
}

// RequireRoot needs an effective uid of 0.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "needs root")
	}
}

// RequireFUSE needs root and /dev/fuse.
func RequireFUSE(t testing.TB) {
	t.Helper()
	RequireRoot(t)
	if _, err := os.Stat("/dev/fuse"); err != nil {
		Unavailable(t, "needs /dev/fuse: %v", err)
	}
}

// RequireLoop needs root and loop devices, for kernel mounts of images.
func RequireLoop(t testing.TB) {
	t.Helper()
	RequireRoot(t)
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		Unavailable(t, "needs loop devices: %v", err)
	}
}

// RequireTool needs a program on PATH.
func RequireTool(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			Unavailable(t, "needs %s (make deps installs it)", n)
		}
	}
}

// Until calls fn(0), fn(1), … until stop is closed or fn returns false:
// the loop of a test's background load.
func Until(stop <-chan struct{}, fn func(i int) bool) {
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		default:
		}
		if !fn(i) {
			return
		}
	}
}
