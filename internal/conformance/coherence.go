package conformance

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/imgtest"
)

// Live is what the coherence step needs of a live export: where its
// writer writes, how to publish what it wrote, and an oracle that shows
// the export as the writer left it (a read-only view of the same mount).
type Live struct {
	Writer  string
	Oracle  string
	Publish func(t *testing.T)
}

// Coherence is what leasefs exists for, checked on every mount at once:
// files are opened on each mount, the writer replaces one the way
// package managers do (a new file renamed over it), deletes another,
// moves a third and adds files and a directory, and publishes. Then every
// mount's whole tree is the oracle's, and every file held open across
// the change still reads its bytes from before it, whole.
func Coherence(t *testing.T, live Live, mounts ...string) {
	t.Helper()
	c := Prepare(t, live)
	WaitShown(t, mounts, c.Before)
	type open struct {
		f    *os.File
		want []byte
	}
	var opens []open
	defer func() {
		for _, o := range opens {
			o.f.Close()
		}
	}()
	for _, m := range mounts {
		for n, b := range c.Held {
			f, err := os.Open(filepath.Join(m, c.Dir, n))
			if err != nil {
				t.Fatalf("before the change: %v", err)
			}
			opens = append(opens, open{f, b})
		}
	}
	c.Apply(t)
	WaitShown(t, mounts, c.After)

	want := imgtest.Snapshot(t, live.Oracle)
	for i, m := range mounts {
		t.Run(fmt.Sprintf("mount %d", i+1), func(t *testing.T) {
			imgtest.Compare(t, want, imgtest.Snapshot(t, m))
		})
	}
	for _, o := range opens {
		got := make([]byte, len(o.want)+1)
		n, err := o.f.ReadAt(got, 0)
		if n != len(o.want) || !bytes.Equal(got[:n], o.want) {
			t.Errorf("%s, open across the change: read %d bytes (%v), want its %d bytes from before", o.f.Name(), n, err, len(o.want))
		}
	}
}

// A Change is the coherence step in its parts, for mounts a test reaches
// only through something else (a VM's): Prepare writes the files to hold
// and publishes them; once every mount shows Before, the test opens each
// of Held on every mount (under Dir); Apply changes the tree and
// publishes; once every mount shows After, each mount's tree under Dir
// must be the oracle's, and each file held open read its bytes from
// before, whole.
type Change struct {
	Dir           string            // the step's directory, relative to the export's root
	Held          map[string][]byte // the files to hold open across the change, by name under Dir
	Before, After string            // a name that shows each publish, relative to the root
	live          Live
}

// Prepare writes the step's files in a directory of its own (so that
// it can run again on the same export) and publishes them.
func Prepare(t *testing.T, live Live) *Change {
	t.Helper()
	c := &Change{Dir: fmt.Sprintf("coherence-%d", time.Now().UnixNano()), live: live, Held: map[string][]byte{
		"replaced": bytes.Repeat([]byte("the replaced file's old bytes\n"), 3000),
		"deleted":  bytes.Repeat([]byte("deleted, and still read\n"), 5000),
		"kept":     []byte("unchanged\n"),
	}}
	c.Before, c.After = filepath.Join(c.Dir, "kept"), filepath.Join(c.Dir, "added")
	must(t, os.Mkdir(filepath.Join(live.Writer, c.Dir), 0o755))
	for n, b := range c.Held {
		must(t, os.WriteFile(c.path(n), b, 0o644))
	}
	must(t, os.WriteFile(c.path("moved"), []byte("moved\n"), 0o644))
	live.Publish(t)
	return c
}

// Apply makes the change and publishes it.
func (c *Change) Apply(t *testing.T) {
	t.Helper()
	must(t, os.WriteFile(c.path("replaced.new"), []byte("the new version\n"), 0o644))
	must(t, os.Rename(c.path("replaced.new"), c.path("replaced")))
	must(t, os.Remove(c.path("deleted")))
	must(t, os.Rename(c.path("moved"), c.path("moved-here")))
	must(t, os.Mkdir(c.path("new-dir"), 0o755))
	must(t, os.WriteFile(c.path("new-dir/child"), []byte("a new child\n"), 0o644))
	must(t, os.WriteFile(c.path("added"), []byte("added\n"), 0o644))
	c.live.Publish(t)
}

// Want is the oracle's tree under Dir.
func (c *Change) Want(t *testing.T) map[string]imgtest.Entry {
	return imgtest.Snapshot(t, filepath.Join(c.live.Oracle, c.Dir))
}

func (c *Change) path(name string) string { return filepath.Join(c.live.Writer, c.Dir, name) }

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// WaitShown waits until every mount shows rel: each has moved to the
// generation just published.
func WaitShown(t *testing.T, mounts []string, rel string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for _, m := range mounts {
		for {
			if _, err := os.Lstat(filepath.Join(m, rel)); err == nil {
				break
			} else if time.Now().After(deadline) {
				t.Fatalf("%s does not show %s after the publish: %v", m, rel, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}
