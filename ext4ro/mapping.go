package ext4ro

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/leasefs/leasefs/layout"
)

// Extent is a run of a file's blocks: file blocks [Logical,
// Logical+Count) live in device blocks [Physical, Physical+Count).
// Unwritten extents read as zeros.
type Extent = layout.Extent

// Map returns the block map of in, in logical order, holes left out. A
// file whose bytes live in the inode (inline data) has none. With it and
// the data reader a caller can read the file's bytes as they were when
// it was mapped, whatever becomes of the metadata later.
func (f *FS) Map(in *Inode) ([]Extent, error) {
	if in.Encrypted() {
		return nil, fmt.Errorf("ext4ro: inode %d: %w", in.Ino, ErrEncrypted)
	}
	var m []Extent
	err := f.walkMap(in, 0, maxFileBlocks, func(r run) error {
		m = append(m, Extent{Logical: r.logical, Physical: r.physical, Count: r.length, Unwritten: r.unwritten})
		return nil
	})
	return m, err
}

// MetaBlocks calls fn(start, count) for every block outside the inode
// table that holds in's metadata: extent tree and indirect blocks, the
// xattr block, and the data blocks of directories, slow symlinks and
// xattr inodes. Together with the superblock, the group descriptors and
// the inode tables these are every block this package reads through the
// metadata reader for in; file data is the rest.
func (f *FS) MetaBlocks(in *Inode, fn func(start, count uint64)) error {
	if in.XattrBlock != 0 {
		fn(in.XattrBlock, 1)
	}
	slowLink := in.IsSymlink() && !f.isFastSymlink(in)
	if !in.IsRegular() && !in.IsDir() && !slowLink {
		return nil // i_block holds a device number or a link target
	}
	data := in.IsDir() || in.Flags&flagEAInode != 0 || slowLink
	return f.walkMapTree(in, 0, maxFileBlocks, func(r run) error {
		if data {
			fn(r.physical, r.length)
		}
		return nil
	}, func(b uint64) { fn(b, 1) })
}

// DescriptorBlocks returns the blocks that hold the group descriptors.
func (f *FS) DescriptorBlocks() []uint64 {
	n := (f.sb.GroupCount() + f.descPerBlk - 1) / f.descPerBlk
	bs := make([]uint64, n)
	for i := range n {
		bs[i] = f.descBlock(i)
	}
	return bs
}

// InodeTable returns where group g's inode table starts and how many of
// its blocks are in use; the rest are uninitialised and never read.
func (f *FS) InodeTable(g uint32) (start, used uint64, err error) {
	gd, err := f.group(g)
	if err != nil {
		return 0, 0, err
	}
	if gd.flags&bgInodeUninit != 0 {
		return gd.inodeTable, 0, nil
	}
	sb := f.sb
	inUse := uint64(sb.InodesPerGroup - min(gd.itableUnused, sb.InodesPerGroup))
	return gd.inodeTable, (inUse*uint64(sb.InodeSize) + f.bs - 1) / f.bs, nil
}

// File is a regular file's content as it was mapped when opened: its
// size, its extents (or its inline bytes) and the data reader. It reads
// the same device blocks whatever later happens to the metadata it came
// from, as an open file on a local filesystem keeps reading its inode.
type File struct {
	size   uint64
	bs     uint64
	ext    []Extent
	inline []byte
	data   io.ReaderAt
}

// OpenFile maps regular file in for reading through the data reader.
func (f *FS) OpenFile(in *Inode) (*File, error) {
	if !in.IsRegular() {
		return nil, fmt.Errorf("ext4ro: inode %d is not a regular file: %w", in.Ino, ErrInvalid)
	}
	fl := &File{size: in.Size, bs: f.bs, data: f.data}
	if in.hasInlineData() {
		fl.inline = make([]byte, in.Size)
		if _, err := f.readFile(in, fl.inline, 0, nil); err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		return fl, nil
	}
	var err error
	fl.ext, err = f.Map(in)
	return fl, err
}

// Size is the file's size when it was opened.
func (fl *File) Size() uint64 { return fl.size }

// Extents returns the file's extents; they must not be modified.
func (fl *File) Extents() []Extent { return fl.ext }

// Inline reports whether the file's bytes are kept in its inode, so
// reads touch no data block.
func (fl *File) Inline() bool { return fl.inline != nil }

// ReadAt reads like FS.ReadAt: holes and unwritten extents are zeros, and
// a read reaching the end returns io.EOF with the bytes before it.
func (fl *File) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("ext4ro: negative offset %d: %w", off, ErrInvalid)
	}
	if uint64(off) >= fl.size {
		return 0, io.EOF
	}
	want := len(p)
	n := int(min(uint64(len(p)), fl.size-uint64(off)))
	p = p[:n]
	if fl.inline != nil {
		copy(p, fl.inline[off:])
	} else {
		clear(p)
		start, end := uint64(off), uint64(off)+uint64(n)
		i, _ := slices.BinarySearchFunc(fl.ext, start/fl.bs, func(e Extent, b uint64) int {
			return cmp.Compare(e.Logical+e.Count, b+1)
		})
		for ; i < len(fl.ext); i++ {
			e := fl.ext[i]
			from, to := max(e.Logical*fl.bs, start), min((e.Logical+e.Count)*fl.bs, end)
			if from >= end {
				break
			}
			if from >= to || e.Unwritten {
				continue
			}
			dst := p[from-start : to-start]
			if _, err := fl.data.ReadAt(dst, int64(e.Physical*fl.bs+from-e.Logical*fl.bs)); err != nil && !errors.Is(err, io.EOF) {
				return 0, fmt.Errorf("ext4ro: reading device block %d: %w", e.Physical+(from/fl.bs-e.Logical), err)
			}
		}
	}
	if n < want {
		return n, io.EOF
	}
	return n, nil
}

// HasMetaBlocks reports, from an inode's bytes as they are in the inode
// table and without checking them, whether MetaBlocks could list any
// block for it: a cheap filter for a scan of every inode. It is false for
// unused and unlinked inodes, devices, FIFOs and sockets, and regular
// files whose extents or block pointers all fit in the inode.
func HasMetaBlocks(raw []byte) bool {
	if len(raw) < 128 {
		return false
	}
	le := binary.LittleEndian
	mode, links := le.Uint16(raw[0:]), le.Uint16(raw[0x1A:])
	if mode == 0 || links == 0 {
		return false
	}
	if le.Uint32(raw[0x68:]) != 0 || le.Uint16(raw[0x76:]) != 0 { // xattr block
		return true
	}
	flags := le.Uint32(raw[0x20:])
	switch uint32(mode) & S_IFMT {
	case S_IFDIR, S_IFLNK:
		return true
	case S_IFREG:
	default:
		return false
	}
	switch {
	case flags&(flagEAInode) != 0:
		return true
	case flags&flagInlineData != 0:
		return false
	case flags&flagExtents != 0:
		return le.Uint16(raw[0x28+6:]) > 0 // depth: an index in the inode
	}
	for i := 12; i < 15; i++ { // indirect block pointers
		if le.Uint32(raw[0x28+4*i:]) != 0 {
			return true
		}
	}
	return false
}
