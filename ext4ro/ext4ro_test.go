package ext4ro

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/imgtest"
)

const ext4Features = "has_journal,extent,huge_file,flex_bg,dir_nlink,extra_isize,metadata_csum,64bit"

func openImage(t testing.TB, img string, opts *Options) *FS {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fsys, err := Open(f, opts)
	if err != nil {
		t.Fatal(err)
	}
	return fsys
}

// resolve walks a slash-separated path from the root.
func resolve(t testing.TB, f *FS, path string) *Inode {
	t.Helper()
	in, err := f.Inode(RootIno)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range strings.Split(path, "/") {
		if name == "" {
			continue
		}
		e, err := f.Lookup(in, name)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if in, err = f.Inode(e.Ino); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
	}
	return in
}

func listDir(t testing.TB, f *FS, dir *Inode) []DirEntry {
	t.Helper()
	var es []DirEntry
	if err := f.ReadDir(dir, 0, func(e DirEntry) bool { es = append(es, e); return true }); err != nil {
		t.Fatal(err)
	}
	return es
}

// manyNames writes n empty files with names of varied length and script
// into dir; with invalid, some names are not UTF-8.
func manyNames(t testing.TB, dir string, n int, invalid bool) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		name := fmt.Sprintf("%s%d", strings.Repeat("n", i%50), i)
		switch i % 7 {
		case 3:
			name = "Ünïcode-" + name
		case 5:
			name = strings.Repeat("L", 200) + name
		case 6:
			if invalid {
				name = "\xe9\xff-" + name // signed and unsigned hashes differ
			}
		}
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestHtreeLookup finds every name of large indexed directories through
// the hash index, for each hash and char signedness, with no fallback to
// a linear search — so the hashes equal e2fsprogs's.
func TestHtreeLookup(t *testing.T) {
	imgtest.RequireTools(t, "mkfs.ext4", "e2fsck", "tune2fs", "debugfs")
	for _, hash := range []string{"legacy", "half_md4", "tea"} {
		for _, unsigned := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s-unsigned=%v", hash, unsigned), func(t *testing.T) {
				t.Parallel()
				src := t.TempDir()
				manyNames(t, filepath.Join(src, "many"), 4000, true)
				img := imgtest.Mkfs(t, "ext4", src, 64, "-b", "1024", "-O", ext4Features)
				imgtest.Run(t, "tune2fs", "-E", "hash_alg="+hash, img)
				if unsigned {
					imgtest.Debugfs(t, img, "ssv flags 2")
				}
				imgtest.Fsck(t, img, "-yD")
				f := openImage(t, img, nil)
				if got := f.hashSigned; got == unsigned {
					t.Fatalf("signed hash = %v", got)
				}
				dir := resolve(t, f, "many")
				if dir.Flags&flagIndex == 0 {
					t.Fatal("many is not indexed")
				}
				root, _, err := f.dirBlockAt(dir, 0)
				if err != nil {
					t.Fatal(err)
				}
				if levels := root[dxRootInfoOff+6]; levels < 1 {
					t.Fatalf("index has %d levels below the root; the test wants interior nodes", levels)
				}
				es := listDir(t, f, dir)
				if len(es) != 4002 {
					t.Fatalf("%d entries, want 4002", len(es))
				}
				for _, e := range es[2:] {
					got, err := f.Lookup(dir, e.Name)
					if err != nil || got.Ino != e.Ino {
						t.Fatalf("lookup %q: %+v, %v; want inode %d", e.Name, got, err, e.Ino)
					}
				}
				for _, missing := range []string{"absent", "nnnn3", strings.Repeat("z", 255)} {
					if _, err := f.Lookup(dir, missing); !errors.Is(err, ErrNotExist) {
						t.Errorf("lookup %q: %v, want ErrNotExist", missing, err)
					}
				}
				if n := f.Stats().HtreeFallbacks; n != 0 {
					t.Fatalf("%d lookups fell back to a linear search", n)
				}
			})
		}
	}
}

// TestCasefold: in a casefolded directory, names match without regard to
// case, through an htree that e2fsck hashed by the folded names.
func TestCasefold(t *testing.T) {
	imgtest.RequireTools(t, "mkfs.ext4", "e2fsck", "debugfs")
	src := t.TempDir()
	manyNames(t, filepath.Join(src, "cf"), 600, false)
	// e2fsck leaves a casefolded directory with a name that is not
	// UTF-8 unindexed: such names go in a linear one.
	manyNames(t, filepath.Join(src, "cflinear"), 20, true)
	for _, n := range []string{"README.txt", "Straße", "ÉCOLE", "MiXeD"} {
		if err := os.WriteFile(filepath.Join(src, "cf", n), []byte(n), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	img := imgtest.Mkfs(t, "ext4", src, 64, "-b", "1024", "-O", ext4Features+",casefold")
	imgtest.Debugfs(t, img, "sif cf flags 0x40080000", "sif cflinear flags 0x40080000") // extents + casefold
	imgtest.Fsck(t, img, "-yD")                                                         // rehash by folded names
	imgtest.Fsck(t, img, "-n")                                                          // and e2fsck agrees with itself
	f := openImage(t, img, nil)
	dir := resolve(t, f, "cf")
	if dir.Flags&flagIndex == 0 {
		t.Fatal("cf is not indexed")
	}
	for query, want := range map[string]string{
		"readme.TXT": "README.txt", "README.txt": "README.txt",
		"STRASSE": "Straße", "strasse": "Straße",
		"école": "ÉCOLE", "E\u0301cole": "ÉCOLE", // decomposed é
		"mixed": "MiXeD",
	} {
		e, err := f.Lookup(dir, query)
		if err != nil || e.Name != want {
			t.Errorf("lookup %q: %q, %v; want %q", query, e.Name, err, want)
		}
	}
	if _, err := f.Lookup(dir, "readme.md"); !errors.Is(err, ErrNotExist) {
		t.Errorf("lookup readme.md: %v, want ErrNotExist", err)
	}
	for _, e := range listDir(t, f, dir)[2:] {
		if got, err := f.Lookup(dir, e.Name); err != nil || got.Ino != e.Ino {
			t.Fatalf("lookup %q: %v", e.Name, err)
		}
	}
	// Names that are not UTF-8 match exactly; the others still fold.
	lin := resolve(t, f, "cflinear")
	for _, e := range listDir(t, f, lin)[2:] {
		if got, err := f.Lookup(lin, e.Name); err != nil || got.Ino != e.Ino {
			t.Fatalf("lookup %q: %v", e.Name, err)
		}
		if got, err := f.Lookup(lin, strings.ToUpper(e.Name)); err != nil || got.Ino != e.Ino {
			if utf8.ValidString(e.Name) || !errors.Is(err, ErrNotExist) {
				t.Fatalf("lookup %q: %v", strings.ToUpper(e.Name), err)
			}
		}
	}
	if n := f.Stats().HtreeFallbacks; n != 0 {
		t.Fatalf("%d lookups fell back to a linear search", n)
	}
	// Outside casefolded directories case matters.
	if _, err := f.Lookup(resolve(t, f, ""), "CF"); !errors.Is(err, ErrNotExist) {
		t.Errorf("lookup CF in the root: %v, want ErrNotExist", err)
	}
}

// TestReadDirCookies: listing from any entry's cookie continues with the
// next entry, and a cookie between entries resumes at the next one.
func TestReadDirCookies(t *testing.T) {
	imgtest.RequireTools(t, "mkfs.ext4", "e2fsck")
	for _, inline := range []bool{false, true} {
		t.Run(fmt.Sprintf("inline=%v", inline), func(t *testing.T) {
			src := t.TempDir()
			n := 700
			features := ext4Features
			if inline {
				n, features = 3, features+",inline_data"
			}
			manyNames(t, filepath.Join(src, "d"), n, true)
			img := imgtest.Mkfs(t, "ext4", src, 64, "-b", "1024", "-I", "512", "-O", features)
			imgtest.Fsck(t, img, "-yD")
			f := openImage(t, img, nil)
			dir := resolve(t, f, "d")
			if dir.hasInlineData() != inline {
				t.Fatalf("inline data: %v, want %v", dir.hasInlineData(), inline)
			}
			all := listDir(t, f, dir)
			if len(all) != n+2 || all[0].Name != "." || all[1].Name != ".." {
				t.Fatalf("%d entries starting %q; want %d starting . ..", len(all), all[0].Name, n+2)
			}
			for i, e := range all {
				var rest []DirEntry
				if err := f.ReadDir(dir, e.Cookie, func(e DirEntry) bool { rest = append(rest, e); return true }); err != nil {
					t.Fatal(err)
				}
				if fmt.Sprint(rest) != fmt.Sprint(all[i+1:]) {
					t.Fatalf("from the cookie of entry %d: %d entries, want %d", i, len(rest), len(all)-i-1)
				}
			}
			// Every cookie value up to the end gives a suffix of the list.
			last := all[len(all)-1].Cookie
			rng := rand.New(rand.NewPCG(1, 2))
			for range 200 {
				c := rng.Uint64N(last + 2)
				var got []DirEntry
				if err := f.ReadDir(dir, c, func(e DirEntry) bool { got = append(got, e); return true }); err != nil {
					t.Fatalf("cookie %d: %v", c, err)
				}
				if len(got) > 0 && fmt.Sprint(got) != fmt.Sprint(all[len(all)-len(got):]) {
					t.Fatalf("cookie %d: not a suffix of the listing", c)
				}
			}
		})
	}
}

// TestReadMatchesSource reads every file, symlink and xattr of a mkfs -d
// image back through ext4ro and compares it with the source tree.
func TestReadMatchesSource(t *testing.T) {
	imgtest.RequireTools(t, "mkfs.ext4", "mkfs.ext2")
	for _, c := range []struct {
		name, fstype string
		args         []string
		bs           int
	}{
		{"ext4", "ext4", []string{"-O", ext4Features}, 4096},
		{"ext4-inline", "ext4", []string{"-O", ext4Features + ",inline_data", "-I", "1024"}, 4096},
		{"ext2-1k", "ext2", []string{"-I", "128"}, 1024},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			src := t.TempDir()
			imgtest.Populate(t, src, imgtest.TreeSpec{Seed: 3, BlockSize: c.bs, ManyEntries: 100, FarSparse: 70 << 20})
			img := imgtest.Mkfs(t, c.fstype, src, 128, append([]string{"-b", fmt.Sprint(c.bs)}, c.args...)...)
			f := openImage(t, img, nil)
			n := 0
			err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
				if err != nil {
					return err
				}
				rel, _ := filepath.Rel(src, path)
				in := resolve(t, f, filepath.ToSlash(rel))
				n++
				return compareWithSource(f, in, path)
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%d entries compared", n)
		})
	}
}

func compareWithSource(f *FS, in *Inode, path string) error {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return err
	}
	if in.Mode != st.Mode || in.Uid != st.Uid || in.Gid != st.Gid {
		return fmt.Errorf("%s: mode/uid/gid %o %d %d, want %o %d %d", path, in.Mode, in.Uid, in.Gid, st.Mode, st.Uid, st.Gid)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		want, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		got := make([]byte, len(want)+10)
		n, err := f.ReadAt(in, got, 0)
		if n != len(want) || !bytes.Equal(got[:n], want) || (err != io.EOF && len(want) < len(got)) {
			return fmt.Errorf("%s: read %d bytes (%v), differ from the source's %d", path, n, err, len(want))
		}
		if n, err := f.ReadAt(in, got, int64(len(want))); n != 0 || err != io.EOF {
			return fmt.Errorf("%s: read at the end: %d, %v", path, n, err)
		}
	case unix.S_IFLNK:
		want, _ := os.Readlink(path)
		got, err := f.Readlink(in)
		if err != nil || string(got) != want {
			return fmt.Errorf("%s: readlink %q, %v, want %q", path, got, err, want)
		}
	case unix.S_IFCHR, unix.S_IFBLK:
		if uint64(in.Rdev) != st.Rdev {
			return fmt.Errorf("%s: rdev %#x, want %#x", path, in.Rdev, st.Rdev)
		}
	}
	names, err := f.ListXattr(in)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	buf := make([]byte, 1<<16)
	sz, err := unix.Llistxattr(path, buf)
	if err != nil {
		return err
	}
	want := strings.Split(strings.TrimSuffix(string(buf[:sz]), "\x00"), "\x00")
	if sz == 0 {
		want = nil
	}
	if fmt.Sprint(sortedCopy(names)) != fmt.Sprint(sortedCopy(want)) {
		return fmt.Errorf("%s: xattrs %q, want %q", path, names, want)
	}
	for _, name := range names {
		got, err := f.GetXattr(in, name)
		if err != nil {
			return fmt.Errorf("%s: %s: %w", path, name, err)
		}
		n, err := unix.Lgetxattr(path, name, buf)
		if err != nil || !bytes.Equal(got, buf[:n]) {
			return fmt.Errorf("%s: xattr %s = %x, want %x (%v)", path, name, got, buf[:n], err)
		}
	}
	return nil
}

func sortedCopy(s []string) []string { return slices.Sorted(slices.Values(s)) }

// TestLargeDirThreeLevels: with large_dir the kernel grows an htree a
// third level deep; every name is still found through the index.
func TestLargeDirThreeLevels(t *testing.T) {
	if testing.Short() {
		t.Skip("creates 300,000 files")
	}
	img := imgtest.Mkfs(t, "ext4", "", 512, "-b", "1024", "-N", "320000", "-O", ext4Features+",large_dir")
	rw := imgtest.KernelMount(t, img, "rw")
	dir := filepath.Join(rw, "huge")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	const n = 300000
	name := func(i int) string { return fmt.Sprintf("%032x-%07d", uint64(i)*0x9E3779B97F4A7C15, i) }
	for i := range n {
		fd, err := unix.Open(filepath.Join(dir, name(i)), unix.O_CREAT|unix.O_WRONLY, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		unix.Close(fd)
	}
	imgtest.Unmount(t, rw)
	imgtest.Fsck(t, img, "-n")

	f := openImage(t, img, nil)
	huge := resolve(t, f, "huge")
	root, _, err := f.dirBlockAt(huge, 0)
	if err != nil {
		t.Fatal(err)
	}
	if levels := root[dxRootInfoOff+6]; levels != 2 {
		t.Fatalf("the kernel built %d levels below the root; the test wants 2 (three in all)", levels)
	}
	rng := rand.New(rand.NewPCG(9, 9))
	for range 3000 {
		i := rng.IntN(n)
		if _, err := f.Lookup(huge, name(i)); err != nil {
			t.Fatalf("lookup %s: %v", name(i), err)
		}
	}
	if _, err := f.Lookup(huge, name(n)); !errors.Is(err, ErrNotExist) {
		t.Fatalf("lookup of a name never made: %v", err)
	}
	if got := len(listDir(t, f, huge)); got != n+2 {
		t.Fatalf("%d entries listed, want %d", got, n+2)
	}
	if fb := f.Stats().HtreeFallbacks; fb != 0 {
		t.Fatalf("%d lookups fell back to a linear search", fb)
	}
}

// TestOutOfRangeNanoseconds: an extra time field whose nanoseconds are
// 10^9 or more (only a damaged or hand-edited inode has one) reads as the
// kernel's ext4 shows it: as stored, not clamped. (The kernel's FUSE layer
// clamps it to 999999999 on the way to a guest process.)
func TestOutOfRangeNanoseconds(t *testing.T) {
	imgtest.RequireTools(t, "mkfs.ext4", "debugfs")
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := imgtest.Mkfs(t, "ext4", src, 16, "-I", "256", "-O", ext4Features)
	imgtest.Debugfs(t, img, "sif f mtime_extra 0xfffffffd") // epoch 1, nsec 2^30-1
	in := resolve(t, openImage(t, img, nil), "f")
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(imgtest.KernelMount(t, img, "ro"), "f"), &st); err != nil {
		t.Fatal(err)
	}
	if in.Mtime.Sec != st.Mtim.Sec || int64(in.Mtime.Nsec) != st.Mtim.Nsec || in.Mtime.Nsec != 1<<30-1 {
		t.Fatalf("mtime %+v, kernel %+v", in.Mtime, st.Mtim)
	}
}
