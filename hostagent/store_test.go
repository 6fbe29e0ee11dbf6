package hostagent

import (
	"bytes"
	"encoding/binary"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
)

func newTestStore(t *testing.T) *Store {
	t.Helper()
	s, err := NewStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// block makes a distinct 4 KiB block.
func block(n int) []byte {
	p := make([]byte, 4096)
	binary.LittleEndian.PutUint64(p, uint64(n))
	binary.LittleEndian.PutUint64(p[4088:], ^uint64(n))
	return p
}

func mustGet(t *testing.T, s *Store, h Hash) []byte {
	t.Helper()
	p, err := s.get(h)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Blocks read back the same before and after they are written out, are
// kept once however often they are put, and go with their last reference,
// their place in the file taken by the next new block.
func TestStoreKeepsBlocksByContent(t *testing.T) {
	s := newTestStore(t)
	a, b := s.put(block(1)), s.put(block(2))
	if s.put(block(1)) != a {
		t.Fatal("the same bytes got another hash")
	}
	if n, bytes := s.Size(); n != 2 || bytes != 8192 {
		t.Fatalf("size %d blocks, %d bytes", n, bytes)
	}
	check := func(when string) {
		t.Helper()
		if !bytes.Equal(mustGet(t, s, a), block(1)) || !bytes.Equal(mustGet(t, s, b), block(2)) {
			t.Fatalf("%s: a block reads back wrong", when)
		}
	}
	check("pending")
	if err := s.flush(); err != nil {
		t.Fatal(err)
	}
	check("written")
	s.hot.Purge()
	check("read from the file")

	s.unref(b)
	if _, err := s.get(b); err == nil {
		t.Fatal("a block with no references is still there")
	}
	c := s.put(block(3)) // takes b's place
	if err := s.flush(); err != nil {
		t.Fatal(err)
	}
	s.hot.Purge()
	if !bytes.Equal(mustGet(t, s, c), block(3)) || !bytes.Equal(mustGet(t, s, a), block(1)) {
		t.Fatal("a reused place reads back wrong")
	}
	if st, _ := s.file.Stat(); st.Size() != 8192 {
		t.Fatalf("the file is %d bytes for two blocks", st.Size())
	}
	s.unref(a)
	if mustGet(t, s, a) == nil || !s.has(a) {
		t.Fatal("a block went with references left")
	}
	s.unref(a)
	if s.has(a) {
		t.Fatal("a block outlived its references")
	}
}

// A block dropped before it was written out gives its place in the file
// to the next new block.
func TestStoreDropsPendingBlocks(t *testing.T) {
	s := newTestStore(t)
	a := s.put(block(1))
	s.unref(a)
	b := s.put(block(2))
	if err := s.flush(); err != nil {
		t.Fatal(err)
	}
	s.hot.Purge()
	if !bytes.Equal(mustGet(t, s, b), block(2)) {
		t.Fatal("a dropped block was written over a live one")
	}
}

// A store that cannot write keeps the blocks in memory, readable, and
// says so; once it can, they are written.
func TestStoreWriteFailureLosesNothing(t *testing.T) {
	s := newTestStore(t)
	good := s.file
	ro, err := os.Open("/proc/self/exe") // any file it cannot write
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	s.file = ro
	h := s.put(block(7))
	if err := s.flush(); err == nil {
		t.Fatal("a failed write was not reported")
	}
	if !bytes.Equal(mustGet(t, s, h), block(7)) {
		t.Fatal("a block that could not be written is lost")
	}
	s.file = good
	if err := s.flush(); err != nil {
		t.Fatal(err)
	}
	s.hot.Purge()
	if !bytes.Equal(mustGet(t, s, h), block(7)) {
		t.Fatal("a block written late reads back wrong")
	}
}

// The blocks live in the file, not the agent's memory: 64 MiB of them
// leave the heap with no more than its cache of hot blocks.
func TestStoreBlocksAreNotInMemory(t *testing.T) {
	s := newTestStore(t)
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	hs := make([]Hash, 0, 16384)
	for i := range 16384 {
		hs = append(hs, s.put(block(i)))
		if i%1024 == 1023 {
			if err := s.flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i, h := range hs { // read them all back: the cache stays its size
		if binary.LittleEndian.Uint64(mustGet(t, s, h)) != uint64(i) {
			t.Fatalf("block %d reads back wrong", i)
		}
	}
	grew := int64(heap()) - int64(before)
	limit := int64(hotBlocks*4096 + 8<<20) // the cache, and the index
	t.Logf("64 MiB stored; the heap grew %d MiB", grew>>20)
	if grew > limit {
		t.Fatalf("the heap grew %d MiB for 64 MiB of blocks (limit %d MiB)", grew>>20, limit>>20)
	}
	runtime.KeepAlive(hs)
}

// Readers, writers and drops at once (run with -race).
func TestStoreConcurrent(t *testing.T) {
	s := newTestStore(t)
	var kept []Hash
	for i := range 512 {
		kept = append(kept, s.put(block(i)))
	}
	if err := s.flush(); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for r := range 4 {
		wg.Go(func() {
			for i := range 5000 {
				n := (i*7 + r) % len(kept)
				p, err := s.get(kept[n])
				if err != nil || binary.LittleEndian.Uint64(p) != uint64(n) {
					t.Errorf("block %d: %v", n, err)
					return
				}
			}
		})
	}
	wg.Go(func() {
		for i := range 3000 {
			h := s.put(block(100000 + i))
			if i%50 == 0 {
				if err := s.flush(); err != nil {
					t.Error(err)
				}
			}
			s.unref(h)
		}
	})
	wg.Wait()
}

func TestCompareVersions(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want int
	}{
		{"9", "10", -1}, {"r9", "r10", -1}, {"20261201", "20261202", -1}, {"1.2.10", "1.2.9", 1},
		{"v1", "v1", 0}, {"v01", "v1", 0}, {"a", "b", -1}, {"1.2", "1.2.1", -1}, {"2026-12-01T08", "2026-12-01T10", -1},
	} {
		if got := compareVersions(c.a, c.b); got != c.want {
			t.Errorf("compareVersions(%q, %q) = %d, want %d", c.a, c.b, got, c.want)
		}
		if got := compareVersions(c.b, c.a); got != -c.want {
			t.Errorf("compareVersions(%q, %q) = %d, want %d", c.b, c.a, got, -c.want)
		}
	}
	for _, bad := range []string{"two words", "tab\tx", "new\nline", strings.Repeat("x", 129)} {
		if checkLabel(bad) == nil {
			t.Errorf("label %q accepted", bad)
		}
	}
}

// An automatic publish that finds nothing changed makes no generation,
// and keeps no reference to the blocks it read (it kept one to every
// block of the export, each time: none could ever be freed).
func TestEmptyPublishKeepsNoReferences(t *testing.T) {
	_, e, g := publishedFile(t)
	refs := func() map[Hash]int {
		e.store.mu.Lock()
		defer e.store.mu.Unlock()
		m := map[Hash]int{}
		for _, h := range g.blocks {
			m[h] = e.store.blocks[h].refs
		}
		return m
	}
	before := refs()
	for range 3 {
		if ng, err := e.PublishIfChanged(); err != nil || ng != nil {
			t.Fatalf("nothing changed: %v, %v", ng, err)
		}
	}
	after := refs()
	for h, n := range before {
		if after[h] != n {
			t.Fatalf("block %x: %d references before three empty publishes, %d after", h[:6], n, after[h])
		}
	}
}
