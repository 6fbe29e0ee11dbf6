package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

func smallImage(t *testing.T) string {
	t.Helper()
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "file"), []byte("content\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(src, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(filepath.Join(src, "file"), "user.x", []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
	return imgtest.Mkfs(t, "ext4", src, 16, "-O", "extent,metadata_csum,64bit")
}

// serverPids returns the pids of leasefs processes whose command line
// mentions dir: mount servers this test started.
func serverPids(dir string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.HasPrefix(cmd, []byte(leasefsBin)) && bytes.Contains(cmd, []byte(dir)) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func waitGone(t *testing.T, dir string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if len(serverPids(dir)) == 0 && !isFuseMount(t, dir) {
			return
		}
	}
	t.Fatalf("server for %s still running (pids %v) or still mounted", dir, serverPids(dir))
}

// TestBackgroundMount: 'leasefs mount' returns with the mount ready and
// the server in the background; umount ends the server, and so does
// SIGTERM (which also unmounts).
func TestBackgroundMount(t *testing.T) {
	testenv.RequireFUSE(t)
	img := smallImage(t)
	for _, stop := range []string{"umount", "SIGTERM"} {
		t.Run(stop, func(t *testing.T) {
			dir := t.TempDir()
			t.Cleanup(func() {
				imgtest.Unmount(t, dir)
				for _, pid := range serverPids(dir) {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			})
			out, err := exec.Command(leasefsBin, "mount", "--image", img, dir).CombinedOutput()
			if err != nil {
				t.Fatalf("leasefs mount: %v\n%s", err, out)
			}
			// Ready on return: no polling.
			if b, err := os.ReadFile(filepath.Join(dir, "file")); err != nil || string(b) != "content\n" {
				t.Fatalf("right after mount: %q, %v", b, err)
			}
			pids := serverPids(dir)
			if len(pids) != 1 {
				t.Fatalf("%d servers running, want 1", len(pids))
			}
			switch stop {
			case "umount":
				imgtest.Run(t, "umount", dir)
			case "SIGTERM":
				if err := syscall.Kill(pids[0], syscall.SIGTERM); err != nil {
					t.Fatal(err)
				}
			}
			waitGone(t, dir)
		})
	}
}

// TestMountErrors: problems are reported by the command itself, with a
// clear message and a non-zero exit, and leave nothing mounted.
func TestMountErrors(t *testing.T) {
	testenv.RequireFUSE(t)
	garbage := filepath.Join(t.TempDir(), "garbage.img")
	if err := os.WriteFile(garbage, bytes.Repeat([]byte("not ext4"), 1<<14), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"not ext4", []string{"--image", garbage}, "bad magic"},
		{"no image", []string{"--image", "/nonexistent.img"}, "no such file"},
		{"no image flag", nil, "need --image"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			out, err := exec.Command(leasefsBin, append(append([]string{"mount"}, c.args...), dir)...).CombinedOutput()
			if err == nil || !strings.Contains(string(out), c.want) {
				t.Fatalf("got %v, %q; want failure mentioning %q", err, out, c.want)
			}
			if isFuseMount(t, dir) {
				imgtest.Unmount(t, dir)
				t.Fatal("left a mount behind")
			}
		})
	}
}
