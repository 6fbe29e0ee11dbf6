package ext4ro

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/layout"
)

// recorder is a metadata reader that notes every block read through it.
type recorder struct {
	f  *os.File
	bs int64
	mu sync.Mutex
	in map[uint64]bool
}

func (r *recorder) ReadAt(p []byte, off int64) (int, error) {
	r.mu.Lock()
	for b := off / r.bs; b*r.bs < off+int64(len(p)); b++ {
		r.in[uint64(b)] = true
	}
	r.mu.Unlock()
	return r.f.ReadAt(p, off)
}

// everything reads all a FUSE server could ask of f, and returns every
// inode reached.
func everything(t *testing.T, f *FS) []*Inode {
	t.Helper()
	root, err := f.Inode(RootIno)
	if err != nil {
		t.Fatal(err)
	}
	all := []*Inode{root}
	for i := 0; i < len(all); i++ {
		in := all[i]
		if names, err := f.ListXattr(in); err == nil {
			for _, n := range names {
				if _, err := f.GetXattr(in, n); err != nil {
					t.Fatalf("inode %d xattr %s: %v", in.Ino, n, err)
				}
			}
		}
		switch {
		case in.IsSymlink():
			if _, err := f.Readlink(in); err != nil {
				t.Fatal(err)
			}
		case in.IsRegular():
			if _, err := f.Map(in); err != nil {
				t.Fatal(err)
			}
		case in.IsDir():
			for _, e := range listDir(t, f, in) {
				if e.Name == "." || e.Name == ".." {
					continue
				}
				if _, err := f.Lookup(in, e.Name); err != nil {
					t.Fatalf("lookup %q: %v", e.Name, err)
				}
				c, err := f.Inode(e.Ino)
				if err != nil {
					t.Fatal(err)
				}
				if c.IsDir() || c.Ino != in.Ino {
					all = append(all, c)
				}
			}
		}
	}
	return all
}

var mappingImages = []struct {
	name, fstype string
	args         []string
	bs           int
	htree        bool
}{
	{"ext4", "ext4", []string{"-O", ext4Features}, 4096, true},
	{"ext4-inline", "ext4", []string{"-O", ext4Features + ",inline_data", "-I", "1024"}, 4096, false},
	{"ext2-1k", "ext2", []string{"-I", "128"}, 1024, true},
}

func mappingImage(t *testing.T, i int) string {
	c := mappingImages[i]
	src := t.TempDir()
	imgtest.Populate(t, src, imgtest.TreeSpec{Seed: 5, BlockSize: c.bs, ManyEntries: 3000, FarSparse: 70 << 20})
	img := imgtest.Mkfs(t, c.fstype, src, 128, append([]string{"-b", fmt.Sprint(c.bs)}, c.args...)...)
	if c.htree {
		imgtest.Fsck(t, img, "-yD")
	}
	return img
}

// Every block read through the metadata reader is the superblock, a
// group descriptor block, an inode table block or one that MetaBlocks
// lists for an inode read: a host that serves exactly those blocks of a
// generation serves everything a guest will ask for.
func TestMetaBlocksCoverEveryMetadataRead(t *testing.T) {
	imgtest.RequireTools(t, "mkfs.ext4", "mkfs.ext2", "e2fsck")
	for i, c := range mappingImages {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			img := mappingImage(t, i)
			file, err := os.Open(img)
			if err != nil {
				t.Fatal(err)
			}
			defer file.Close()
			rec := &recorder{f: file, bs: int64(c.bs), in: map[uint64]bool{}}
			f, err := Open(rec, &Options{Data: file})
			if err != nil {
				t.Fatal(err)
			}
			inodes := everything(t, f)
			rec.mu.Lock()
			read := rec.in
			rec.in = map[uint64]bool{}
			rec.mu.Unlock()

			allowed := map[uint64]bool{uint64(1024 / c.bs): true}
			for _, b := range f.DescriptorBlocks() {
				allowed[b] = true
			}
			sb := f.Superblock()
			for g := range sb.GroupCount() {
				start, used, err := f.InodeTable(g)
				if err != nil {
					t.Fatal(err)
				}
				for b := range used {
					allowed[start+b] = true
				}
			}
			listed := 0
			for _, in := range inodes {
				mine := 0
				if err := f.MetaBlocks(in, func(start, n uint64) {
					for b := start; b < start+n; b++ {
						allowed[b] = true
						mine++
					}
				}); err != nil {
					t.Fatal(err)
				}
				listed += mine
				if mine > 0 && !HasMetaBlocks(in.raw) {
					t.Errorf("inode %d has %d MetaBlocks, but HasMetaBlocks says none", in.Ino, mine)
				}
			}
			for b := range read {
				if !allowed[b] {
					t.Errorf("block %d was read as metadata but is not listed", b)
				}
			}
			t.Logf("%d inodes, %d blocks read as metadata, %d listed by MetaBlocks", len(inodes), len(read), listed)
			if listed == 0 {
				t.Fatal("MetaBlocks listed nothing")
			}
		})
	}
}

// Map agrees with the kernel's FIEMAP for every regular file.
func TestMapMatchesFIEMAP(t *testing.T) {
	imgtest.RequireTools(t, "mkfs.ext4", "mkfs.ext2", "e2fsck")
	for i, c := range mappingImages {
		t.Run(c.name, func(t *testing.T) {
			img := mappingImage(t, i)
			f := openImage(t, img, nil)
			mnt := imgtest.KernelMount(t, img, "ro")
			n := 0
			err := filepath.Walk(mnt, func(path string, fi os.FileInfo, err error) error {
				if err != nil || !fi.Mode().IsRegular() {
					return err
				}
				rel, _ := filepath.Rel(mnt, path)
				m, err := f.Map(resolve(t, f, filepath.ToSlash(rel)))
				if err != nil {
					return err
				}
				fd, err := unix.Open(path, unix.O_RDONLY, 0)
				if err != nil {
					return err
				}
				defer unix.Close(fd)
				want, err := layout.Fiemap(fd, uint64(c.bs))
				if err != nil {
					return err
				}
				if layout.Hash(m) != layout.Hash(want) {
					return fmt.Errorf("%s: Map %v, FIEMAP %v", rel, m, want)
				}
				n++
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%d files compared", n)
		})
	}
}

// An OpenFile reads exactly what FS.ReadAt reads, at any offset.
func TestOpenFileReadsLikeReadAt(t *testing.T) {
	imgtest.RequireTools(t, "mkfs.ext4", "mkfs.ext2", "e2fsck")
	for i, c := range mappingImages {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			f := openImage(t, mappingImage(t, i), nil)
			n := 0
			for _, in := range everythingFiles(t, f) {
				fl, err := f.OpenFile(in)
				if err != nil {
					t.Fatal(err)
				}
				for _, off := range []int64{0, 1, int64(in.Size) / 3, int64(in.Size) - 5000, int64(in.Size) - 1, int64(in.Size), int64(in.Size) + 9} {
					if off < 0 {
						continue
					}
					a, b := make([]byte, 9000), make([]byte, 9000)
					na, ea := f.ReadAt(in, a, off)
					nb, eb := fl.ReadAt(b, off)
					if na != nb || (ea == nil) != (eb == nil) || !bytes.Equal(a[:na], b[:nb]) {
						t.Fatalf("inode %d at %d: ReadAt %d %v, OpenFile %d %v", in.Ino, off, na, ea, nb, eb)
					}
				}
				n++
			}
			t.Logf("%d files", n)
		})
	}
}

func everythingFiles(t *testing.T, f *FS) []*Inode {
	var files []*Inode
	root, _ := f.Inode(RootIno)
	dirs := []*Inode{root}
	for len(dirs) > 0 {
		d := dirs[0]
		dirs = dirs[1:]
		for _, e := range listDir(t, f, d) {
			if e.Name == "." || e.Name == ".." {
				continue
			}
			in, err := f.Inode(e.Ino)
			if err != nil {
				t.Fatal(err)
			}
			switch {
			case in.IsDir():
				dirs = append(dirs, in)
			case in.IsRegular():
				files = append(files, in)
			}
		}
	}
	return files
}
