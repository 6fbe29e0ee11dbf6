package ext4ro

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Options tune Open. The zero value is a sensible default.
type Options struct {
	// Data, if set, serves file contents; metadata (superblock, group
	// descriptors, inode tables, directories, extent and xattr blocks,
	// symlink blocks) always comes from the reader given to Open. The
	// guest agent points Data at the shared device and metadata at a
	// generation.
	Data io.ReaderAt
	// Size is the image size in bytes, if known. A filesystem claiming
	// more blocks than that is refused as truncated.
	Size int64
	// CacheBytes bounds the metadata block cache (default 64 MiB). A
	// metadata reader that is a BlockSource keeps its own cache, and the
	// FS then keeps none.
	CacheBytes int64
	// AllowDirtyJournal opens a filesystem whose journal needs recovery.
	// The journal is not replayed: recently committed metadata changes
	// are invisible and the on-disk state may be inconsistent, so reads
	// can return stale data or corruption errors. Use it only to salvage.
	AllowDirtyJournal bool
	// SkipChecksums does not verify metadata checksums. For salvage.
	SkipChecksums bool
	// ReadAhead is how many blocks a miss in an inode table or a
	// directory reads at once (32); 1 reads none ahead, which suits a
	// metadata reader that is memory already.
	ReadAhead int
}

// BlockSource is what a metadata reader may offer besides ReadAt: whole
// blocks from its own cache, so that one cache serves many readers (the
// generations of a live filesystem, say) and nothing is copied. The slice
// returned for block n must be the block's bytes, exactly a block long,
// and never modified afterwards. ahead is a hint: the blocks after n, up
// to n+ahead-1, will likely be wanted soon.
type BlockSource interface {
	ReadBlock(n, ahead uint64) ([]byte, error)
}

// FS is an open, read-only ext2/3/4 filesystem. It is safe for concurrent
// use by many goroutines. It holds no locks across I/O; its only shared
// state is the block cache, which has its own locks.
type FS struct {
	meta, data io.ReaderAt
	sb         *Superblock
	bs         uint64      // block size
	cache      *blockCache // nil with src
	src        BlockSource // the metadata reader's own blocks, if it has them
	csum       bool        // metadata_csum: verify crc32c checksums
	gdtCsum    bool        // gdt_csum: crc16 on group descriptors
	seed       uint32      // checksum seed
	hashSigned bool        // directory hashes use signed chars
	descPerBlk uint32
	metaFd     int                         // the metadata reader's descriptor, for readahead advice; -1 if none
	readAhead  uint64                      // blocks per readahead
	groups     []atomic.Pointer[groupDesc] // descriptors read and checked so far
	stats      stats
}

type stats struct {
	htreeFallbacks atomic.Uint64
}

// Stats are counters of notable events since Open.
type Stats struct {
	// HtreeFallbacks counts lookups that found a damaged or unknown
	// htree index and searched the directory linearly instead.
	HtreeFallbacks uint64
}

// Stats returns the counters.
func (f *FS) Stats() Stats {
	return Stats{HtreeFallbacks: f.stats.htreeFallbacks.Load()}
}

// Open reads the superblock of the filesystem in r and checks that this
// reader can read it. Nothing else is read until asked for. r (and
// Options.Data) must stay open for as long as the FS is used.
func Open(r io.ReaderAt, opts *Options) (*FS, error) {
	if opts == nil {
		opts = &Options{}
	}
	sb, err := readSuperblock(r)
	if err != nil {
		return nil, err
	}
	if err := sb.checkFeatures(opts.AllowDirtyJournal); err != nil {
		return nil, err
	}
	if opts.Size > 0 && sb.BlocksCount > uint64(opts.Size)/uint64(sb.BlockSize) {
		return nil, fmt.Errorf("ext4ro: image is truncated: %d bytes hold %d of the filesystem's %d blocks: %w",
			opts.Size, uint64(opts.Size)/uint64(sb.BlockSize), sb.BlocksCount, ErrCorrupt)
	}
	f := &FS{
		meta:       r,
		data:       r,
		sb:         sb,
		bs:         uint64(sb.BlockSize),
		csum:       sb.roCompat(roCompatMetadataCsum) && !opts.SkipChecksums,
		gdtCsum:    sb.roCompat(roCompatGdtCsum) && !sb.roCompat(roCompatMetadataCsum) && !opts.SkipChecksums,
		hashSigned: sb.Flags&flagUnsignedHash == 0,
		descPerBlk: sb.BlockSize / uint32(sb.DescSize),
	}
	if opts.Data != nil {
		f.data = opts.Data
	}
	f.readAhead = readAheadBlocks
	if opts.ReadAhead > 0 {
		f.readAhead = uint64(opts.ReadAhead)
	}
	if n := sb.GroupCount(); n <= maxCachedGroups { // whatever a corrupt superblock claims
		f.groups = make([]atomic.Pointer[groupDesc], n)
	}
	f.metaFd = -1
	if fd, ok := r.(interface{ Fd() uintptr }); ok {
		f.metaFd = int(fd.Fd())
	}
	if sb.incompat(incompatCsumSeed) {
		f.seed = sb.ChecksumSeed
	} else {
		f.seed = crc32c(^uint32(0), sb.UUID[:])
	}
	if src, ok := r.(BlockSource); ok {
		f.src = src
	} else {
		cacheBytes := opts.CacheBytes
		if cacheBytes <= 0 {
			cacheBytes = 64 << 20
		}
		f.cache = newBlockCache(int(max(cacheBytes/int64(f.bs), 64)))
	}
	// Read group 0's descriptor now so that a broken descriptor table
	// fails Open rather than the first lookup.
	if _, err := f.group(0); err != nil {
		return nil, err
	}
	return f, nil
}

// Superblock returns a copy of the parsed superblock.
func (f *FS) Superblock() Superblock { return *f.sb }

// BlockSize is the filesystem block size in bytes.
func (f *FS) BlockSize() int { return int(f.bs) }

// block returns filesystem block n from the metadata reader, through the
// cache. The returned slice is shared and must not be modified.
func (f *FS) block(n uint64) ([]byte, error) { return f.blockAhead(n, 1) }

// readAheadBlocks is how many blocks a miss on an inode table or a
// directory reads at once, as ext4's inode_readahead_blks does.
const readAheadBlocks = 32

// blockAhead returns block n like block. On a cache miss it also starts
// reading the next ahead-1 blocks: when the metadata reader is a file, the
// kernel reads them in the background (posix_fadvise WILLNEED) while only
// block n is waited for, as ext4's own inode table readahead does;
// otherwise they are read along with block n and cached.
func (f *FS) blockAhead(n, ahead uint64) ([]byte, error) {
	if n >= f.sb.BlocksCount {
		return nil, corrupt("block pointer", 0, n, "beyond the end of the filesystem (%d blocks)", f.sb.BlocksCount)
	}
	if f.src != nil {
		b, err := f.src.ReadBlock(n, max(min(ahead, f.readAhead, f.sb.BlocksCount-n), 1))
		if err != nil {
			return nil, fmt.Errorf("ext4ro: reading block %d: %w", n, err)
		}
		if uint64(len(b)) != f.bs {
			return nil, fmt.Errorf("ext4ro: reading block %d: the block source gave %d bytes, not %d", n, len(b), f.bs)
		}
		return b, nil
	}
	if b, ok := f.cache.get(n); ok {
		return b, nil
	}
	ahead = max(min(ahead, f.readAhead, f.sb.BlocksCount-n), 1)
	if ahead > 1 && f.metaFd >= 0 {
		// Advice only: an error changes nothing but speed.
		_ = unix.Fadvise(f.metaFd, int64((n+1)*f.bs), int64((ahead-1)*f.bs), unix.FADV_WILLNEED)
		ahead = 1
	}
	buf := make([]byte, ahead*f.bs)
	got, err := f.meta.ReadAt(buf, int64(n*f.bs))
	if got < int(f.bs) {
		if err == nil || errors.Is(err, io.EOF) {
			return nil, corrupt("block pointer", 0, n, "beyond the end of the image")
		}
		return nil, fmt.Errorf("ext4ro: reading block %d: %w", n, err)
	}
	first := buf[:f.bs:f.bs]
	f.cache.add(n, first)
	// Cache the rest as separate blocks, so that one long-lived block
	// does not keep the whole read alive.
	for i := uint64(1); i < uint64(got)/f.bs; i++ {
		if _, ok := f.cache.get(n + i); !ok {
			f.cache.add(n+i, append([]byte(nil), buf[i*f.bs:(i+1)*f.bs]...))
		}
	}
	return first, nil
}

// Statfs is what statfs(2) reports for the filesystem.
type Statfs struct {
	BlockSize   uint32
	Blocks      uint64
	FreeBlocks  uint64
	AvailBlocks uint64
	Inodes      uint64
	FreeInodes  uint64
	NameLen     uint32
}

// Statfs reports sizes and free counts from the superblock.
func (f *FS) Statfs() Statfs {
	sb := f.sb
	avail := uint64(0)
	if sb.FreeBlocks > sb.ReservedBlocks {
		avail = sb.FreeBlocks - sb.ReservedBlocks
	}
	return Statfs{
		BlockSize:   sb.BlockSize,
		Blocks:      sb.BlocksCount - uint64(sb.FirstDataBlock),
		FreeBlocks:  sb.FreeBlocks,
		AvailBlocks: avail,
		Inodes:      uint64(sb.InodesCount),
		FreeInodes:  uint64(sb.FreeInodes),
		NameLen:     255,
	}
}

// groupDesc is the part of a block group descriptor the reader uses.
type groupDesc struct {
	inodeTable   uint64
	flags        uint16
	itableUnused uint32
}

const bgInodeUninit = 0x1

// maxCachedGroups bounds the descriptors kept parsed (a million groups:
// 128 TiB of 4 KiB blocks).
const maxCachedGroups = 1 << 20

// group returns the descriptor of block group g, read and checked once.
func (f *FS) group(g uint32) (groupDesc, error) {
	if g >= f.sb.GroupCount() {
		return groupDesc{}, fmt.Errorf("ext4ro: group %d out of range: %w", g, ErrInvalid)
	}
	if g >= uint32(len(f.groups)) {
		return f.readGroup(g)
	}
	if gd := f.groups[g].Load(); gd != nil {
		return *gd, nil
	}
	gd, err := f.readGroup(g)
	if err == nil {
		f.groups[g].Store(&gd)
	}
	return gd, err
}

// readGroup reads and verifies the descriptor of block group g.
func (f *FS) readGroup(g uint32) (groupDesc, error) {
	sb := f.sb
	blk := f.descBlock(g / f.descPerBlk)
	b, err := f.block(blk)
	if err != nil {
		return groupDesc{}, err
	}
	off := (g % f.descPerBlk) * uint32(sb.DescSize)
	d := b[off : off+uint32(sb.DescSize)]
	le := binary.LittleEndian
	switch {
	case f.csum:
		c := crc32cU32(f.seed, g)
		c = crc32c(c, d[:0x1E])
		c = crc32c(c, zero4[:2])
		c = crc32c(c, d[0x20:])
		if uint16(c) != le.Uint16(d[0x1E:]) {
			return groupDesc{}, badChecksum(fmt.Sprintf("group descriptor %d", g), 0, blk)
		}
	case f.gdtCsum:
		c := crc16(0xFFFF, sb.UUID[:])
		var gb [4]byte
		le.PutUint32(gb[:], g)
		c = crc16(c, gb[:])
		c = crc16(c, d[:0x1E])
		if len(d) > 0x20 {
			c = crc16(c, d[0x20:])
		}
		if c != le.Uint16(d[0x1E:]) {
			return groupDesc{}, badChecksum(fmt.Sprintf("group descriptor %d", g), 0, blk)
		}
	}
	gd := groupDesc{
		inodeTable:   uint64(le.Uint32(d[0x8:])),
		flags:        le.Uint16(d[0x12:]),
		itableUnused: uint32(le.Uint16(d[0x1C:])),
	}
	if sb.DescSize >= 64 {
		gd.inodeTable |= uint64(le.Uint32(d[0x28:])) << 32
		gd.itableUnused |= uint32(le.Uint16(d[0x32:])) << 16
	}
	if !f.csum && !f.gdtCsum {
		// Without checksums the kernel ignores these hints too.
		gd.flags &^= bgInodeUninit
		gd.itableUnused = 0
	}
	itBlocks := (uint64(sb.InodesPerGroup)*uint64(sb.InodeSize) + f.bs - 1) / f.bs
	if gd.inodeTable < uint64(sb.FirstDataBlock) || gd.inodeTable+itBlocks > sb.BlocksCount {
		return groupDesc{}, corrupt(fmt.Sprintf("group descriptor %d", g), 0, blk,
			"inode table at block %d is outside the filesystem", gd.inodeTable)
	}
	return gd, nil
}

// descBlock returns the block holding the descriptors of the idx-th block
// of descriptors, in the classic layout or meta_bg's.
func (f *FS) descBlock(idx uint32) uint64 {
	sb := f.sb
	first := uint64(sb.FirstDataBlock) + 1
	if !sb.incompat(incompatMetaBG) || idx < sb.FirstMetaBG {
		return first + uint64(idx)
	}
	// meta_bg: descriptor block idx lives in the first group of its
	// meta-group, after that group's superblock backup if it has one.
	g := idx * f.descPerBlk
	blk := uint64(g)*uint64(sb.BlocksPerGroup) + uint64(sb.FirstDataBlock)
	if f.hasSuper(g) {
		blk++
	}
	if f.bs == 1024 && idx == 0 && sb.FirstDataBlock == 0 {
		blk++ // 1 KiB blocks with bigalloc: block 1 is the superblock
	}
	return blk
}

// hasSuper reports whether group g holds a superblock backup.
func (f *FS) hasSuper(g uint32) bool {
	sb := f.sb
	if g == 0 {
		return true
	}
	if sb.compat(compatSparse2) {
		return g == sb.BackupBGs[0] || g == sb.BackupBGs[1]
	}
	if g <= 1 || !sb.roCompat(roCompatSparseSuper) {
		return true
	}
	if g&1 == 0 {
		return false
	}
	return isPow(g, 3) || isPow(g, 5) || isPow(g, 7)
}

func isPow(n, base uint32) bool {
	for n%base == 0 {
		n /= base
	}
	return n == 1
}
