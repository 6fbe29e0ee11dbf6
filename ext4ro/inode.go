package ext4ro

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"io/fs"
	"time"
)

// Inode flags (i_flags) the reader acts on.
const (
	flagEncrypt    = 0x800
	flagIndex      = 0x1000
	flagHugeFile   = 0x40000
	flagExtents    = 0x80000
	flagEAInode    = 0x200000
	flagInlineData = 0x10000000
	flagCasefold   = 0x40000000
)

// File type bits of i_mode.
const (
	S_IFMT   = 0o170000
	S_IFSOCK = 0o140000
	S_IFLNK  = 0o120000
	S_IFREG  = 0o100000
	S_IFBLK  = 0o060000
	S_IFDIR  = 0o040000
	S_IFCHR  = 0o020000
	S_IFIFO  = 0o010000
)

// RootIno is the inode number of the root directory.
const RootIno = 2

// Timespec is a time as ext4 stores it: seconds since the epoch (extended
// past 2038 by the epoch bits) and nanoseconds.
type Timespec struct {
	Sec  int64
	Nsec uint32
}

// Time converts t to a time.Time.
func (t Timespec) Time() time.Time { return time.Unix(t.Sec, int64(t.Nsec)) }

// Inode is a decoded inode. It is a value: it does not change when the
// image does, and holds a private copy of the raw bytes.
type Inode struct {
	Ino        uint32
	Generation uint32 // i_generation, for file handles
	Mode       uint32 // type and permission bits, as in st_mode
	Uid, Gid   uint32
	Size       uint64
	Nlink      uint32
	Blocks     uint64 // in 512-byte units, as st_blocks
	Flags      uint32 // i_flags
	Atime      Timespec
	Mtime      Timespec
	Ctime      Timespec
	Crtime     Timespec // zero when the inode has no room for it
	Rdev       uint32   // Linux dev_t encoding, for device nodes
	XattrBlock uint64   // i_file_acl

	raw []byte // the whole on-disk inode
}

// IsDir, IsRegular and IsSymlink test the file type.
func (in *Inode) IsDir() bool     { return in.Mode&S_IFMT == S_IFDIR }
func (in *Inode) IsRegular() bool { return in.Mode&S_IFMT == S_IFREG }
func (in *Inode) IsSymlink() bool { return in.Mode&S_IFMT == S_IFLNK }

// FileMode converts Mode to an io/fs mode.
func (in *Inode) FileMode() fs.FileMode {
	m := fs.FileMode(in.Mode & 0o777)
	switch in.Mode & S_IFMT {
	case S_IFDIR:
		m |= fs.ModeDir
	case S_IFLNK:
		m |= fs.ModeSymlink
	case S_IFIFO:
		m |= fs.ModeNamedPipe
	case S_IFSOCK:
		m |= fs.ModeSocket
	case S_IFCHR:
		m |= fs.ModeDevice | fs.ModeCharDevice
	case S_IFBLK:
		m |= fs.ModeDevice
	}
	if in.Mode&0o4000 != 0 {
		m |= fs.ModeSetuid
	}
	if in.Mode&0o2000 != 0 {
		m |= fs.ModeSetgid
	}
	if in.Mode&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	return m
}

// Encrypted reports whether the inode is fscrypt-encrypted.
func (in *Inode) Encrypted() bool { return in.Flags&flagEncrypt != 0 }

// Version is a 32-bit digest of what says which bytes a regular file
// holds: its i_generation, size, block count, flags, modification and
// change times, and its block map root (or inline data). Every write or
// truncate changes the times (at the filesystem's granularity) and most
// change the size or the map, so two versions of one file almost never
// share it; two files sharing an inode number differ in i_generation.
func (in *Inode) Version() uint32 {
	h := fnv.New64a()
	var b [48]byte
	le := binary.LittleEndian
	le.PutUint32(b[0:], in.Generation)
	le.PutUint64(b[4:], in.Size)
	le.PutUint64(b[12:], in.Blocks)
	le.PutUint32(b[20:], in.Flags)
	le.PutUint64(b[24:], uint64(in.Mtime.Sec))
	le.PutUint32(b[32:], in.Mtime.Nsec)
	le.PutUint64(b[36:], uint64(in.Ctime.Sec))
	le.PutUint32(b[44:], in.Ctime.Nsec)
	h.Write(b[:])
	h.Write(in.iblock())
	s := h.Sum64()
	return uint32(s>>32) ^ uint32(s)
}

func (in *Inode) hasExtents() bool    { return in.Flags&flagExtents != 0 }
func (in *Inode) hasInlineData() bool { return in.Flags&flagInlineData != 0 }

// iblock is the 60-byte i_block area: extent root, block map, inline data
// or a fast symlink.
func (in *Inode) iblock() []byte { return in.raw[0x28:0x64] }

// extraIsize is i_extra_isize, already validated against the inode size.
func (in *Inode) extraIsize() int {
	if len(in.raw) <= 128 {
		return 0
	}
	return int(binary.LittleEndian.Uint16(in.raw[0x80:]))
}

// fits reports whether the extra field at [off, off+n) is present.
func (in *Inode) fits(off, n int) bool { return off+n <= 128+in.extraIsize() }

// InodeBlock returns the block of the inode table that holds inode ino,
// and whether the inode can be in use (it is not in the uninitialised
// part of its group's table). It reads nothing but the group descriptor.
func (f *FS) InodeBlock(ino uint32) (uint64, bool, error) {
	sb := f.sb
	if ino == 0 || ino > sb.InodesCount {
		return 0, false, fmt.Errorf("ext4ro: inode %d out of range 1..%d: %w", ino, sb.InodesCount, ErrInvalid)
	}
	grp, idx := (ino-1)/sb.InodesPerGroup, (ino-1)%sb.InodesPerGroup
	gd, err := f.group(grp)
	if err != nil {
		return 0, false, err
	}
	inUse := gd.flags&bgInodeUninit == 0 && idx < sb.InodesPerGroup-min(gd.itableUnused, sb.InodesPerGroup)
	return gd.inodeTable + uint64(idx)*uint64(sb.InodeSize)/f.bs, inUse, nil
}

// Prefetcher is what a BlockSource may offer to be told of blocks that
// will be wanted soon, to fetch them together.
type Prefetcher interface {
	Prefetch(blocks []uint64)
}

// PrefetchInodes tells the metadata source, if it is a Prefetcher, of
// the inode-table blocks that hold inodes inos (as a directory listing
// names them, before they are read one by one).
func (f *FS) PrefetchInodes(inos []uint32) {
	p, ok := f.src.(Prefetcher)
	if !ok || len(inos) == 0 {
		return
	}
	blocks := make([]uint64, 0, len(inos))
	for _, ino := range inos {
		if b, ok, err := f.InodeBlock(ino); err == nil && ok {
			blocks = append(blocks, b)
		}
	}
	p.Prefetch(blocks)
}

// PrefetchSubdirs tells the metadata source, if it is a Prefetcher, of
// what listing directories dirs will read, a walk being about to: their
// first blocks, then (once those are in) the inode-table blocks of the
// entries in those blocks. It waits for the source; run it aside.
func (f *FS) PrefetchSubdirs(dirs []*Inode) {
	if _, ok := f.src.(Prefetcher); !ok || len(dirs) == 0 {
		return
	}
	// The first directory first: a walk lists it at once.
	f.prefetchFirstBlocks(dirs[:1])
	f.PrefetchInodes(f.firstEntries(dirs[0]))
	f.prefetchFirstBlocks(dirs[1:])
	var inos []uint32
	for _, d := range dirs[1:] {
		inos = append(inos, f.firstEntries(d)...)
		if len(inos) >= maxPrefetchInodes {
			break
		}
	}
	f.PrefetchInodes(inos)
}

// firstEntries returns the inodes named in dir's first block (at most
// subdirEntries).
func (f *FS) firstEntries(dir *Inode) []uint32 {
	var inos []uint32
	_ = f.ReadDir(dir, 0, func(e DirEntry) bool {
		if e.Name != "." && e.Name != ".." {
			inos = append(inos, e.Ino)
		}
		return len(inos) < subdirEntries && e.Cookie < f.bs
	})
	return inos
}

// What PrefetchSubdirs reads ahead: the entries of each directory's first
// block, at most so many, and so many in all.
const subdirEntries, maxPrefetchInodes = 128, 4096

// prefetchFirstBlocks tells the metadata source of the first blocks of
// directories dirs whose extent tree fits in the inode (reading nothing
// to find them).
func (f *FS) prefetchFirstBlocks(dirs []*Inode) {
	p := f.src.(Prefetcher)
	var blocks []uint64
	for _, in := range dirs {
		if !in.IsDir() || !in.hasExtents() || in.hasInlineData() {
			continue
		}
		b := in.iblock()
		le := binary.LittleEndian
		// A leaf root: header (magic, entries, max, depth), then extents
		// of (logical u32, length u16, start hi u16, start lo u32).
		if le.Uint16(b[0:]) != extentMagic || le.Uint16(b[6:]) != 0 || le.Uint16(b[2:]) == 0 {
			continue
		}
		e := b[12:24]
		length := uint64(le.Uint16(e[4:]))
		if length > 32768 { // unwritten
			continue
		}
		start := uint64(le.Uint16(e[6:]))<<32 | uint64(le.Uint32(e[8:]))
		for i := range min(length, 4) {
			if start+i < f.sb.BlocksCount {
				blocks = append(blocks, start+i)
			}
		}
	}
	p.Prefetch(blocks)
}

// Inode reads inode ino. An inode that is not in use is ErrNotExist.
func (f *FS) Inode(ino uint32) (*Inode, error) {
	sb := f.sb
	if ino == 0 || ino > sb.InodesCount {
		return nil, fmt.Errorf("ext4ro: inode %d out of range 1..%d: %w", ino, sb.InodesCount, ErrInvalid)
	}
	grp := (ino - 1) / sb.InodesPerGroup
	idx := (ino - 1) % sb.InodesPerGroup
	gd, err := f.group(grp)
	if err != nil {
		return nil, err
	}
	if gd.flags&bgInodeUninit != 0 || idx >= sb.InodesPerGroup-min(gd.itableUnused, sb.InodesPerGroup) {
		return nil, fmt.Errorf("ext4ro: inode %d: not in use (uninitialised part of the inode table): %w", ino, ErrNotExist)
	}
	isz := uint64(sb.InodeSize)
	off := uint64(idx) * isz
	blk := gd.inodeTable + off/f.bs
	// Read ahead in the used part of the table: neighbours are likely
	// next (a directory's entries were mostly allocated together).
	used := (uint64(sb.InodesPerGroup-min(gd.itableUnused, sb.InodesPerGroup))*isz + f.bs - 1) / f.bs
	b, err := f.blockAhead(blk, min(readAheadBlocks, gd.inodeTable+used-blk))
	if err != nil {
		return nil, err
	}
	raw := make([]byte, isz)
	copy(raw, b[off%f.bs:])
	in, err := f.parseInode(ino, raw, blk)
	if err != nil {
		return nil, err
	}
	if in.Nlink == 0 && ino >= sb.FirstIno {
		// Deleted, or an orphan that only open file descriptors keep.
		return nil, fmt.Errorf("ext4ro: inode %d: not in use (no links): %w", ino, ErrNotExist)
	}
	return in, nil
}

// parseInode decodes and verifies one on-disk inode. blk is where it was
// read from, for error messages.
func (f *FS) parseInode(ino uint32, raw []byte, blk uint64) (*Inode, error) {
	le := binary.LittleEndian
	in := &Inode{Ino: ino, raw: raw}
	if len(raw) > 128 {
		x := int(le.Uint16(raw[0x80:]))
		if x&3 != 0 || 128+x > len(raw) {
			return nil, corrupt("inode", ino, blk, "i_extra_isize %d is invalid", x)
		}
	}
	if f.csum {
		if err := f.verifyInode(in); err != nil {
			if allZero(raw) {
				return nil, fmt.Errorf("ext4ro: inode %d: not in use: %w", ino, ErrNotExist)
			}
			return nil, err
		}
	}
	in.Mode = uint32(le.Uint16(raw[0x0:]))
	in.Uid = uint32(le.Uint16(raw[0x2:])) | uint32(le.Uint16(raw[0x78:]))<<16
	in.Gid = uint32(le.Uint16(raw[0x18:])) | uint32(le.Uint16(raw[0x7A:]))<<16
	in.Size = uint64(le.Uint32(raw[0x4:]))
	if in.IsRegular() || f.sb.incompat(incompatLargeDir) {
		in.Size |= uint64(le.Uint32(raw[0x6C:])) << 32
	}
	in.Nlink = uint32(le.Uint16(raw[0x1A:]))
	in.Flags = le.Uint32(raw[0x20:])
	in.Generation = le.Uint32(raw[0x64:])
	in.XattrBlock = uint64(le.Uint32(raw[0x68:])) | uint64(le.Uint16(raw[0x76:]))<<32
	in.Blocks = uint64(le.Uint32(raw[0x1C:]))
	if f.sb.roCompat(roCompatHugeFile) {
		in.Blocks |= uint64(le.Uint16(raw[0x74:])) << 32
		if in.Flags&flagHugeFile != 0 {
			in.Blocks *= f.bs / 512
		}
	}
	if in.IsRegular() && in.hasInlineData() {
		// As the kernel reports it, so that tools do not take a file
		// whose bytes live in the inode for a sparse one.
		in.Blocks += (in.Size + 511) / 512
	}
	in.Atime = in.time(0x08, 0x8C)
	in.Ctime = in.time(0x0C, 0x84)
	in.Mtime = in.time(0x10, 0x88)
	if in.fits(0x90, 8) {
		in.Crtime = in.time(0x90, 0x94)
	}
	if t := in.Mode & S_IFMT; t == S_IFCHR || t == S_IFBLK {
		if old := le.Uint32(raw[0x28:]); old != 0 {
			in.Rdev = decodeOldDev(old)
		} else {
			in.Rdev = le.Uint32(raw[0x2C:])
		}
	}
	return in, nil
}

// time decodes a 32-bit seconds field and, when present, its extra field:
// two epoch bits that extend the seconds and 30 bits of nanoseconds.
func (in *Inode) time(secOff, extraOff int) Timespec {
	le := binary.LittleEndian
	t := Timespec{Sec: int64(int32(le.Uint32(in.raw[secOff:])))}
	if in.fits(extraOff, 4) {
		extra := le.Uint32(in.raw[extraOff:])
		t.Sec += int64(extra&3) << 32
		t.Nsec = extra >> 2 // not clamped below 1e9: the kernel shows it as stored
	}
	return t
}

// decodeOldDev converts the 16-bit device number of old inodes to the
// kernel's 32-bit encoding (major in bits 8-19, minor split around it).
func decodeOldDev(v uint32) uint32 {
	major, minor := v>>8&0xff, v&0xff
	return major<<8 | minor
}

// DevMajorMinor splits Rdev into major and minor numbers.
func (in *Inode) DevMajorMinor() (major, minor uint32) {
	d := in.Rdev
	return d & 0xfff00 >> 8, d&0xff | d>>12&0xfff00
}

// seed is the inode's checksum seed: the fs seed, the number, the generation.
func (f *FS) inodeSeed(in *Inode) uint32 {
	c := crc32cU32(f.seed, in.Ino)
	return crc32cU32(c, binary.LittleEndian.Uint32(in.raw[0x64:]))
}

func (f *FS) verifyInode(in *Inode) error {
	raw := in.raw
	le := binary.LittleEndian
	hi := len(raw) > 128 && in.fits(0x82, 2)
	c := f.inodeSeed(in)
	c = crc32c(c, raw[:0x7C])
	c = crc32c(c, zero4[:2])
	c = crc32c(c, raw[0x7E:128])
	want := uint32(le.Uint16(raw[0x7C:]))
	if len(raw) > 128 {
		c = crc32c(c, raw[128:0x82])
		if hi {
			c = crc32c(c, zero4[:2])
			c = crc32c(c, raw[0x84:])
			want |= uint32(le.Uint16(raw[0x82:])) << 16
		} else {
			c = crc32c(c, raw[0x82:])
		}
	}
	if !hi {
		c &= 0xFFFF
	}
	if c != want {
		return badChecksum("inode", in.Ino, 0)
	}
	return nil
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}
