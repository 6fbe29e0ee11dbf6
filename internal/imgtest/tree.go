// Package imgtest makes ext4 images for tests with the real tools
// (mkfs, debugfs, e2fsck, kernel loop mounts) and compares what two
// mounted trees show, attribute by attribute and byte by byte.
package imgtest

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TreeSpec shapes the tree Populate writes.
type TreeSpec struct {
	Seed uint64
	// BlockSize of the target filesystem: sizes of large xattrs and
	// symlinks follow it so that they fit.
	BlockSize int
	// ManyEntries is the size of the "many" directory (htree material).
	ManyEntries int
	// NoSpecial leaves out device nodes, FIFOs and sockets.
	NoSpecial bool
	// FarSparse, if set, adds sparse/far with one block of data at this
	// offset (past the double-indirect range of a 1 KiB-block ext2/3).
	FarSparse int64
	// NanoTimes sets timestamps with nanoseconds and past 2038 (only a
	// kernel-written image keeps them; mkfs -d drops nanoseconds).
	NanoTimes bool
}

// Populate writes a varied tree into dir: files around the inline-data
// and block-size boundaries, sparse files, hard links, symlinks of every
// length class, special files, odd modes and owners, xattrs and POSIX
// ACLs, long and non-UTF-8 names, deep nesting, and a large directory.
// Without root it leaves out device nodes, owners and trusted.* xattrs.
func Populate(t testing.TB, dir string, spec TreeSpec) {
	t.Helper()
	if spec.BlockSize == 0 {
		spec.BlockSize = 4096
	}
	rng := rand.New(rand.NewPCG(spec.Seed, spec.Seed^0x5eed))
	p := &populator{t: t, dir: dir, rng: rng}
	bs := spec.BlockSize

	for _, n := range []int{0, 1, 59, 60, 61, 100, bs - 1, bs, bs + 1, 3*bs + 17, 65537, 1<<20 + 7} {
		p.file(fmt.Sprintf("sizes/f%d", n), n)
	}
	// Sparse: data, a hole, data; and a file that is all hole but its
	// last byte.
	p.sparse("sparse/holes", []int64{0, 5 << 20, 9<<20 + 3}, 4096)
	p.sparse("sparse/tail", []int64{7<<20 - 1}, 1)
	if spec.FarSparse > 0 {
		p.sparse("sparse/far", []int64{spec.FarSparse}, 1000)
	}

	// Hard links across directories.
	p.file("links/orig", 5000)
	p.must(os.Link(p.path("links/orig"), p.path("links/second")))
	p.mkdir("links/sub")
	p.must(os.Link(p.path("links/orig"), p.path("links/sub/third")))

	// Symlinks: fast (< 60 bytes), at the boundary, slow.
	for _, n := range []int{1, 59, 60, 61, 200, min(bs-1, 1000)} {
		p.symlink(strings.Repeat("t", n), fmt.Sprintf("symlinks/len%d", n))
	}
	p.symlink("/etc/passwd", "symlinks/absolute")
	p.symlink("../../..", "symlinks/up")
	p.symlink("missing/target", "symlinks/dangling")
	p.symlink("../sizes/f100", "symlinks/relative")

	root := os.Geteuid() == 0
	if !spec.NoSpecial && root {
		p.mkdir("special")
		p.must(unix.Mkfifo(p.path("special/fifo"), 0o640))
		p.must(unix.Mknod(p.path("special/null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
		p.must(unix.Mknod(p.path("special/loop"), unix.S_IFBLK|0o660, int(unix.Mkdev(7, 0))))
		p.must(unix.Mknod(p.path("special/bigdev"), unix.S_IFCHR|0o600, int(unix.Mkdev(300, 70000))))
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: p.path("special/socket"), Net: "unix"})
		p.must(err)
		l.SetUnlinkOnClose(false)
		l.Close()
	}

	// Modes and owners.
	for i, m := range []os.FileMode{0, 0o777, 0o4755, 0o2750, 0o1777, 0o400} {
		name := fmt.Sprintf("modes/m%d", i)
		p.file(name, 10)
		p.must(unix.Chmod(p.path(name), uint32(m.Perm())|modeBits(m)))
	}
	p.mkdir("modes/sticky")
	p.must(unix.Chmod(p.path("modes/sticky"), 0o1777))
	for i, o := range [][2]int{{1000, 1000}, {65534, 65534}, {100000, 200000}, {70000, 0}} {
		name := fmt.Sprintf("owners/o%d", i)
		p.file(name, 3)
		if root {
			p.must(os.Lchown(p.path(name), o[0], o[1]))
		}
	}

	// Extended attributes: small ones in the inode, a large one that
	// needs the xattr block, other namespaces, and POSIX ACLs.
	p.file("xattrs/small", 10)
	p.xattr("xattrs/small", "user.a", []byte("1"))
	p.xattr("xattrs/small", "user.empty", nil)
	if root {
		p.xattr("xattrs/small", "trusted.t", []byte("trusted value"))
	}
	p.xattr("xattrs/small", "security.s", []byte("security value"))
	p.file("xattrs/large", 10)
	p.xattr("xattrs/large", "user.big", p.bytes(bs/2))
	p.xattr("xattrs/large", "user.second", p.bytes(100))
	p.file("xattrs/acl", 10)
	p.xattr("xattrs/acl", "system.posix_acl_access", aclXattr(0o6, 0o4, 0o4, [][2]uint32{{1000, 6}}, [][2]uint32{{2000, 4}}))
	p.mkdir("xattrs/defacl")
	p.xattr("xattrs/defacl", "system.posix_acl_default", aclXattr(0o7, 0o5, 0o5, nil, [][2]uint32{{3000, 7}}))
	p.mkdir("xattrs/dir")
	p.xattr("xattrs/dir", "user.on_dir", []byte("dir value"))

	// Names: maximal, non-UTF-8, odd characters.
	p.file("names/"+strings.Repeat("n", 255), 1)
	p.file("names/bad\xff\xfe", 1)
	p.file("names/sp ace\ttab\nnewline", 1)
	p.file("names/ünïcødé", 1)

	// Deep nesting.
	deep := "deep"
	for i := range 20 {
		deep = filepath.Join(deep, fmt.Sprintf("d%d", i))
	}
	p.file(filepath.Join(deep, "leaf"), 42)

	// A large directory, with names of varying length.
	p.mkdir("many")
	for i := range spec.ManyEntries {
		name := fmt.Sprintf("many/%s%d", strings.Repeat("x", i%40), i)
		p.file(name, i%3)
	}
	// A directory with a few entries (inline with inline_data).
	p.file("small/one", 1)
	p.file("small/two", 2)
	p.mkdir("empty")

	// Times last: creating entries changes the directories' times.
	p.times(spec.NanoTimes)
}

func modeBits(m os.FileMode) uint32 {
	var b uint32
	if m&os.ModeSetuid != 0 || m&0o4000 != 0 {
		b |= unix.S_ISUID
	}
	if m&0o2000 != 0 {
		b |= unix.S_ISGID
	}
	if m&0o1000 != 0 {
		b |= unix.S_ISVTX
	}
	return b
}

type populator struct {
	t   testing.TB
	dir string
	rng *rand.Rand
}

func (p *populator) must(err error) {
	p.t.Helper()
	if err != nil {
		p.t.Fatal(err)
	}
}

func (p *populator) path(name string) string { return filepath.Join(p.dir, name) }

func (p *populator) mkdir(name string) { p.must(os.MkdirAll(p.path(name), 0o755)) }

func (p *populator) bytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(p.rng.Uint32())
	}
	return b
}

func (p *populator) file(name string, size int) {
	p.mkdir(filepath.Dir(name))
	p.must(os.WriteFile(p.path(name), p.bytes(size), 0o644))
}

func (p *populator) sparse(name string, offsets []int64, chunk int) {
	p.mkdir(filepath.Dir(name))
	f, err := os.Create(p.path(name))
	p.must(err)
	defer f.Close()
	for _, off := range offsets {
		_, err := f.WriteAt(p.bytes(chunk), off)
		p.must(err)
	}
}

func (p *populator) symlink(target, name string) {
	p.mkdir(filepath.Dir(name))
	p.must(os.Symlink(target, p.path(name)))
}

func (p *populator) xattr(name, attr string, val []byte) {
	if err := unix.Lsetxattr(p.path(name), attr, val, 0); err != nil {
		p.t.Fatalf("setxattr %s %s: %v", name, attr, err)
	}
}

// times gives every entry a distinct, reproducible set of times; with
// nano, with nanoseconds and some before 1970 and after 2038.
func (p *populator) times(nano bool) {
	base := time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC)
	i := 0
	err := filepath.Walk(p.dir, func(path string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		i++
		at := base.Add(time.Duration(i) * time.Hour)
		mt := base.Add(-time.Duration(i) * time.Minute)
		if nano {
			at = at.Add(time.Duration(p.rng.IntN(1e9)))
			mt = mt.Add(time.Duration(p.rng.IntN(1e9)))
			switch i % 5 {
			case 1:
				mt = time.Date(1965, 7, 8, 9, 10, 11, 123456789, time.UTC)
			case 2:
				mt = time.Date(2150, 1, 2, 3, 4, 5, 999999999, time.UTC)
			}
		}
		ts := []unix.Timespec{unix.NsecToTimespec(at.UnixNano()), unix.NsecToTimespec(mt.UnixNano())}
		return unix.UtimesNanoAt(unix.AT_FDCWD, path, ts, unix.AT_SYMLINK_NOFOLLOW)
	})
	p.must(err)
}

// aclXattr encodes a POSIX ACL in the kernel's xattr format (version 2):
// the owner, group and other permissions, named users and groups, and a
// mask when there are named entries.
func aclXattr(user, group, other uint32, users, groups [][2]uint32) []byte {
	le := binary.LittleEndian
	b := le.AppendUint32(nil, 2)
	add := func(tag uint16, perm, id uint32) {
		b = le.AppendUint16(b, tag)
		b = le.AppendUint16(b, uint16(perm))
		b = le.AppendUint32(b, id)
	}
	const undefined = ^uint32(0)
	add(0x01, user, undefined)
	for _, u := range users {
		add(0x02, u[1], u[0])
	}
	add(0x04, group, undefined)
	for _, g := range groups {
		add(0x08, g[1], g[0])
	}
	if len(users)+len(groups) > 0 {
		add(0x10, 7, undefined)
	}
	add(0x20, other, undefined)
	return b
}
