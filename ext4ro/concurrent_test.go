package ext4ro

import (
	"crypto/sha256"
	"fmt"
	"io"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/leasefs/leasefs/internal/imgtest"
)

// summary describes a whole tree as read through f: every path with its
// inode number, size and a hash of its contents or target.
func summary(t testing.TB, f *FS) map[string]string {
	t.Helper()
	out := map[string]string{}
	var walk func(dir *Inode, p string)
	walk = func(dir *Inode, p string) {
		for _, e := range listDir(t, f, dir) {
			if e.Name == "." || e.Name == ".." {
				continue
			}
			in, err := f.Inode(e.Ino)
			if err != nil {
				t.Error(err)
				return
			}
			h := sha256.New()
			switch {
			case in.IsRegular():
				buf := make([]byte, 70000)
				for off := int64(0); ; off += int64(len(buf)) {
					n, err := f.ReadAt(in, buf, off)
					h.Write(buf[:n])
					if err == io.EOF {
						break
					}
					if err != nil {
						t.Error(err)
						return
					}
				}
			case in.IsSymlink():
				tgt, err := f.Readlink(in)
				if err != nil {
					t.Error(err)
				}
				h.Write(tgt)
			}
			q := path.Join(p, e.Name)
			out[q] = fmt.Sprintf("%d %d %x", in.Ino, in.Size, h.Sum(nil))
			if in.IsDir() {
				walk(in, q)
			}
		}
	}
	root, err := f.Inode(RootIno)
	if err != nil {
		t.Fatal(err)
	}
	walk(root, "")
	return out
}

// TestConcurrentReaders: many goroutines walking, looking up and reading
// one FS at once, with a cache small enough to evict all the time, see
// exactly what one goroutine alone sees. Run it with -race.
func TestConcurrentReaders(t *testing.T) {
	imgtest.RequireTools(t, "mkfs.ext4", "e2fsck")
	src := t.TempDir()
	imgtest.Populate(t, src, imgtest.TreeSpec{Seed: 8, BlockSize: 1024, ManyEntries: 1500, NoSpecial: true})
	img := imgtest.Mkfs(t, "ext4", src, 64, "-b", "1024", "-O", ext4Features)
	imgtest.Fsck(t, img, "-yD")
	want := summary(t, openImage(t, img, nil))

	f := openImage(t, img, &Options{CacheBytes: 64 << 10}) // 64 blocks
	var wg sync.WaitGroup
	results := make([]map[string]string, 8)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = summary(t, f)
		}()
	}
	// Lookups by path race with the walks.
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := range want {
				in := resolve(t, f, filepath.ToSlash(p))
				if fmt.Sprint(in.Ino) != strings.Fields(want[p])[0] {
					t.Errorf("%s: inode %d", p, in.Ino)
				}
			}
		}()
	}
	wg.Wait()
	for i, got := range results {
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("reader %d saw a different tree (%d entries, want %d)", i, len(got), len(want))
		}
	}
}
