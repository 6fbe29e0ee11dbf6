package main

// A generation stays whole while guests are on it: what the writer
// replaces or deletes before the next publish still opens, with its
// bytes, in the generation the guests are on.

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// Between the writer's changes and the next publish, guests (device,
// and data through the host) open the files of their generation that
// the writer renamed a new file over and deleted, and read their old
// bytes — even after the disk was filled, so their blocks would have
// been reused. A file rewritten in place answers ESTALE. Once the guests
// are on a newer generation and the one before is dropped, the space
// comes back.
func TestReplacedFilesStayReadable(t *testing.T) {
	h, mnt, dev := startHostCmd(t)
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
	// goes, and with it what was kept for it.
	for i := range 2 {
		if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
			t.Fatalf("publish: %v\n%s", err, out)
		}
		if i == 0 {
			// Kept while the guests may still be on the generation before.
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
	mnt, dev := hostExport(t)
	run := t.TempDir()
	h := &hostProc{control: "unix:" + filepath.Join(run, "control.sock"), guest: "unix:" + filepath.Join(run, "guest.sock")}
	runHostCmd(t, h, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", h.guest, "--control", h.control,
		"--state-dir", filepath.Join(run, "state"), "--auto-publish", "off", "--keep-replaced-files", "1")
	for _, name := range []string{"a", "b"} {
		if err := os.WriteFile(filepath.Join(mnt, name), []byte(name+" first\n"), 0o644); err != nil {
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
	if b, err := os.ReadFile(filepath.Join(g, "a")); err != nil || string(b) != "a first\n" {
		t.Fatalf("before the publish, within the budget: %q %v", b, err)
	}
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	waitFor(t, "the budget's warning", func() bool { return strings.Contains(h.log.String(), "exceed their budget") })
	if st := hostStatus(t, h.control).Exports[0]; st.KeptReplaced != 0 || st.Kept != 1 {
		t.Errorf("after the publish past the budget: %d replaced files kept, %d generations", st.KeptReplaced, st.Kept)
	}
	b, err := os.ReadFile(filepath.Join(g, "b"))
	if err == nil && string(b) != "b second\n" || err != nil && !errors.Is(err, syscall.ESTALE) {
		t.Fatalf("b in the guest whose generation was dropped: %q %v; want its new bytes or ESTALE", b, err)
	}
}
