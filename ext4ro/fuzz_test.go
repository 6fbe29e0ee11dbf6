package ext4ro

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// The fuzz targets feed mutated structures to the decoders inside a real
// image (testdata/seed-*.img.gz, made by testdata/mkseeds.sh) and then use
// the result every way a FUSE server would. They must never panic, hang or
// allocate without bound; errors are expected.

func seedImages(t testing.TB) map[string][]byte {
	t.Helper()
	paths, err := filepath.Glob("testdata/seed-*.img.gz")
	if err != nil || len(paths) == 0 {
		t.Fatalf("no seed images: %v", err)
	}
	imgs := make(map[string][]byte)
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		z, err := gzip.NewReader(f)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(z)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		imgs[filepath.Base(p)] = b
	}
	return imgs
}

// overlay is an image with some bytes replaced.
type overlay struct {
	base []byte
	off  int64
	data []byte
}

func (o *overlay) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(o.base)) {
		return 0, io.EOF
	}
	n := copy(p, o.base[off:])
	// Replace the part of [off, off+n) that overlaps [o.off, o.off+len(data)).
	s, e := max(off, o.off), min(off+int64(n), o.off+int64(len(o.data)))
	if s < e {
		copy(p[s-off:e-off], o.data[s-o.off:e-o.off])
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// exercise uses f the way the FUSE layer does, from inode ino, visiting at
// most budget inodes.
func exercise(f *FS, ino uint32, budget *int) {
	if *budget <= 0 {
		return
	}
	*budget--
	in, err := f.Inode(ino)
	if err != nil {
		return
	}
	_, _ = f.ListXattr(in)
	for _, n := range []string{"user.big", "user.small", "system.posix_acl_access", "security.selinux"} {
		_, _ = f.GetXattr(in, n)
	}
	buf := make([]byte, 8192)
	switch in.Mode & S_IFMT {
	case S_IFREG:
		_, _ = f.ReadAt(in, buf, 0)
		_, _ = f.ReadAt(in, buf, 8190)
		_, _ = f.ReadAt(in, buf, int64(in.Size)-1)
	case S_IFLNK:
		_, _ = f.Readlink(in)
	case S_IFDIR:
		var kids []DirEntry
		_ = f.ReadDir(in, 0, func(e DirEntry) bool {
			kids = append(kids, e)
			return len(kids) < 300
		})
		for i, e := range kids {
			_, _ = f.Lookup(in, e.Name)
			if e.Name != "." && e.Name != ".." && i%8 == 0 {
				exercise(f, e.Ino, budget)
			}
		}
		_, _ = f.Lookup(in, "no-such-name")
		if len(kids) > 3 {
			_ = f.ReadDir(in, kids[len(kids)/2].Cookie+3, func(DirEntry) bool { return true })
		}
	}
}

func exerciseImage(r io.ReaderAt, size int64) {
	for _, skip := range []bool{true, false} {
		f, err := Open(r, &Options{Size: size, SkipChecksums: skip, CacheBytes: 1 << 20})
		if err != nil {
			continue
		}
		_ = f.Statfs()
		budget := 60
		exercise(f, RootIno, &budget)
	}
}

// locate finds, in the pristine seed, the byte offset of a structure.
type locator func(t testing.TB, f *FS) (off int64, size int)

func inodeAt(path string) locator {
	return func(t testing.TB, f *FS) (int64, int) {
		in := resolve(t, f, path)
		g, err := f.group((in.Ino - 1) / f.sb.InodesPerGroup)
		if err != nil {
			t.Fatal(err)
		}
		idx := uint64((in.Ino - 1) % f.sb.InodesPerGroup)
		return int64(g.inodeTable*f.bs + idx*uint64(f.sb.InodeSize)), int(f.sb.InodeSize)
	}
}

// fileBlock locates logical block lblk of the file or directory at path,
// or, with lblk < 0, the first extent tree block below the inode.
func fileBlock(path string, lblk int64) locator {
	return func(t testing.TB, f *FS) (int64, int) {
		in := resolve(t, f, path)
		if lblk < 0 {
			ib := in.iblock()
			if !in.hasExtents() || ib[6] == 0 && ib[7] == 0 {
				return -1, 0 // no tree block in this seed
			}
			blk := uint64(ib[16]) | uint64(ib[17])<<8 | uint64(ib[18])<<16 | uint64(ib[19])<<24
			return int64(blk * f.bs), int(f.bs)
		}
		var phys uint64
		_ = f.walkMap(in, uint64(lblk), uint64(lblk)+1, func(r run) error {
			phys = r.physical + uint64(lblk) - r.logical
			return errStop
		})
		if phys == 0 {
			return -1, 0
		}
		return int64(phys * f.bs), int(f.bs)
	}
}

func gdtAt(t testing.TB, f *FS) (int64, int) {
	return int64(f.descBlock(0) * f.bs), int(f.sb.DescSize) * int(f.sb.GroupCount())
}

// fuzzStructure fuzzes the bytes of one structure in every seed image.
func fuzzStructure(f *testing.F, loc locator) {
	type target struct {
		img  []byte
		off  int64
		size int
	}
	var targets []target
	for _, img := range seedImages(f) {
		fsys, err := Open(bytes.NewReader(img), nil)
		if err != nil {
			f.Fatal(err)
		}
		off, size := loc(f, fsys)
		if off < 0 {
			continue
		}
		targets = append(targets, target{img, off, size})
		f.Add(uint8(len(targets)-1), img[off:off+int64(size)])
	}
	f.Fuzz(func(t *testing.T, which uint8, data []byte) {
		tg := targets[int(which)%len(targets)]
		if len(data) > tg.size {
			data = data[:tg.size]
		}
		exerciseImage(&overlay{base: tg.img, off: tg.off, data: data}, int64(len(tg.img)))
	})
}

func FuzzSuperblock(f *testing.F) {
	for _, img := range seedImages(f) {
		f.Add(img[superblockOffset : superblockOffset+superblockSize])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		sb, err := parseSuperblock(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error is not ErrCorrupt: %v", err)
			}
			return
		}
		_ = sb.checkFeatures(false)
		if sb.GroupCount() == 0 || sb.BlockSize < 1024 {
			t.Fatalf("accepted a superblock with %d groups of %d-byte blocks", sb.GroupCount(), sb.BlockSize)
		}
	})
}

func FuzzGroupDescriptors(f *testing.F) { fuzzStructure(f, gdtAt) }
func FuzzInode(f *testing.F)            { fuzzStructure(f, inodeAt("small/sparse")) }
func FuzzDirInode(f *testing.F)         { fuzzStructure(f, inodeAt("dir")) }
func FuzzExtentNode(f *testing.F)       { fuzzStructure(f, fileBlock("small/sparse", -1)) }
func FuzzDirBlock(f *testing.F)         { fuzzStructure(f, fileBlock("dir", 1)) }
func FuzzHtreeRoot(f *testing.F)        { fuzzStructure(f, fileBlock("dir", 0)) }

// FuzzImage mutates whole small images.
func FuzzImage(f *testing.F) {
	for _, img := range seedImages(f) {
		f.Add(img)
	}
	f.Fuzz(func(t *testing.T, img []byte) {
		exerciseImage(bytes.NewReader(img), int64(len(img)))
	})
}
