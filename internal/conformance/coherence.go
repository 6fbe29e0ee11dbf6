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
	// A directory of its own, so that the step can run again on the
	// same export.
	name := fmt.Sprintf("coherence-%d", time.Now().UnixNano())
	w := func(n string) string { return filepath.Join(live.Writer, name, n) }
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	held := map[string][]byte{
		"replaced": bytes.Repeat([]byte("the replaced file's old bytes\n"), 3000),
		"deleted":  bytes.Repeat([]byte("deleted, and still read\n"), 5000),
		"kept":     []byte("unchanged\n"),
	}
	must(os.Mkdir(filepath.Join(live.Writer, name), 0o755))
	for n, b := range held {
		must(os.WriteFile(w(n), b, 0o644))
	}
	must(os.WriteFile(w("moved"), []byte("moved\n"), 0o644))
	live.Publish(t)
	waitShown(t, mounts, filepath.Join(name, "kept"))

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
		for n, b := range held {
			f, err := os.Open(filepath.Join(m, name, n))
			if err != nil {
				t.Fatalf("before the change: %v", err)
			}
			opens = append(opens, open{f, b})
		}
	}

	must(os.WriteFile(w("replaced.new"), []byte("the new version\n"), 0o644))
	must(os.Rename(w("replaced.new"), w("replaced")))
	must(os.Remove(w("deleted")))
	must(os.Rename(w("moved"), w("moved-here")))
	must(os.Mkdir(w("new-dir"), 0o755))
	must(os.WriteFile(w("new-dir/child"), []byte("a new child\n"), 0o644))
	must(os.WriteFile(w("added"), []byte("added\n"), 0o644))
	live.Publish(t)
	waitShown(t, mounts, filepath.Join(name, "added"))

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

// waitShown waits until every mount shows rel: each has moved to the
// generation just published.
func waitShown(t *testing.T, mounts []string, rel string) {
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
