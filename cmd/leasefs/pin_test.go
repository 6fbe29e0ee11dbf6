package main

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// A guest pins a kept generation, by number or by label, and stays on it
// while the host publishes past it (host --keep-generations, within the
// budget for kept files); one the host does not keep is refused with what
// it keeps; when the budget runs out the host says so before it drops
// the oldest pinned generation, and its guest moves to the newest.
func TestPinnedGenerations(t *testing.T) {
	mnt, dev, control, sock := keepingHost(t, "--keep-generations", "3", "--keep-replaced-files", "5")
	// put writes name as a sync tool does: a temporary file renamed over it.
	put := func(name, body string) {
		t.Helper()
		tmp := filepath.Join(mnt, "."+name+".tmp")
		if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(mnt, name)); err != nil {
			t.Fatal(err)
		}
	}
	publish := func(label string) {
		t.Helper()
		if out, err := leasefs(t, "publish", "--control", control, "--label", label, "mirror"); err != nil {
			t.Fatalf("publish %s: %v\n%s", label, err, out)
		}
	}
	read := func(dir, name string) string {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return "error: " + err.Error()
		}
		return string(b)
	}
	put("v", "r1")
	put("old", "only in r1 and r2")
	publish("r1")
	first := hostStatus(t, control).Exports[0].Generation
	put("v", "r2")
	put("w", "w of r2")
	publish("r2")
	put("v", "r3")
	put("w", "w of r3")
	if err := os.Remove(filepath.Join(mnt, "old")); err != nil {
		t.Fatal(err)
	}
	publish("r3")
	put("new", "since r4")
	publish("r4")

	// Generations 1 and 2 are beyond --keep-generations 3 but were kept
	// for no one; the first pins are of what the host keeps now.
	logA := filepath.Join(t.TempDir(), "a.log")
	a := guestMount(t, "--connect", sock, "--export", "mirror", "--device", dev, "--label", "r2", "--log", logA)
	b := guestMount(t, "--connect", sock, "--export", "mirror", "--generation", itoa(first+2))
	follower := guestMount(t, "--connect", sock, "--export", "mirror", "--device", dev)
	if out, err := leasefs(t, "guest", "--connect", sock, "--export", "mirror", "--generation", itoa(first), t.TempDir()); err == nil ||
		!strings.Contains(out, "does not keep generation "+itoa(first)) || !strings.Contains(out, "(r4)") {
		t.Errorf("a mount pinning a generation the host dropped: %v\n%s", err, out)
	}
	for _, c := range []struct{ dir, name, want string }{
		{a, "v", "r2"}, {a, "old", "only in r1 and r2"}, {b, "v", "r3"}, {follower, "v", "r3"}, {follower, "new", "since r4"},
	} {
		if got := read(c.dir, c.name); got != c.want {
			t.Errorf("%s/%s: %q, want %q", c.dir, c.name, got, c.want)
		}
	}
	if !exists(filepath.Join(follower, "new")) || exists(filepath.Join(a, "new")) {
		t.Errorf("the pinned guest sees what came after its generation")
	}
	if st := guestStatus(t, a); !st.Pinned || st.Label != "r2" {
		t.Errorf("the pinned guest's status: pinned %v, label %q", st.Pinned, st.Label)
	}
	if out, _ := leasefs(t, "guest", "status", a); !strings.Contains(out, "PINNED") {
		t.Errorf("guest status:\n%s", out)
	}

	// An upgrade in place hands the kept files and the pins over: a file
	// of r2 replaced since, opened only now, reads as r2 had it.
	if out, err := leasefs(t, "host", "--upgrade", "--control", control); err != nil || !strings.Contains(out, "upgraded:") {
		t.Fatalf("upgrade: %v\n%s", err, out)
	}
	if got := read(a, "w"); got != "w of r2" {
		t.Errorf("after the upgrade, a file of the pinned r2 replaced before it: %q", got)
	}
	if out, _ := leasefs(t, "status", "--control", control); !strings.Contains(out, "(r2, pinned by 1)") {
		t.Errorf("status after the upgrade:\n%s", out)
	}

	// Past --keep-generations, pinned generations stay.
	put("v", "r5")
	publish("r5")
	put("v", "r6")
	publish("r6")
	if got := read(follower, "v"); got != "r6" {
		t.Errorf("the follower: %q", got)
	}
	for _, dir := range []string{a, b} {
		if st := guestStatus(t, dir); !st.Pinned {
			t.Errorf("%s is no longer pinned", dir)
		}
	}
	if got := read(b, "v"); got != "r3" {
		t.Errorf("pinned to r3, after r6: %q", got)
	}

	// Six replaced or deleted files now, past the budget of five: the
	// oldest pinned generation (r2) goes, and its guest is told first.
	put("v", "r7")
	publish("r7")
	waitFor(t, "the guest pinned to r2 moving on", func() bool { return !guestStatus(t, a).Pinned })
	logged, _ := os.ReadFile(logA)
	if !strings.Contains(string(logged), "the host drops the generation this mount is pinned to") {
		t.Errorf("the unpinned guest's log:\n%s", logged)
	}
	waitFor(t, "the unpinned guest reading the newest", func() bool { return read(a, "v") == "r7" })
	if exists(filepath.Join(a, "old")) {
		t.Errorf("the unpinned guest still sees r2's files")
	}
	st := hostStatus(t, control).Exports[0]
	kept := map[string]int{}
	for _, k := range st.KeptList {
		kept[k.Label] = k.Pinned
	}
	if _, ok := kept["r2"]; ok || kept["r3"] != 1 || st.KeptReplaced > 5 {
		t.Errorf("kept %d replaced files (budget 5) and generations %+v: want r3 pinned by one guest, r2 gone", st.KeptReplaced, st.KeptList)
	}
	if out, _ := leasefs(t, "status", "--control", control); !strings.Contains(out, "(r3, pinned by 1)") {
		t.Errorf("status:\n%s", out)
	}
}

func itoa(n uint64) string { return strconv.FormatUint(n, 10) }

// keepingHost starts a host agent exporting a new filesystem as
// "mirror", publishing only when told, with the flags keep, and returns
// the export's mount and device and the agent's control and guest
// addresses.
func keepingHost(t *testing.T, keep ...string) (mnt, dev, control, sock string) {
	mnt, dev = hostExport(t)
	run := t.TempDir()
	t.Setenv("LEASEFS_RUN_DIR", filepath.Join(run, "guests"))
	control, sock = "unix:"+filepath.Join(run, "control.sock"), "unix:"+filepath.Join(run, "guest.sock")
	newAgent(t, mnt, append([]string{"host", "--export", "mirror=" + dev + ":" + mnt, "--listen", sock, "--control", control,
		"--state-dir", filepath.Join(run, "state"), "--auto-publish", "off"}, keep...)...)
	return mnt, dev, control, sock
}

// Every live mount has a .generations directory at its root, hidden from
// the root's listing unless --show-generations: a directory per kept
// generation, holding its tree as published, and a link per label. A
// file opened there is that generation's, even after the host drops it.
func TestGenerationsDirectory(t *testing.T) {
	mnt, dev, control, sock := keepingHost(t, "--keep-generations", "2")
	gens := map[string]uint64{}
	publishV := func(label, body string) {
		t.Helper()
		tmp := filepath.Join(mnt, ".v.tmp")
		if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(mnt, "v")); err != nil {
			t.Fatal(err)
		}
		if out, err := leasefs(t, "publish", "--control", control, "--label", label, "mirror"); err != nil {
			t.Fatalf("publish: %v\n%s", err, out)
		}
		gens[label] = hostStatus(t, control).Exports[0].Generation
	}
	publishV("r1", "one")
	publishV("r2", "two")
	publishV("r3", "three")
	hidden := guestMount(t, "--connect", sock, "--export", "mirror", "--device", dev)
	shown := guestMount(t, "--connect", sock, "--export", "mirror", "--show-generations")
	names := func(dir string) []string {
		t.Helper()
		ents, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var ns []string
		for _, e := range ents {
			ns = append(ns, e.Name())
		}
		return ns
	}
	if slices.Contains(names(hidden), ".generations") || !slices.Contains(names(shown), ".generations") {
		t.Errorf("root listings: hidden %v, shown %v", names(hidden), names(shown))
	}
	if n := names(shown); len(n) != len(slices.Compact(slices.Sorted(slices.Values(n)))) {
		t.Errorf("the shown root lists a name twice: %v", n)
	}
	r2, r3 := itoa(gens["r2"]), itoa(gens["r3"])
	for _, dir := range []string{hidden, shown} {
		g := filepath.Join(dir, ".generations")
		if got, want := names(g), []string{r2, r3, "r2", "r3"}; !slices.Equal(got, want) {
			t.Errorf("%s: %v, want %v", g, got, want)
		}
		for path, want := range map[string]string{r2 + "/v": "two", r3 + "/v": "three", "r2/v": "two", "../v": "three"} {
			if b, err := os.ReadFile(filepath.Join(g, path)); err != nil || string(b) != want {
				t.Errorf("%s/%s: %q %v, want %q", g, path, b, err, want)
			}
		}
		if target, err := os.Readlink(filepath.Join(g, "r2")); err != nil || target != r2 {
			t.Errorf("the label r2 links to %q %v", target, err)
		}
		if _, err := os.Stat(filepath.Join(g, itoa(gens["r1"]))); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("a dropped generation: %v", err)
		}
		if err := os.WriteFile(filepath.Join(g, r2, "w"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
			t.Errorf("a write under .generations: %v", err)
		}
	}
	// Held open, a file of r2 keeps its bytes once r2 is dropped; the
	// directory no longer lists it, and once closed it cannot be opened
	// there again.
	f, err := os.Open(filepath.Join(hidden, ".generations", r2, "v"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	publishV("r4", "four")
	waitFor(t, "r2 gone from .generations", func() bool { return !slices.Contains(names(filepath.Join(hidden, ".generations")), r2) })
	if b, err := io.ReadAll(f); err != nil || string(b) != "two" {
		t.Errorf("the held file of the dropped r2: %q %v", b, err)
	}
	if b, err := os.ReadFile(filepath.Join(hidden, "v")); err != nil || string(b) != "four" {
		t.Errorf("the mount itself: %q %v", b, err)
	}
	f.Close()
	if b, err := os.ReadFile(filepath.Join(hidden, ".generations", r2, "v")); err == nil {
		t.Errorf("a path into the dropped r2 still reads: %q", b)
	}
}
