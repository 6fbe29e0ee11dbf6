package ext4ro

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// seed returns a pristine copy of a seed image and the FS over it.
func seed(t *testing.T, name string) ([]byte, *FS) {
	t.Helper()
	img := append([]byte(nil), seedImages(t)[name]...)
	f, err := Open(bytes.NewReader(img), nil)
	if err != nil {
		t.Fatal(err)
	}
	return img, f
}

func reopen(img []byte, opts *Options) (*FS, error) { return Open(bytes.NewReader(img), opts) }

// wantCorrupt checks that err is an ErrCorrupt whose message names all of
// the given fragments.
func wantCorrupt(t *testing.T, err error, fragments ...string) {
	t.Helper()
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("got %v, want ErrCorrupt", err)
	}
	for _, s := range fragments {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not name %q", err, s)
		}
	}
}

func fixSuperblockChecksum(img []byte) {
	sb := img[superblockOffset : superblockOffset+superblockSize]
	binary.LittleEndian.PutUint32(sb[0x3FC:], crc32c(^uint32(0), sb[:0x3FC]))
}

func TestCorruptSuperblock(t *testing.T) {
	img, _ := seed(t, "seed-ext4.img.gz")
	img[superblockOffset+0x78] ^= 1 // volume name: only the checksum notices
	_, err := reopen(img, nil)
	wantCorrupt(t, err, "superblock", "checksum")

	img, _ = seed(t, "seed-ext4.img.gz")
	img[superblockOffset+0x38] = 0 // magic
	_, err = reopen(img, nil)
	wantCorrupt(t, err, "superblock", "magic")

	img, _ = seed(t, "seed-ext4.img.gz")
	binary.LittleEndian.PutUint32(img[superblockOffset+0x28:], 0) // inodes per group
	fixSuperblockChecksum(img)
	_, err = reopen(img, nil)
	wantCorrupt(t, err, "inodes per group")
}

func TestOpenRefuses(t *testing.T) {
	img, f := seed(t, "seed-ext4.img.gz")
	if _, err := reopen(img[:len(img)/2], &Options{Size: int64(len(img) / 2)}); !errors.Is(err, ErrCorrupt) ||
		!strings.Contains(err.Error(), "truncated") {
		t.Errorf("half an image: %v, want a truncation error", err)
	}

	unknown := append([]byte(nil), img...)
	binary.LittleEndian.PutUint32(unknown[superblockOffset+0x60:], f.sb.FeatureIncompat|0x1000|0x80000000)
	fixSuperblockChecksum(unknown)
	_, err := reopen(unknown, nil)
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "dirdata") || !strings.Contains(err.Error(), "0x80000000") {
		t.Errorf("unknown features: %v, want ErrUnsupported naming dirdata and 0x80000000", err)
	}

	dirty := append([]byte(nil), img...)
	binary.LittleEndian.PutUint32(dirty[superblockOffset+0x60:], f.sb.FeatureIncompat|incompatRecover)
	fixSuperblockChecksum(dirty)
	if _, err := reopen(dirty, nil); !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "journal needs recovery") {
		t.Errorf("needs_recovery: %v, want a journal recovery error", err)
	}
	if _, err := reopen(dirty, &Options{AllowDirtyJournal: true}); err != nil {
		t.Errorf("needs_recovery with AllowDirtyJournal: %v", err)
	}
}

func TestCorruptGroupDescriptor(t *testing.T) {
	img, f := seed(t, "seed-ext4.img.gz")
	off, _ := gdtAt(t, f)
	img[off+0x10] ^= 0xff // used dirs count: only the checksum notices
	_, err := reopen(img, nil)
	wantCorrupt(t, err, "group descriptor 0", "checksum")
	if _, err := reopen(img, &Options{SkipChecksums: true}); err != nil {
		t.Errorf("with SkipChecksums: %v", err)
	}
}

func TestCorruptInode(t *testing.T) {
	img, f := seed(t, "seed-ext4.img.gz")
	in := resolve(t, f, "small/a")
	off, _ := inodeAt("small/a")(t, f)
	img[off+0x08] ^= 1 // atime
	g, _ := reopen(img, nil)
	_, err := g.Inode(in.Ino)
	wantCorrupt(t, err, "inode", fmt.Sprintf("inode %d", in.Ino), "checksum")
	g, _ = reopen(img, &Options{SkipChecksums: true})
	if _, err := g.Inode(in.Ino); err != nil {
		t.Errorf("with SkipChecksums: %v", err)
	}
}

func TestCorruptExtentBlock(t *testing.T) {
	img, f := seed(t, "seed-ext4.img.gz")
	in := resolve(t, f, "small/sparse")
	off, _ := fileBlock("small/sparse", -1)(t, f)
	if off < 0 {
		t.Fatal("the seed's sparse file has no extent block")
	}
	buf := make([]byte, 100)
	for _, c := range []struct {
		name     string
		at       int64
		val      byte
		skipCsum bool
		want     string
	}{
		{"checksum", 12 + 4, 0x55, false, "checksum"},
		{"magic", 0, 0, true, "bad magic"},
		{"entry count", 2, 0xff, true, "entries"},
		{"depth", 6, 3, true, "depth"},
	} {
		t.Run(c.name, func(t *testing.T) {
			bad := append([]byte(nil), img...)
			bad[off+c.at] = c.val
			g, _ := reopen(bad, &Options{SkipChecksums: c.skipCsum})
			bin, err := g.Inode(in.Ino)
			if err != nil {
				t.Fatal(err)
			}
			_, err = g.ReadAt(bin, buf, 0)
			wantCorrupt(t, err, fmt.Sprintf("inode %d", in.Ino), c.want)
		})
	}
}

func TestCorruptDirectory(t *testing.T) {
	img, f := seed(t, "seed-ext4.img.gz")
	dir := resolve(t, f, "dir")
	off, _ := fileBlock("dir", 1)(t, f)

	// A leaf's checksum.
	bad := append([]byte(nil), img...)
	bad[off+20] ^= 1
	g, _ := reopen(bad, nil)
	err := g.ReadDir(dir, 0, func(DirEntry) bool { return true })
	wantCorrupt(t, err, "directory block", fmt.Sprintf("inode %d", dir.Ino), fmt.Sprintf("block %d", off/int64(f.bs)))

	// A record length running past the block.
	bad = append([]byte(nil), img...)
	binary.LittleEndian.PutUint16(bad[off+4:], 0xfff0)
	g, _ = reopen(bad, &Options{SkipChecksums: true})
	err = g.ReadDir(dir, 0, func(DirEntry) bool { return true })
	wantCorrupt(t, err, "directory entry", "record length")
}

// TestDamagedIndexFallsBack: a directory whose htree cannot be used is
// searched linearly, and every name is still found.
func TestDamagedIndexFallsBack(t *testing.T) {
	img, f := seed(t, "seed-ext4.img.gz")
	dir := resolve(t, f, "dir")
	names := listDir(t, f, dir)
	off, _ := fileBlock("dir", 0)(t, f)
	img[off+dxRootInfoOff+4] = 0x7f // an unknown hash version
	g, _ := reopen(img, &Options{SkipChecksums: true})
	for _, e := range names[2:] {
		got, err := g.Lookup(dir, e.Name)
		if err != nil || got.Ino != e.Ino {
			t.Fatalf("lookup %q with a damaged index: %v", e.Name, err)
		}
	}
	if n := g.Stats().HtreeFallbacks; n != uint64(len(names)-2) {
		t.Fatalf("%d fallbacks, want %d", n, len(names)-2)
	}
}

func TestCorruptXattrBlock(t *testing.T) {
	img, f := seed(t, "seed-ext4.img.gz")
	in := resolve(t, f, "small/a")
	if in.XattrBlock == 0 {
		t.Fatal("the seed's small/a has no xattr block")
	}
	img[in.XattrBlock*f.bs+40] ^= 1
	g, _ := reopen(img, nil)
	_, err := g.GetXattr(in, "user.big")
	wantCorrupt(t, err, "xattr block", fmt.Sprintf("inode %d", in.Ino), "checksum")
}

// TestBadArguments: names and numbers from outside are checked first.
func TestBadArguments(t *testing.T) {
	_, f := seed(t, "seed-ext4.img.gz")
	root := resolve(t, f, "")
	for name, want := range map[string]error{
		"":                       ErrInvalid,
		"a/b":                    ErrInvalid,
		"nul\x00":                ErrInvalid,
		strings.Repeat("x", 256): ErrNameTooLong,
	} {
		if _, err := f.Lookup(root, name); !errors.Is(err, want) {
			t.Errorf("lookup %q: %v, want %v", name, err, want)
		}
	}
	for _, ino := range []uint32{0, f.sb.InodesCount + 1, ^uint32(0)} {
		if _, err := f.Inode(ino); !errors.Is(err, ErrInvalid) {
			t.Errorf("inode %d: %v, want ErrInvalid", ino, err)
		}
	}
	if _, err := f.Inode(f.sb.InodesCount); !errors.Is(err, ErrNotExist) {
		t.Errorf("an unused inode: %v, want ErrNotExist", err)
	}
	file := resolve(t, f, "small/a")
	if _, err := f.ReadAt(file, make([]byte, 1), -1); !errors.Is(err, ErrInvalid) {
		t.Errorf("negative offset: %v", err)
	}
	if _, err := f.ReadAt(root, make([]byte, 1), 0); !errors.Is(err, ErrIsDir) {
		t.Errorf("reading a directory: %v", err)
	}
	if err := f.ReadDir(file, 0, func(DirEntry) bool { return true }); !errors.Is(err, ErrNotDir) {
		t.Errorf("listing a file: %v", err)
	}
	if _, err := f.GetXattr(file, "user.nope"); !errors.Is(err, ErrNoXattr) {
		t.Errorf("missing xattr: %v", err)
	}
	if _, err := f.GetXattr(file, "unknownprefix.x"); !errors.Is(err, ErrNoXattr) {
		t.Errorf("unknown namespace: %v", err)
	}
}
