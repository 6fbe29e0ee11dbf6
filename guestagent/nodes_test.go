package guestagent

import (
	"fmt"
	"testing"
)

// The node table follows the kernel's references, names what it holds by
// path, and gives memory back when the kernel lets go.
func TestNodes(t *testing.T) {
	n := newNodes()
	n.add(100, fuseRoot, "dir")
	n.add(200, 100, "file")
	n.add(200, 100, "file") // looked up again: two references
	if p := n.path(200); p != "/dir/file" {
		t.Fatalf("path %q", p)
	}
	n.forget(200, 1)
	if !n.has(200) {
		t.Fatal("dropped with a reference left")
	}
	n.add(200, 100, "renamed") // the same inode under a new name
	if p := n.path(200); p != "/dir/renamed" {
		t.Fatalf("path after a rename %q", p)
	}
	n.forget(200, 2)
	if n.has(200) || n.path(200) != "" {
		t.Fatal("kept after the kernel forgot it")
	}
	for i := range 10000 {
		n.add(uint64(1000+i), 100, fmt.Sprint("entry-", i))
	}
	for i := range 9990 {
		n.forget(uint64(1000+i), 1)
	}
	// Compacted once below a quarter of the peak (small tables stay).
	if n.len() != 11 || n.peak > 2500 || len(n.names) > 30000 {
		t.Fatalf("after forgetting: %d nodes, peak %d, %d bytes of names", n.len(), n.peak, len(n.names))
	}
	if p := n.path(1000 + 9995); p != "/dir/entry-9995" {
		t.Fatalf("path after compacting %q", p)
	}
	es := n.entries()
	if len(es) != 11 {
		t.Fatalf("%d entries", len(es))
	}
}
