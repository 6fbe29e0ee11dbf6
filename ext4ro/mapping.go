package ext4ro

import "fmt"

// Extent is a run of a file's blocks: file blocks [Logical,
// Logical+Count) live in device blocks [Physical, Physical+Count).
// Unwritten extents read as zeros.
type Extent struct {
	Logical, Physical, Count uint64
	Unwritten                bool
}

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
