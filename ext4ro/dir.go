package ext4ro

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// DirEntry is one name in a directory.
type DirEntry struct {
	Name string
	Ino  uint32
	// Type is the S_IF* file type bits from the entry, or 0 when the
	// filesystem does not record types (no filetype feature).
	Type uint32
	// Cookie is the position just after this entry: ReadDir from Cookie
	// continues with the next entry. Cookies are byte positions in the
	// directory, so they stay valid as long as the directory is unchanged.
	Cookie uint64
}

// ext4 directory entry file types, by index, as S_IF* bits.
var dirTypes = [8]uint32{0, S_IFREG, S_IFDIR, S_IFCHR, S_IFBLK, S_IFIFO, S_IFSOCK, S_IFLNK}

const (
	maxNameLen   = 255
	direntHeader = 8
	tailSize     = 12   // the checksum dirent at the end of a leaf block
	tailFileType = 0xDE // its file_type marker
)

// ReadDir calls fn for each entry of directory dir from position cookie
// (0 for the start), in on-disk order, including "." and "..", until fn
// returns false or the entries run out.
func (f *FS) ReadDir(dir *Inode, cookie uint64, fn func(DirEntry) bool) error {
	if err := f.checkDir(dir); err != nil {
		return err
	}
	if dir.hasInlineData() {
		return f.readInlineDir(dir, cookie, fn)
	}
	nblocks := dir.Size / f.bs
	for lblk := cookie / f.bs; lblk < nblocks; {
		// Find the next mapped block: directory holes are skipped
		// without visiting them one by one.
		var next run
		err := f.walkMap(dir, lblk, nblocks, func(r run) error { next = r; return errStop })
		if err != nil && err != errStop {
			return err
		}
		if next.length == 0 {
			return nil
		}
		if next.logical > lblk {
			lblk = next.logical
		}
		ahead := min(readAheadBlocks, next.logical+next.length-lblk, nblocks-lblk)
		b, err := f.dirBlock(dir, lblk, next.physical+(lblk-next.logical), ahead)
		if err != nil {
			return err
		}
		skip := uint64(0)
		if lblk == cookie/f.bs {
			skip = cookie % f.bs
		}
		more := true
		err = parseDirents(b, f.hasFiletype(), dir.Ino, next.physical, func(off int, e DirEntry) bool {
			if uint64(off) < skip {
				return true
			}
			e.Cookie = lblk*f.bs + uint64(off) + uint64(recLen(b[off:], f.bs))
			more = fn(e)
			return more
		})
		if err != nil || !more {
			return err
		}
		lblk++
	}
	return nil
}

var errStop = errors.New("stop")

func (f *FS) checkDir(dir *Inode) error {
	if !dir.IsDir() {
		return fmt.Errorf("ext4ro: inode %d: %w", dir.Ino, ErrNotDir)
	}
	if dir.Encrypted() {
		return fmt.Errorf("ext4ro: directory inode %d: %w", dir.Ino, ErrEncrypted)
	}
	return nil
}

func (f *FS) hasFiletype() bool { return f.sb.incompat(incompatFiletype) }

// dirBlock reads block lblk of directory dir (at device block phys) and
// verifies its checksum.
// ahead is how many blocks of the directory, from this one, may be read
// at once on a cache miss.
func (f *FS) dirBlock(dir *Inode, lblk, phys, ahead uint64) ([]byte, error) {
	b, err := f.blockAhead(phys, ahead)
	if err != nil {
		return nil, fmt.Errorf("directory inode %d: %w", dir.Ino, err)
	}
	if !f.csum {
		return b, nil
	}
	// Index blocks first: when the kernel turns a leaf into the htree
	// root it leaves the old leaf's checksum tail in place, so the root
	// can look like a leaf by its last bytes.
	if dir.Flags&flagIndex != 0 && (lblk == 0 || isDxNode(b, f.bs)) {
		if _, err := f.dxEntries(dir, b, phys, lblk == 0); err != nil {
			return nil, err
		}
		return b, nil
	}
	if hasDirTail(b) {
		if crc32c(f.inodeSeed(dir), b[:len(b)-tailSize]) != binary.LittleEndian.Uint32(b[len(b)-4:]) {
			return nil, badChecksum("directory block", dir.Ino, phys)
		}
		return b, nil
	}
	return nil, corrupt("directory block", dir.Ino, phys, "no checksum tail")
}

func hasDirTail(b []byte) bool {
	t := b[len(b)-tailSize:]
	le := binary.LittleEndian
	return le.Uint32(t) == 0 && le.Uint16(t[4:]) == tailSize && t[6] == 0 && t[7] == tailFileType
}

// recLen decodes a record length; 64 KiB blocks store 65536 as 0 or 65535.
func recLen(b []byte, bs uint64) int {
	n := int(binary.LittleEndian.Uint16(b[4:]))
	if bs >= 65536 && (n == 65535 || n == 0) {
		return 65536
	}
	return n
}

// parseDirents decodes the directory entries of one block (or inline
// region) in order, calling fn with each live entry and its offset.
func parseDirents(b []byte, filetype bool, ino uint32, blk uint64, fn func(off int, e DirEntry) bool) error {
	le := binary.LittleEndian
	for off := 0; off < len(b); {
		if len(b)-off < direntHeader {
			return corrupt("directory entry", ino, blk, "header at offset %d runs past the end", off)
		}
		rl := recLen(b[off:], uint64(len(b)))
		nameLen := int(b[off+6])
		if !filetype {
			nameLen |= int(b[off+7]) << 8
		}
		if rl < 12 || rl%4 != 0 || off+rl > len(b) || direntHeader+nameLen > rl {
			return corrupt("directory entry", ino, blk, "offset %d: record length %d, name length %d", off, rl, nameLen)
		}
		if e := le.Uint32(b[off:]); e != 0 && nameLen > 0 {
			d := DirEntry{Name: string(b[off+8 : off+8+nameLen]), Ino: e}
			if filetype {
				d.Type = dirTypes[b[off+7]&7]
			}
			if !fn(off, d) {
				return nil
			}
		}
		off += rl
	}
	return nil
}

// readInlineDir lists a directory stored in the inode. Its "." and ".."
// are implicit (i_block starts with the parent's number), so they get the
// cookies 1 and 2; real entries use their byte position in the data.
func (f *FS) readInlineDir(dir *Inode, cookie uint64, fn func(DirEntry) bool) error {
	data, err := f.inlineData(dir)
	if err != nil {
		return err
	}
	if cookie < 1 && !fn(DirEntry{Name: ".", Ino: dir.Ino, Type: S_IFDIR, Cookie: 1}) {
		return nil
	}
	parent := binary.LittleEndian.Uint32(data)
	if cookie < 2 && !fn(DirEntry{Name: "..", Ino: parent, Type: S_IFDIR, Cookie: 2}) {
		return nil
	}
	// The entries are in two regions: the rest of i_block, then the
	// system.data value. Each region's records end exactly at its end.
	regions := [][2]int{{4, 60}, {60, len(data)}}
	more := true
	for _, r := range regions {
		if r[0] >= r[1] || uint64(r[1]) <= cookie {
			continue
		}
		reg := data[r[0]:r[1]]
		err := parseDirents(reg, f.hasFiletype(), dir.Ino, 0, func(off int, e DirEntry) bool {
			pos := uint64(r[0] + off)
			if pos < cookie {
				return true
			}
			e.Cookie = pos + uint64(recLen(reg[off:], f.bs))
			more = fn(e)
			return more
		})
		if err != nil || !more {
			return err
		}
	}
	return nil
}

// Lookup finds name in directory dir. "." and ".." are answered from the
// directory itself.
func (f *FS) Lookup(dir *Inode, name string) (DirEntry, error) {
	if err := f.checkDir(dir); err != nil {
		return DirEntry{}, err
	}
	switch {
	case name == "" || strings.ContainsAny(name, "/\x00"):
		return DirEntry{}, fmt.Errorf("ext4ro: name %q: %w", name, ErrInvalid)
	case len(name) > maxNameLen:
		return DirEntry{}, fmt.Errorf("ext4ro: name of %d bytes: %w", len(name), ErrNameTooLong)
	case name == ".":
		return DirEntry{Name: ".", Ino: dir.Ino, Type: S_IFDIR}, nil
	}
	match := f.matcher(dir, name)
	if dir.Flags&flagIndex != 0 && f.sb.compat(compatDirIndex) && name != ".." && !dir.hasInlineData() {
		e, err := f.htreeLookup(dir, match)
		if err == nil || errors.Is(err, ErrNotExist) {
			return e, err
		}
		if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrUnsupported) {
			return DirEntry{}, err
		}
		// A damaged or unknown index: the leaves still hold every
		// entry, so search them all, as the kernel does.
		f.stats.htreeFallbacks.Add(1)
	}
	return f.linearLookup(dir, match)
}

func (f *FS) linearLookup(dir *Inode, m nameMatcher) (DirEntry, error) {
	var found DirEntry
	err := f.ReadDir(dir, 0, func(e DirEntry) bool {
		if m.match(e.Name) {
			found = e
			return false
		}
		return true
	})
	if err != nil {
		return DirEntry{}, err
	}
	if found.Ino == 0 {
		return DirEntry{}, fmt.Errorf("ext4ro: %q in directory inode %d: %w", m.name, dir.Ino, ErrNotExist)
	}
	return found, nil
}
