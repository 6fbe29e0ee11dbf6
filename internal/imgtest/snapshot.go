package imgtest

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Entry is everything a reader can see of one name in a tree.
type Entry struct {
	Mode, Nlink, Uid, Gid uint32
	Ino, Size, Blocks     uint64
	Rdev                  uint64
	Atime, Mtime, Ctime   unix.Timespec
	Target                string            // symlinks
	Xattrs                map[string]string // name → value (hex if binary)
	SHA256                string            // regular files
}

// Snapshot describes every entry below root (root itself as ".").
func Snapshot(t testing.TB, root string) map[string]Entry {
	t.Helper()
	snap := make(map[string]Entry)
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		e, err := describe(path)
		if err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		snap[rel] = e
		return nil
	})
	if err != nil {
		t.Fatalf("walking %s: %v", root, err)
	}
	return snap
}

func describe(path string) (Entry, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return Entry{}, err
	}
	e := Entry{
		Mode: st.Mode, Nlink: uint32(st.Nlink), Uid: st.Uid, Gid: st.Gid,
		Ino: st.Ino, Size: uint64(st.Size), Blocks: uint64(st.Blocks), Rdev: st.Rdev,
		Atime: st.Atim, Mtime: st.Mtim, Ctime: st.Ctim,
	}
	var err error
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFLNK:
		e.Target, err = os.Readlink(path)
	case unix.S_IFREG:
		e.SHA256, err = hashFile(path)
	}
	if err != nil {
		return Entry{}, err
	}
	e.Xattrs, err = xattrs(path)
	return e, err
}

func hashFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func xattrs(path string) (map[string]string, error) {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(path, buf)
	if err != nil {
		return nil, fmt.Errorf("listxattr: %w", err)
	}
	m := make(map[string]string)
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if name == "" {
			continue
		}
		v := make([]byte, 64<<10)
		vn, err := unix.Lgetxattr(path, name, v)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s: %w", name, err)
		}
		m[name] = hex.EncodeToString(v[:vn])
	}
	return m, nil
}

// Compare fails t for every difference between two snapshots.
func Compare(t testing.TB, want, got map[string]Entry) {
	t.Helper()
	var diffs []string
	for name, w := range want {
		g, ok := got[name]
		if !ok {
			diffs = append(diffs, fmt.Sprintf("%q: missing", name))
			continue
		}
		if d := diffEntry(w, g); d != "" {
			diffs = append(diffs, fmt.Sprintf("%q: %s", name, d))
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			diffs = append(diffs, fmt.Sprintf("%q: unexpected", name))
		}
	}
	sort.Strings(diffs)
	if len(diffs) > 20 {
		diffs = append(diffs[:20], fmt.Sprintf("… and %d more", len(diffs)-20))
	}
	for _, d := range diffs {
		t.Error(d)
	}
}

func diffEntry(w, g Entry) string {
	var d []string
	add := func(field string, a, b any) {
		if fmt.Sprint(a) != fmt.Sprint(b) {
			d = append(d, fmt.Sprintf("%s %v != %v", field, a, b))
		}
	}
	add("mode", fmt.Sprintf("%o", w.Mode), fmt.Sprintf("%o", g.Mode))
	add("nlink", w.Nlink, g.Nlink)
	add("uid", w.Uid, g.Uid)
	add("gid", w.Gid, g.Gid)
	add("ino", w.Ino, g.Ino)
	add("size", w.Size, g.Size)
	add("blocks", w.Blocks, g.Blocks)
	add("rdev", w.Rdev, g.Rdev)
	add("atime", w.Atime, g.Atime)
	add("mtime", w.Mtime, g.Mtime)
	add("ctime", w.Ctime, g.Ctime)
	add("target", w.Target, g.Target)
	add("xattrs", w.Xattrs, g.Xattrs)
	add("sha256", w.SHA256, g.SHA256)
	return strings.Join(d, "; ")
}

// CompareReads reads every regular file in want's tree at odd offsets and
// lengths, including across the end, and checks that root b returns the
// same bytes and counts as root a.
func CompareReads(t testing.TB, a, b string, snap map[string]Entry, seed uint64) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	var names []string
	for name, e := range snap {
		if e.Mode&unix.S_IFMT == unix.S_IFREG {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	for _, name := range names {
		size := int64(snap[name].Size)
		fa, err := os.Open(filepath.Join(a, name))
		if err != nil {
			t.Fatal(err)
		}
		fb, err := os.Open(filepath.Join(b, name))
		if err != nil {
			fa.Close()
			t.Fatal(err)
		}
		for range 8 {
			off := rng.Int64N(size + 2)
			n := 1 + rng.IntN(3*4096)
			pa, pb := make([]byte, n), make([]byte, n)
			na, ea := fa.ReadAt(pa, off)
			nb, eb := fb.ReadAt(pb, off)
			if na != nb || (ea == nil) != (eb == nil) || string(pa[:na]) != string(pb[:nb]) {
				t.Errorf("%s: pread(%d, %d): %d bytes, %v vs %d bytes, %v, same bytes: %v",
					name, n, off, na, ea, nb, eb, string(pa[:min(na, nb)]) == string(pb[:min(na, nb)]))
			}
		}
		fa.Close()
		fb.Close()
	}
}
