package main

import (
	"bytes"
	"errors"
	"fmt"
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

// TestWritesAreEROFS: every operation that would change the filesystem
// fails with EROFS, not EPERM, EACCES, ENOSYS or EIO — exactly as on the
// kernel's read-only mount of the same image, which is the oracle (an
// operation on a read-only descriptor fails with EBADF on both).
func TestWritesAreEROFS(t *testing.T) {
	img := smallImage(t)
	kernel := writeOps(imgtest.KernelMount(t, img, "ro"))
	ours := writeOps(startMount(t, img))
	for name, op := range ours {
		want := kernel[name]()
		got := op()
		if got == nil || !errors.Is(got, want) {
			t.Errorf("%s: %v, want %v as the kernel's read-only ext4", name, got, want)
		}
	}
	eroFS := 0
	for _, op := range kernel {
		if errors.Is(op(), unix.EROFS) {
			eroFS++
		}
	}
	if eroFS < len(kernel)-2 {
		t.Fatalf("only %d of %d operations gave EROFS on the kernel mount", eroFS, len(kernel))
	}
}

// writeOps are the write operations, on the mount at dir.
func writeOps(dir string) map[string]func() error {
	p := func(n string) string { return filepath.Join(dir, n) }
	return map[string]func() error{
		"open O_WRONLY": func() error { return openErr(p("file"), unix.O_WRONLY) },
		"open O_RDWR":   func() error { return openErr(p("file"), unix.O_RDWR) },
		"open O_TRUNC":  func() error { return openErr(p("file"), unix.O_RDONLY|unix.O_TRUNC) },
		"open O_CREAT":  func() error { return openErr(p("new"), unix.O_WRONLY|unix.O_CREAT) },
		"creat existing": func() error {
			return openErr(p("file"), unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC)
		},
		"mkdir":       func() error { return unix.Mkdir(p("newdir"), 0o755) },
		"rmdir":       func() error { return unix.Rmdir(p("dir")) },
		"unlink":      func() error { return unix.Unlink(p("file")) },
		"rename":      func() error { return unix.Rename(p("file"), p("renamed")) },
		"link":        func() error { return unix.Link(p("file"), p("hardlink")) },
		"symlink":     func() error { return unix.Symlink("file", p("symlink")) },
		"mknod":       func() error { return unix.Mknod(p("fifo"), unix.S_IFIFO|0o644, 0) },
		"chmod":       func() error { return unix.Chmod(p("file"), 0o600) },
		"chown":       func() error { return unix.Chown(p("file"), 1, 1) },
		"utimensat":   func() error { return unix.UtimesNano(p("file"), []unix.Timespec{{}, {}}) },
		"truncate":    func() error { return unix.Truncate(p("file"), 0) },
		"setxattr":    func() error { return unix.Setxattr(p("file"), "user.y", []byte("2"), 0) },
		"removexattr": func() error { return unix.Removexattr(p("file"), "user.x") },
		"fallocate": func() error {
			f, err := os.Open(p("file"))
			if err != nil {
				return err
			}
			defer f.Close()
			return unix.Fallocate(int(f.Fd()), 0, 0, 4096)
		},
		"mmap MAP_SHARED write": func() error {
			f, err := os.Open(p("file"))
			if err != nil {
				return err
			}
			defer f.Close()
			m, err := unix.Mmap(int(f.Fd()), 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
			if err == nil {
				unix.Munmap(m)
				return errors.New("writable shared mapping allowed")
			}
			return err
		},
		"unchanged": func() error {
			if b, err := os.ReadFile(p("file")); err != nil || string(b) != "content\n" {
				return fmt.Errorf("file reads %q, %v", b, err)
			}
			return unix.EROFS // nothing to compare: the content is the check
		},
	}
}

func openErr(path string, flags int) error {
	fd, err := unix.Open(path, flags, 0o644)
	if err == nil {
		unix.Close(fd)
	}
	return err
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
