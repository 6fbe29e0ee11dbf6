package guestagent

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// The guest holds a node for exactly what the kernel holds: a walk adds
// them, the kernel's forgetting (here, dropping its caches) removes them,
// and the metadata cache never holds more than its bound.
func TestMemoryFollowsTheKernel(t *testing.T) {
	h := startHost(t, 3*time.Second)
	for d := range 10 {
		dir := filepath.Join(h.Mnt, fmt.Sprint("d", d))
		os.Mkdir(dir, 0o755)
		for i := range 300 {
			os.WriteFile(filepath.Join(dir, fmt.Sprint("f", i)), []byte("x"), 0o644)
		}
	}
	h.Publish(t)
	g := startGuestWith(t, h, ClientConfig{Device: h.Img, CacheBytes: 256 << 10})
	walk := func() int {
		n := 0
		filepath.WalkDir(g.dir, func(p string, d os.DirEntry, err error) error {
			if err == nil {
				if _, err := d.Info(); err == nil {
					n++
				}
			}
			return nil
		})
		return n
	}
	if n := walk(); n < 3010 {
		t.Fatalf("walked %d entries", n)
	}
	if n := g.c.FileSystem().Nodes(); n < 3010 {
		t.Fatalf("the guest counts %d nodes after a walk of 3,011", n)
	}
	cs := g.c.Status().Cache
	if cs.Blocks > cs.LimitBlocks || cs.LimitBlocks != 64 || cs.Misses == 0 {
		t.Fatalf("cache %+v: over its bound of 64 blocks, or never missed", cs)
	}
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("2"), 0); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for g.c.FileSystem().Nodes() > 100 {
		if time.Now().After(deadline) {
			t.Fatalf("the kernel dropped its caches; the guest still counts %d nodes", g.c.FileSystem().Nodes())
		}
		time.Sleep(20 * time.Millisecond)
	}
	// What the guest forgot, it serves again, and a publish that changes
	// everything finds what the kernel holds.
	h.Write(t, "d3/f7", "changed")
	gen := h.Publish(t)
	g.waitFor(t, gen)
	if got := g.read(t, "d3/f7"); got != "changed" {
		t.Fatalf("read %q", got)
	}
	if n := walk(); n < 3010 {
		t.Fatalf("walked %d entries the second time", n)
	}
}
