package main

// A generation stays whole while guests are on it: what the writer
// replaces or deletes before the next publish still opens, with its
// bytes, in the generation the guests are on.

import (
	"bufio"
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

	"github.com/leasefs/leasefs/internal/testenv"
)

// Between the writer's changes and the next publish, guests (device,
// and data through the host) open the files of their generation that
// the writer renamed a new file over and deleted, and read their old
// bytes — even after the disk was filled, so their blocks would have
// been reused. A file rewritten in place answers ESTALE. Once the guests
// are on a newer generation and the one before is dropped, the space
// comes back.
//
// The host keeps two generations whole (--keep-generations 2): a guest
// that follows may say it moved before the publish decides what to keep,
// and the generation it left would then go at once, taking what the
// status is asked to show with it.
func TestReplacedFilesStayReadable(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	h := &hostProc{control: "unix:" + filepath.Join(run, "control.sock"), guest: "unix:" + filepath.Join(run, "guest.sock")}
	runHostCmd(t, h, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", h.guest, "--control", h.control,
		"--state-dir", filepath.Join(run, "state"), "--auto-publish", "off", "--keep-generations", "2")
	old := map[string][]byte{}
	for _, name := range []string{"renamed-over", "deleted", "rewritten"} {
		old[name] = bytes.Repeat([]byte(name+" in generation 2\n"), 40000)
		if err := os.WriteFile(filepath.Join(mnt, name), old[name], 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	gd := guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev)
	gh := guestMount(t, "--connect", h.guest, "--export", "mirror")

	// The writer: a new file renamed over one, one deleted (then the disk
	// refilled), one rewritten in place. Nothing published.
	if err := os.WriteFile(filepath.Join(mnt, ".tmp"), []byte("the new version\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(mnt, ".tmp"), filepath.Join(mnt, "renamed-over")); err != nil {
		t.Fatal(err)
	}
	fillExport(t, mnt, "deleted")
	if err := os.WriteFile(filepath.Join(mnt, "rewritten"), []byte("rewritten in place\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, g := range []string{gd, gh} {
		for _, name := range []string{"renamed-over", "deleted"} {
			b, err := os.ReadFile(filepath.Join(g, name))
			if err != nil || !bytes.Equal(b, old[name]) {
				t.Errorf("%s in the guest's generation: %d bytes, %v; want its %d old bytes", name, len(b), err, len(old[name]))
			}
		}
		if b, err := os.ReadFile(filepath.Join(g, "rewritten")); !errors.Is(err, syscall.ESTALE) {
			t.Errorf("a file rewritten in place: %q, %v; want ESTALE", b[:min(len(b), 40)], err)
		}
	}

	// Published twice: the guests move on, the generation they were on
	// goes (the second publish keeps it and the one after), and with it
	// what was kept for it.
	for i := range 2 {
		if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
			t.Fatalf("publish: %v\n%s", err, out)
		}
		if i == 0 {
			// Kept with the generation before.
			want := int64(len(old["renamed-over"]) + len(old["deleted"]))
			if st := hostStatus(t, h.control).Exports[0]; st.KeptReplaced != 2 || st.KeptBytes != want {
				t.Errorf("status: %d files kept for older generations, %d bytes; want 2, %d", st.KeptReplaced, st.KeptBytes, want)
			}
		}
		waitFor(t, "the guests on the new generation", func() bool {
			cur := hostStatus(t, h.control).Exports[0]
			return guestStatus(t, gd).Generation == cur.Generation && guestStatus(t, gh).Generation == cur.Generation
		})
	}
	if b, err := os.ReadFile(filepath.Join(gd, "renamed-over")); err != nil || string(b) != "the new version\n" {
		t.Errorf("renamed-over after the publish: %q %v", b, err)
	}
	if st := hostStatus(t, h.control).Exports[0]; st.KeptReplaced != 0 || st.KeptBytes != 0 {
		t.Errorf("after the guests moved on: %d files, %d bytes still kept", st.KeptReplaced, st.KeptBytes)
	}
	if _, err := os.Stat(filepath.Join(gd, "deleted")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("deleted, after the publish: %v", err)
	}
}

// Past its budget (--keep-replaced-files), what is kept for older
// generations goes with the oldest of them at the next publish: the
// host says so, and a guest that stayed on it (--follow manual) moves on
// at its next open instead of reading what was let go.
func TestKeptFilesBudget(t *testing.T) {
	for _, budget := range [][]string{{"--keep-replaced-files", "1"}, {"--keep-replaced-mb", "1"}} {
		t.Run(budget[0][2:], func(t *testing.T) { keptFilesBudget(t, budget) })
	}
}

// keptFilesBudget: two files of 600 KiB replaced, past a budget of one
// file or of 1 MiB.
func keptFilesBudget(t *testing.T, budget []string) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	h := &hostProc{control: "unix:" + filepath.Join(run, "control.sock"), guest: "unix:" + filepath.Join(run, "guest.sock")}
	runHostCmd(t, h, mnt, append([]string{"host", "--export", "mirror=" + dev + ":" + mnt, "--listen", h.guest, "--control", h.control,
		"--state-dir", filepath.Join(run, "state"), "--auto-publish", "off"}, budget...)...)
	first := func(name string) []byte { return bytes.Repeat([]byte(name+" first\n"), 600<<10/8) }
	for _, name := range []string{"a", "b"} {
		if err := os.WriteFile(filepath.Join(mnt, name), first(name), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	g := guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev, "--follow", "manual")
	for _, name := range []string{"a", "b"} {
		if err := os.WriteFile(filepath.Join(mnt, ".new"), []byte(name+" second\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(filepath.Join(mnt, ".new"), filepath.Join(mnt, name)); err != nil {
			t.Fatal(err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(g, "a")); err != nil || !bytes.Equal(b, first("a")) {
		t.Fatalf("before the publish, within the budget: %d bytes %v", len(b), err)
	}
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	waitFor(t, "the budget's warning", func() bool { return strings.Contains(h.Log.String(), "exceed their budget") })
	if st := hostStatus(t, h.control).Exports[0]; st.KeptReplaced != 0 || st.Kept != 1 {
		t.Errorf("after the publish past the budget: %d replaced files kept, %d generations", st.KeptReplaced, st.Kept)
	}
	b, err := os.ReadFile(filepath.Join(g, "b"))
	if err == nil && string(b) != "b second\n" || err != nil && !errors.Is(err, syscall.ESTALE) {
		t.Fatalf("b in the guest whose generation was dropped: %d bytes %v; want its new bytes or ESTALE", len(b), err)
	}
}

// A program started from a guest before a dpkg-style upgrade (each file
// written as NAME.dpkg-new and renamed over NAME) goes on importing the
// modules of its generation, also those it had not imported yet, until
// the publish; a program started after it gets the new ones.
func TestProgramAcrossDpkgUpgrade(t *testing.T) {
	testenv.RequireTool(t, "python3")
	h, mnt, dev := startHostCmd(t)
	lib := filepath.Join(mnt, "usr/lib/python3/dist-packages")
	if err := os.MkdirAll(lib, 0o755); err != nil {
		t.Fatal(err)
	}
	install := func(version string, rename bool) {
		for _, mod := range []string{"lfs_a", "lfs_b"} {
			path := filepath.Join(lib, mod+".py")
			dst := path
			if rename {
				dst += ".dpkg-new"
			}
			if err := os.WriteFile(dst, []byte("V = "+strconv.Quote(mod+" "+version)+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			if rename {
				if err := os.Rename(dst, path); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	install("1.0", false)
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	g := guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev)
	glib := filepath.Join(g, "usr/lib/python3/dist-packages")
	py := exec.Command("python3", "-u", "-c", `import sys
sys.path.insert(0, sys.argv[1])
import lfs_a
print(lfs_a.V)
sys.stdin.readline()
import lfs_b
print(lfs_b.V)
`, glib)
	py.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1")
	stdin, _ := py.StdinPipe()
	stdout, _ := py.StdoutPipe()
	if err := py.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = py.Process.Kill(); _ = py.Wait() })
	lines := bufio.NewScanner(stdout)
	next := func() string {
		if !lines.Scan() {
			return "(no line: " + fmt.Sprint(lines.Err()) + ")"
		}
		return lines.Text()
	}
	if l := next(); l != "lfs_a 1.0" {
		t.Fatalf("the program's first import: %s", l)
	}
	install("2.0", true) // dpkg unpacks the upgrade; nothing published yet
	fmt.Fprintln(stdin)
	if l := next(); l != "lfs_b 1.0" {
		t.Fatalf("a module imported after the upgrade, before the publish: %s; want the old one", l)
	}
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	waitFor(t, "the guest on the new generation", func() bool {
		return guestStatus(t, g).Generation == hostStatus(t, h.control).Exports[0].Generation
	})
	out, err := exec.Command("python3", "-c", "import sys; sys.path.insert(0, sys.argv[1]); import lfs_a, lfs_b; print(lfs_a.V, lfs_b.V)", glib).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "lfs_a 2.0 lfs_b 2.0" {
		t.Fatalf("a program started after the publish: %s %v", out, err)
	}
}
