// Package conformance is the read-only POSIX checks every leasefs mount
// must pass, as one table: the static image mount, and the live guest's
// mount with and without a device. Each check runs on the mount under
// test and on an oracle — the kernel's read-only mount of the same
// filesystem state — and they must agree: every write is refused as the
// kernel refuses it (EROFS, and EBADF where the descriptor is read-only),
// each error a reader can meet has the kernel's errno, the whole tree
// looks the same (names, types, modes, owners, times, sizes, links,
// symlink targets, xattrs, contents), and reads at odd offsets and
// across the end give the same bytes. On live mounts, Coherence adds the
// promise itself: after a publish every mount shows the new tree, and
// files open across it keep their bytes; Change is the same step in its
// parts, for mounts in VMs (internal/vmtest's fleet).
package conformance

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/imgtest"
)

// Dir is where Populate puts what the checks need, below a tree's root.
const Dir = "conformance"

// Populate adds to the tree at root (before it is imaged or published)
// the entries the checks use: a file with an xattr, a directory with a
// child, a symlink loop, files and a directory only root may read, a
// file nobody may execute, a symlink and a hard link.
func Populate(t testing.TB, root string) {
	t.Helper()
	d := filepath.Join(root, Dir)
	p := func(n string) string { return filepath.Join(d, n) }
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(p("dir"), 0o755))
	must(os.WriteFile(p("file"), []byte("content\n"), 0o644))
	must(unix.Setxattr(p("file"), "user.x", []byte("1"), 0))
	must(os.WriteFile(p("dir/child"), []byte("child"), 0o644))
	must(os.Symlink("loop2", p("loop1")))
	must(os.Symlink("loop1", p("loop2")))
	must(os.Symlink("file", p("link")))
	must(os.Link(p("file"), p("hard")))
	must(os.WriteFile(p("private"), []byte("secret"), 0o600))
	must(os.Mkdir(p("closed"), 0o700))
	must(os.WriteFile(p("closed/inside"), []byte("x"), 0o644))
	must(os.WriteFile(p("noexec"), []byte("#!/bin/sh\necho ran\n"), 0o644))
	must(os.WriteFile(p("odd"), []byte(strings.Repeat("0123456789", 1234)+"tail"), 0o644))
	must(os.WriteFile(p("script"), []byte("#!/bin/sh\necho ran from the mount\n"), 0o755))
	if runtime.GOARCH == "amd64" {
		must(os.WriteFile(p("exit42"), exit42(), 0o755))
	}
}

// exit42 is the smallest static program: an ELF executable for amd64
// whose code is exit(42). The kernel maps it from the file (a private
// mapping, executable), as it maps every program and library.
func exit42() []byte {
	const base, hdr, phdr = 0x400000, 64, 56
	code := []byte{0xbf, 42, 0, 0, 0, 0xb8, 60, 0, 0, 0, 0x0f, 0x05} // mov edi,42; mov eax,60; syscall
	size := uint64(hdr + phdr + len(code))
	b := make([]byte, 0, size)
	le := binary.LittleEndian
	b = append(b, 0x7f, 'E', 'L', 'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)
	b = le.AppendUint16(b, 2)    // ET_EXEC
	b = le.AppendUint16(b, 0x3e) // EM_X86_64
	b = le.AppendUint32(b, 1)
	b = le.AppendUint64(b, base+hdr+phdr) // entry
	b = le.AppendUint64(b, hdr)           // program headers
	b = le.AppendUint64(b, 0)             // no section headers
	b = le.AppendUint32(b, 0)
	b = le.AppendUint16(b, hdr)
	b = le.AppendUint16(b, phdr)
	b = le.AppendUint16(b, 1)
	b = le.AppendUint16(b, 64)
	b = le.AppendUint16(b, 0)
	b = le.AppendUint16(b, 0)
	b = le.AppendUint32(b, 1) // PT_LOAD
	b = le.AppendUint32(b, 5) // R+X
	b = le.AppendUint64(b, 0)
	b = le.AppendUint64(b, base)
	b = le.AppendUint64(b, base)
	b = le.AppendUint64(b, size)
	b = le.AppendUint64(b, size)
	b = le.AppendUint64(b, 0x1000)
	return append(b, code...)
}

// Run runs every check on mount against oracle; both show the same
// filesystem state, Populate'd.
func Run(t *testing.T, mount, oracle string) {
	t.Run("EROFS", func(t *testing.T) { checkWrites(t, mount, oracle) })
	t.Run("errno", func(t *testing.T) { checkErrnos(t, mount, oracle) })
	t.Run("permissions", func(t *testing.T) { checkPermissions(t, mount, oracle) })
	t.Run("mmap and exec", func(t *testing.T) { checkMapsAndExec(t, mount, oracle) })
	t.Run("tree", func(t *testing.T) {
		want := imgtest.Snapshot(t, oracle)
		if len(want) < 10 {
			t.Fatalf("the oracle shows only %d entries", len(want))
		}
		imgtest.Compare(t, want, imgtest.Snapshot(t, mount))
		imgtest.CompareReads(t, oracle, mount, want, 7)
	})
}

// checkWrites: every operation that would change the filesystem fails
// as on the kernel's read-only mount, and most with EROFS.
func checkWrites(t *testing.T, mount, oracle string) {
	kernel, ours := writeOps(filepath.Join(oracle, Dir)), writeOps(filepath.Join(mount, Dir))
	eroFS := 0
	for name, op := range ours {
		want := kernel[name]()
		got := op()
		if got == nil || !errors.Is(got, want) {
			t.Errorf("%s: %v, want %v as the kernel's read-only mount", name, got, want)
		}
		if errors.Is(want, unix.EROFS) {
			eroFS++
		}
	}
	// All but those on a read-only descriptor (write, fallocate, a shared
	// writable mapping), which the kernel refuses before the filesystem.
	if eroFS < len(kernel)-3 {
		t.Fatalf("only %d of %d operations gave EROFS on the kernel's mount", eroFS, len(kernel))
	}
}

func writeOps(d string) map[string]func() error {
	p := func(n string) string { return filepath.Join(d, n) }
	withFile := func(fn func(fd int) error) func() error {
		return func() error {
			f, err := os.Open(p("file"))
			if err != nil {
				return err
			}
			defer f.Close()
			return fn(int(f.Fd()))
		}
	}
	return map[string]func() error{
		"open O_WRONLY":  func() error { return openErr(p("file"), unix.O_WRONLY) },
		"open O_RDWR":    func() error { return openErr(p("file"), unix.O_RDWR) },
		"open O_TRUNC":   func() error { return openErr(p("file"), unix.O_RDONLY|unix.O_TRUNC) },
		"open O_CREAT":   func() error { return openErr(p("new"), unix.O_WRONLY|unix.O_CREAT) },
		"creat existing": func() error { return openErr(p("file"), unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC) },
		"mkdir":          func() error { return unix.Mkdir(p("newdir"), 0o755) },
		"rmdir":          func() error { return unix.Rmdir(p("dir")) },
		"unlink":         func() error { return unix.Unlink(p("file")) },
		"rename":         func() error { return unix.Rename(p("file"), p("renamed")) },
		"link":           func() error { return unix.Link(p("file"), p("hardlink")) },
		"symlink":        func() error { return unix.Symlink("file", p("symlink")) },
		"mknod":          func() error { return unix.Mknod(p("fifo"), unix.S_IFIFO|0o644, 0) },
		"chmod":          func() error { return unix.Chmod(p("file"), 0o600) },
		"chown":          func() error { return unix.Chown(p("file"), 1, 1) },
		"utimensat":      func() error { return unix.UtimesNano(p("file"), []unix.Timespec{{}, {}}) },
		"truncate":       func() error { return unix.Truncate(p("file"), 0) },
		"setxattr":       func() error { return unix.Setxattr(p("file"), "user.y", []byte("2"), 0) },
		"removexattr":    func() error { return unix.Removexattr(p("file"), "user.x") },
		"fallocate":      withFile(func(fd int) error { return unix.Fallocate(fd, 0, 0, 4096) }),
		"write":          withFile(func(fd int) error { _, err := unix.Write(fd, []byte("x")); return err }),
		"mmap MAP_SHARED write": withFile(func(fd int) error {
			m, err := unix.Mmap(fd, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
			if err == nil {
				unix.Munmap(m)
				return errors.New("writable shared mapping allowed")
			}
			return err
		}),
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

// checkErrnos: what a reader can get wrong gets the kernel's errno.
func checkErrnos(t *testing.T, mount, oracle string) {
	ops := func(d string) map[string]func() error {
		p := func(n string) string { return filepath.Join(d, n) }
		return map[string]func() error{
			"stat missing":         func() error { _, err := os.Lstat(p("missing")); return err },
			"stat through a file":  func() error { _, err := os.Lstat(p("file/x")); return err },
			"open a symlink loop":  func() error { return openErr(p("loop1"), unix.O_RDONLY) },
			"stat a long name":     func() error { _, err := os.Lstat(p(strings.Repeat("n", 256))); return err },
			"opendir a file":       func() error { return openErr(p("file"), unix.O_RDONLY|unix.O_DIRECTORY) },
			"open O_NOFOLLOW link": func() error { return openErr(p("link"), unix.O_RDONLY|unix.O_NOFOLLOW) },
			"readlink a file":      func() error { _, err := os.Readlink(p("file")); return err },
			"getxattr missing":     func() error { _, err := unix.Getxattr(p("file"), "user.none", make([]byte, 64)); return err },
			"listxattr too small":  func() error { _, err := unix.Listxattr(p("file"), make([]byte, 1)); return err },
			"read a directory":     func() error { _, err := os.ReadFile(p("dir")); return err },
			"stat missing in dir":  func() error { _, err := os.Lstat(p("dir/missing")); return err },
			"stat .. of a file":    func() error { _, err := os.Stat(p("file/..")); return err },
			"hard link same inode": func() error { return sameInode(p("file"), p("hard")) },
			"execute a file with no x bit": func() error {
				err := exec.Command(p("noexec")).Run()
				var pe *os.PathError
				if errors.As(err, &pe) {
					return pe.Err
				}
				return err
			},
		}
	}
	kernel, ours := ops(filepath.Join(oracle, Dir)), ops(filepath.Join(mount, Dir))
	for name, op := range ours {
		want, got := kernel[name](), op()
		var we syscall.Errno
		if want != nil && !errors.As(want, &we) {
			t.Errorf("%s: the kernel's answer %v is no errno", name, want)
			continue
		}
		if (want == nil) != (got == nil) || (want != nil && !errors.Is(got, we)) {
			t.Errorf("%s: %v, want %v as the kernel's mount", name, got, want)
		}
	}
}

// checkMapsAndExec: a file mapped privately and shared reads as the
// kernel's, and programs run from the mount: a script, and a binary the
// kernel maps to execute it.
func checkMapsAndExec(t *testing.T, mount, oracle string) {
	want, err := os.ReadFile(filepath.Join(oracle, Dir, "odd"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name  string
		flags int
	}{{"MAP_PRIVATE", unix.MAP_PRIVATE}, {"MAP_SHARED", unix.MAP_SHARED}} {
		f, err := os.Open(filepath.Join(mount, Dir, "odd"))
		if err != nil {
			t.Fatal(err)
		}
		m, err := unix.Mmap(int(f.Fd()), 0, len(want), unix.PROT_READ, c.flags)
		f.Close()
		if errors.Is(err, unix.ENODEV) && c.flags == unix.MAP_SHARED {
			// A mount whose files are opened for direct I/O
			// (--page-cache host) on a kernel before 6.6, which has no
			// FUSE_DIRECT_IO_ALLOW_MMAP: the guest says so at mount.
			t.Logf("%s: ENODEV (direct I/O, no shared mappings on this kernel)", c.name)
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if string(m) != string(want) {
			t.Errorf("%s: the mapping differs from the file", c.name)
		}
		unix.Munmap(m)
	}
	if out, err := exec.Command(filepath.Join(mount, Dir, "script")).Output(); err != nil || string(out) != "ran from the mount\n" {
		t.Errorf("a script from the mount: %q %v", out, err)
	}
	if runtime.GOARCH == "amd64" {
		err := exec.Command(filepath.Join(mount, Dir, "exit42")).Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 42 {
			t.Errorf("a program from the mount: %v, want exit status 42", err)
		}
	}
}

func sameInode(a, b string) error {
	var sa, sb unix.Stat_t
	if err := unix.Stat(a, &sa); err != nil {
		return err
	}
	if err := unix.Stat(b, &sb); err != nil {
		return err
	}
	if sa.Ino != sb.Ino || sa.Nlink != 2 {
		return fmt.Errorf("%s and %s: inodes %d and %d, %d links", a, b, sa.Ino, sb.Ino, sa.Nlink)
	}
	return nil
}

// checkPermissions: a user who may not read a file or list a directory
// is refused as the kernel refuses them (default_permissions).
func checkPermissions(t *testing.T, mount, oracle string) {
	if os.Geteuid() != 0 {
		t.Skip("needs root, to read as another user")
	}
	as := func(uid uint32, name string, args ...string) string {
		cmd := exec.Command(name, args...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		out, err := cmd.CombinedOutput()
		if err == nil {
			return "ok: " + string(out)
		}
		return strings.TrimSpace(string(out))
	}
	for _, c := range []struct {
		name string
		uid  uint32
		args []string
	}{
		{"read a file as its owner", 0, []string{"cat", "private"}},
		{"read a private file", 65534, []string{"cat", "private"}},
		{"list a closed directory", 65534, []string{"ls", "closed"}},
		{"read through a closed directory", 65534, []string{"cat", "closed/inside"}},
		{"read a public file", 65534, []string{"cat", "file"}},
	} {
		rel := func(root string) []string {
			out := append([]string(nil), c.args...)
			out[1] = filepath.Join(root, Dir, out[1])
			return out
		}
		want := strings.ReplaceAll(as(c.uid, rel(oracle)[0], rel(oracle)[1:]...), oracle, "ROOT")
		got := strings.ReplaceAll(as(c.uid, rel(mount)[0], rel(mount)[1:]...), mount, "ROOT")
		if got != want {
			t.Errorf("%s: %q, want %q as the kernel's mount", c.name, got, want)
		}
	}
}
