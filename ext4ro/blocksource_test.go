package ext4ro

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/leasefs/leasefs/internal/imgtest"
)

// blockFile is a metadata reader with blocks of its own: it counts how
// often each block is asked for.
type blockFile struct {
	*os.File
	bs int64

	mu    sync.Mutex
	asked map[uint64]int
}

func (b *blockFile) ReadBlock(n, ahead uint64) ([]byte, error) {
	if ahead < 1 {
		return nil, fmt.Errorf("ahead %d", ahead)
	}
	p := make([]byte, b.bs)
	if _, err := b.ReadAt(p, int64(n)*b.bs); err != nil {
		return nil, err
	}
	b.mu.Lock()
	b.asked[n]++
	b.mu.Unlock()
	return p, nil
}

// An FS over a BlockSource keeps no cache: every block comes from the
// source, and it reads the same tree as an FS over the plain file.
func TestBlockSource(t *testing.T) {
	imgtest.RequireTools(t, "mkfs.ext4", "e2fsck")
	src := t.TempDir()
	manyNames(t, filepath.Join(src, "d"), 500, false)
	if err := os.WriteFile(filepath.Join(src, "f"), []byte("some content"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := imgtest.Mkfs(t, "ext4", src, 32, "-b", "1024", "-O", ext4Features)
	imgtest.Fsck(t, img, "-yD")
	plain := openImage(t, img, nil)
	file, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	bf := &blockFile{File: file, bs: 1024, asked: map[uint64]int{}}
	f, err := Open(bf, &Options{CacheBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	if f.cache != nil {
		t.Fatal("an FS over a BlockSource keeps a cache of its own")
	}
	for range 2 {
		want, got := listDir(t, plain, resolve(t, plain, "d")), listDir(t, f, resolve(t, f, "d"))
		if fmt.Sprint(want) != fmt.Sprint(got) {
			t.Fatal("listings differ")
		}
		for _, e := range got[2:] {
			if _, err := f.Lookup(resolve(t, f, "d"), e.Name); err != nil {
				t.Fatalf("lookup %q: %v", e.Name, err)
			}
		}
	}
	in := resolve(t, f, "f")
	p := make([]byte, 100)
	n, _ := f.ReadAt(in, p, 0)
	if string(p[:n]) != "some content" {
		t.Fatalf("read %q", p[:n])
	}
	bf.mu.Lock()
	defer bf.mu.Unlock()
	again := 0
	for _, c := range bf.asked {
		if c > 1 {
			again++
		}
	}
	if again == 0 {
		t.Fatal("no block was asked for twice: the FS cached them itself")
	}
}
