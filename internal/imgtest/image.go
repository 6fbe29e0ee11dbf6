package imgtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/testenv"
)

// Features are the ext4 features of a live export in the tests: those
// of mkfs.ext4's defaults that ext4ro reads, and the journal.
const Features = "has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize"

// Run runs a command and fails t with its output if it fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// RequireTools needs the programs on PATH (see testenv.RequireTool).
func RequireTools(t testing.TB, names ...string) { t.Helper(); testenv.RequireTool(t, names...) }

// Mkfs makes an image file of sizeMB with mkfs.TYPE, populated from src
// if src is not empty, with reproducible times, and returns its path.
// args go to mkfs before the device (e.g. "-O", "^has_journal", "-b", "1024").
func Mkfs(t testing.TB, fstype, src string, sizeMB int, args ...string) string {
	t.Helper()
	testenv.RequireTool(t, "mkfs."+fstype)
	img := filepath.Join(t.TempDir(), fstype+".img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(sizeMB) << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	all := append([]string{"-q", "-F"}, args...)
	if src != "" {
		all = append(all, "-d", src)
	}
	all = append(all, img)
	cmd := exec.Command("mkfs."+fstype, all...)
	cmd.Env = append(os.Environ(), "E2FSPROGS_FAKE_TIME=1600000000")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("mkfs.%s %s: %v\n%s", fstype, strings.Join(all, " "), err, out)
	}
	return img
}

// Fsck runs e2fsck -f with args (e.g. "-yD" to build htrees) and fails t
// if it reports anything but a clean or corrected filesystem.
func Fsck(t testing.TB, img string, args ...string) {
	t.Helper()
	cmd := exec.Command("e2fsck", append(append([]string{"-f"}, args...), img)...)
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() <= 1 {
		err = nil // 1: errors corrected (e.g. directories optimised)
	}
	if err != nil {
		t.Fatalf("e2fsck %v %s: %v\n%s", args, img, err, out)
	}
}

// Debugfs runs debugfs -w with the given requests on img.
func Debugfs(t testing.TB, img string, requests ...string) string {
	t.Helper()
	cmd := exec.Command("debugfs", "-w", "-f", "-", img)
	cmd.Stdin = strings.NewReader(strings.Join(requests, "\n") + "\n")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs %v: %v\n%s", requests, err, out)
	}
	return string(out)
}

// KernelMount loop-mounts img at a new directory with the kernel's ext4
// and unmounts it when t ends. opts are mount options ("ro", "rw", …).
func KernelMount(t testing.TB, img, opts string) string {
	t.Helper()
	testenv.RequireLoop(t)
	dir := t.TempDir()
	Run(t, "mount", "-t", "ext4", "-o", "loop,"+opts, img, dir)
	t.Cleanup(func() { Unmount(t, dir) })
	return dir
}

// Unmount unmounts dir, retrying briefly while it is busy, and detaching
// it lazily as a last resort so that no test leaves a mount behind.
func Unmount(t testing.TB, dir string) {
	t.Helper()
	var err error
	for i := 0; i < 50; i++ {
		if err = unix.Unmount(dir, 0); err == nil || err == unix.EINVAL || err == unix.ENOENT {
			return // EINVAL: not mounted (any more)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Errorf("unmount %s: %v; detaching", dir, err)
	_ = unix.Unmount(dir, unix.MNT_DETACH)
}

// LoopDevice returns the device mounted at mnt (a /dev/loopN for the
// mounts KernelMount makes).
func LoopDevice(t testing.TB, mnt string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		pre, post, _ := strings.Cut(line, " - ")
		if f, g := strings.Fields(pre), strings.Fields(post); len(f) > 4 && f[4] == mnt && len(g) > 1 {
			return g[1]
		}
	}
	t.Fatalf("nothing is mounted at %s", mnt)
	return ""
}
