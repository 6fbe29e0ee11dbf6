package hostagent

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"slices"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/internal/directio"
	"github.com/leasefs/leasefs/vsockproto"
)

// A capture reads what changed in the filesystem against a base
// generation (nil for the first): a delta. While writers are frozen it
// reads only what the change needs — the inode-table blocks that may hold
// changed inodes, and the blocks those inodes depend on — so the freeze
// costs what changed. Everything that grows with the filesystem (the full
// block map, the references it takes, the list of changes for guests) is
// done after the thaw, by delta.generation.
//
// A capture reads inode-table blocks — all of them, or with cand only
// those holding candidate inodes and those newly in use — and compares
// each inode with the base's; an inode whose bytes differ has its
// MetaBlocks listed and read again. An unchanged inode's blocks are
// carried over unread: ext4 changes an inode (its times, size or block
// count) whenever it changes a block the inode's metadata lives in.

// tableRange is the part of one group's inode table in use.
type tableRange struct{ start, used uint64 }

// delta is what a capture read, to become a generation over its base.
type delta struct {
	base   *Generation // nil: a first capture
	store  *Store
	bs     uint64
	meta   []uint64     // the superblock's and group descriptors' blocks
	tables []tableRange // the inode tables in use, by group
	read   map[uint64]Hash
	// Inodes whose bytes differ from the base's (in a first capture,
	// those with blocks of their own), and their metadata blocks now.
	changed []uint32
	deps    map[uint32][]uint64
	parsed  map[uint32]bool // changed inodes whose deps were redone
	dev     *directio.File  // for ext4ro's reads of blocks not read yet
	live    bool            // writers run: the store may write as the capture goes
	// Fingerprints of inode-table blocks: the base's, to skip unchanged
	// blocks without hashing them, and (live) this capture's.
	baseSums, sums map[uint64]int64
}

// tableSeed seeds the fingerprints of inode-table blocks. They only tell
// whether a block changed between a live capture and the freeze that
// follows it, and the seed is the process's secret, so no writer can make
// a change that keeps a block's fingerprint.
var tableSeed = maphash.MakeSeed()

func fingerprint(p []byte) int64 { return int64(maphash.Bytes(tableSeed, p)) }

// ReadAt reads as the capture sees the filesystem: each block once, from
// the device, and then as read.
func (d *delta) ReadAt(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		pos := uint64(off) + uint64(n)
		blk := pos / d.bs
		h, ok := d.read[blk]
		if !ok {
			// This block and the next not read yet, in one read.
			end := (uint64(off) + uint64(len(p)) + d.bs - 1) / d.bs
			run := uint64(1)
			for blk+run < end {
				if _, done := d.read[blk+run]; done {
					break
				}
				run++
			}
			buf := directio.AlignedBuf(int(run * d.bs))
			if _, err := d.dev.ReadAt(buf, int64(blk*d.bs)); err != nil {
				return n, err
			}
			for i := range run {
				d.keep(blk+i, buf[i*d.bs:(i+1)*d.bs])
			}
			h = d.read[blk]
		}
		b, err := d.store.get(h)
		if err != nil {
			return n, fmt.Errorf("block %d: %w", blk, err)
		}
		n += copy(p[n:], b[pos%d.bs:])
	}
	return n, nil
}

// readSuper reads the block that holds the superblock, the block size
// first: every other read is of whole blocks.
func (d *delta) readSuper() error {
	p := directio.AlignedBuf(4096)
	if _, err := d.dev.ReadAt(p, 0); err != nil {
		return fmt.Errorf("reading the superblock: %w", err)
	}
	lg := binary.LittleEndian.Uint32(p[1024+24:]) // s_log_block_size
	if lg > 6 {
		return fmt.Errorf("reading the device: no ext4 superblock (block size 2^%d KiB)", lg)
	}
	d.bs = 1024 << lg
	switch {
	case d.bs == 1024:
		d.keep(1, p[1024:2048])
	case d.bs <= 4096:
		d.keep(0, p[:d.bs])
	default:
		p = directio.AlignedBuf(int(d.bs))
		if _, err := d.dev.ReadAt(p, 0); err != nil {
			return fmt.Errorf("reading the superblock: %w", err)
		}
		d.keep(0, p)
	}
	return nil
}

// release drops the references of the blocks read.
func (d *delta) release() {
	for _, h := range d.read {
		d.store.unref(h)
	}
	d.read = nil
}

// scan is what a capture reads, and against what.
type scan struct {
	dev    *directio.File // the device, read with O_DIRECT
	tables io.ReaderAt    // the device through its page cache, for inode tables
	store  *Store
	base   *Generation      // nil: a first capture
	cand   map[uint32]bool  // nil: every inode
	sums   map[uint64]int64 // the base's inode-table blocks' fingerprints, if known
	// live marks a capture made while writers run; between then runs
	// after the inode tables are read and before anything they point to
	// is, and the capture notes its tables' fingerprints.
	live    bool
	between func() error
}

// capture reads the filesystem on s.dev against s.base, as a delta. Inode
// tables are read through s.tables, the device's page cache, where ext4
// keeps them itself (its buffer heads are that cache), so it is warm and
// never stale for them; other metadata with O_DIRECT: the page cache can
// hold stale file data for a block that has since become metadata.
func capture(s scan) (d *delta, err error) {
	d = &delta{base: s.base, store: s.store, read: map[uint64]Hash{}, deps: map[uint32][]uint64{}, parsed: map[uint32]bool{}, dev: s.dev, baseSums: s.sums}
	defer func() {
		if err != nil {
			d.release()
		}
	}()
	// While writers run, the journal is in use, and the superblock says
	// it needs recovery.
	if err := d.readSuper(); err != nil {
		return d, err
	}
	fs, err := ext4ro.Open(d, &ext4ro.Options{Size: s.dev.Size(), CacheBytes: 2 << 20, ReadAhead: 1, AllowDirtyJournal: s.live})
	if err != nil {
		return d, fmt.Errorf("reading the device: %w", err)
	}
	cand := s.cand
	if d.base != nil && uint64(d.base.BlockSize) != d.bs {
		d.base, d.baseSums = nil, nil // a different filesystem: start over
	}
	if d.base == nil {
		cand = nil
	}
	if s.live {
		d.live, d.sums = true, map[uint64]int64{}
	}
	if err := d.readMeta(fs); err != nil {
		return d, err
	}
	has, err := d.readTables(fs, s.tables, cand)
	if err != nil {
		return d, err
	}
	if s.between != nil {
		if err := s.between(); err != nil {
			return d, err
		}
	}
	return d, d.readDeps(fs, has)
}

// spill writes a live capture's blocks to the store's file as it goes,
// so that a first capture does not hold the filesystem's metadata in
// memory. A frozen capture keeps them until after the thaw.
func (d *delta) spill() error {
	if d.live && d.store.unwritten() >= 4<<20 {
		return d.store.flush()
	}
	return nil
}

// keep records block b as read, with content p.
func (d *delta) keep(b uint64, p []byte) { d.record(b, d.store.put(p)) }

// readMeta reads the superblock and the group descriptors.
func (d *delta) readMeta(fs *ext4ro.FS) error {
	d.meta = append([]uint64{1024 / d.bs}, fs.DescriptorBlocks()...)
	for _, b := range d.meta {
		if _, done := d.read[b]; done { // by readSuper, or ext4ro.Open
			continue
		}
		p := directio.AlignedBuf(int(d.bs))
		if _, err := d.dev.ReadAt(p, int64(b*d.bs)); err != nil {
			return fmt.Errorf("reading block %d: %w", b, err)
		}
		d.keep(b, p)
	}
	return nil
}

// readTables reads the inode-table blocks that may hold changed inodes —
// every one in use, or with cand those of the candidates and those not in
// use in the base — and notes the inodes whose bytes differ from the
// base's. It returns the changed inodes that may have blocks of their own.
func (d *delta) readTables(fs *ext4ro.FS, tables io.ReaderAt, cand map[uint32]bool) (map[uint32]bool, error) {
	sb := fs.Superblock()
	isz := uint64(sb.InodeSize)
	perBlock := d.bs / isz
	want := map[uint64]bool{}
	for ino := range cand {
		if ino == 0 || ino > sb.InodesCount {
			continue
		}
		b, _, err := fs.InodeBlock(ino)
		if err != nil {
			return nil, err
		}
		want[b] = true
	}
	has := map[uint32]bool{}
	var buf []byte
	for grp := range sb.GroupCount() {
		start, used, err := fs.InodeTable(grp)
		if err != nil {
			return nil, err
		}
		d.tables = append(d.tables, tableRange{start, used})
		// The blocks to read: all, or the candidates' and those the
		// base did not have in use.
		read := func(blk uint64) bool { return true }
		from := uint64(0)
		if cand != nil {
			var had uint64
			if int(grp) < len(d.base.tables) && d.base.tables[grp].start == start {
				had = d.base.tables[grp].used
			}
			read = func(blk uint64) bool { return want[blk] || blk >= start+had }
			from = used
			for b := range want {
				if b >= start && b < start+used {
					from = min(from, b-start)
				}
			}
			from = min(from, had)
		}
		for done := from; done < used; {
			if !read(start + done) {
				done++
				continue
			}
			n := uint64(1)
			for n < 256 && done+n < used && read(start+done+n) {
				n++
			}
			if uint64(len(buf)) < n*d.bs {
				buf = make([]byte, n*d.bs)
			}
			p := buf[:n*d.bs]
			if _, err := tables.ReadAt(p, int64((start+done)*d.bs)); err != nil {
				return nil, fmt.Errorf("reading blocks %d+%d: %w", start+done, n, err)
			}
			for i := range n {
				blk := start + done + i
				content := p[i*d.bs : (i+1)*d.bs]
				first := grp*sb.InodesPerGroup + uint32((done+i)*perBlock) + 1
				if err := d.compareTable(blk, content, first, isz, has); err != nil {
					return nil, err
				}
			}
			if err := d.spill(); err != nil {
				return nil, err
			}
			done += n
		}
	}
	return has, nil
}

// compareTable records inode-table block blk, whose first inode is first,
// and notes its inodes that differ from the base's. A block the same as
// the base's is known by its fingerprint or hash, and not compared.
func (d *delta) compareTable(blk uint64, content []byte, first uint32, isz uint64, has map[uint32]bool) error {
	var sum int64
	if d.sums != nil || d.baseSums != nil {
		sum = fingerprint(content)
	}
	if d.sums != nil {
		d.sums[blk] = sum
	}
	baseHash, inBase := d.base.lookup(blk)
	same := false
	var h Hash
	if bs, ok := d.baseSums[blk]; ok && inBase && bs == sum {
		same, h = true, baseHash
	} else {
		h = Hash(sha256.Sum256(content))
		same = inBase && h == baseHash
	}
	if same {
		d.store.ref(h)
		d.record(blk, h)
		return nil
	}
	var old []byte
	if inBase {
		var err error
		if old, err = d.store.get(baseHash); err != nil {
			return fmt.Errorf("block %d of the last generation: %w", blk, err)
		}
	}
	for k := range d.bs / isz {
		cur := content[k*isz : (k+1)*isz]
		meta := ext4ro.HasMetaBlocks(cur)
		switch ino := first + uint32(k); {
		case d.base == nil && !meta:
			// A first capture lists no changes: only inodes with blocks
			// of their own need a look.
		case old == nil || !bytes.Equal(cur, old[k*isz:(k+1)*isz]):
			d.changed = append(d.changed, ino)
			if meta {
				has[ino] = true
			}
		}
	}
	d.record(blk, d.store.putHashed(h, content))
	return nil
}

// record notes block blk as read, as h, whose reference it takes over.
func (d *delta) record(blk uint64, h Hash) {
	if prev, ok := d.read[blk]; ok {
		d.store.unref(prev)
	}
	d.read[blk] = h
}

// readDeps lists the metadata blocks of the changed inodes that have
// blocks of their own, and reads them, with those the changed inodes had
// in the base (shared ones, xattr blocks, may have changed for others).
func (d *delta) readDeps(fs *ext4ro.FS, has map[uint32]bool) error {
	sb := fs.Superblock()
	reread := map[uint64]bool{}
	for _, ino := range d.changed {
		d.parsed[ino] = true
		if d.base != nil {
			for _, b := range d.base.deps[ino] {
				reread[b] = true
			}
		}
		if !has[ino] {
			continue // no blocks of its own now
		}
		in, err := fs.Inode(ino)
		if errors.Is(err, ext4ro.ErrNotExist) || errors.Is(err, ext4ro.ErrInvalid) {
			continue // removed
		}
		if err != nil {
			return fmt.Errorf("inode %d: %w", ino, err)
		}
		if ino < sb.FirstIno && ino != ext4ro.RootIno {
			continue // the journal, resize inode and the like: never read by guests
		}
		var deps []uint64
		if err := fs.MetaBlocks(in, func(start, n uint64) {
			for b := start; b < start+n; b++ {
				deps = append(deps, b)
			}
		}); err != nil {
			return fmt.Errorf("inode %d: %w", ino, err)
		}
		if len(deps) > 0 {
			d.deps[ino] = deps
			for _, b := range deps {
				reread[b] = true
			}
		}
	}
	var toRead []uint64
	for b := range reread {
		if _, done := d.read[b]; !done {
			toRead = append(toRead, b)
		}
	}
	// Read them in runs: directories' blocks mostly lie together.
	slices.Sort(toRead)
	buf := directio.AlignedBuf(256 * int(d.bs))
	for i := 0; i < len(toRead); {
		j := i + 1
		for j < len(toRead) && j-i < 256 && toRead[j] == toRead[i]+uint64(j-i) {
			j++
		}
		p := buf[:uint64(j-i)*d.bs]
		if _, err := d.dev.ReadAt(p, int64(toRead[i]*d.bs)); err != nil {
			return fmt.Errorf("reading blocks %d+%d: %w", toRead[i], j-i, err)
		}
		for k := i; k < j; k++ {
			off := uint64(k-i) * d.bs
			d.keep(toRead[k], p[off:off+d.bs])
		}
		if err := d.spill(); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// generation makes the delta a generation: the base's block map and
// dependencies with the delta's laid over them. It takes the references
// the generation holds and drops those of blocks read but not kept. Its
// cost grows with the filesystem: it runs after the thaw.
func (d *delta) generation() (*Generation, error) {
	base := d.base
	g := &Generation{BlockSize: int(d.bs), store: d.store, All: base == nil, tables: d.tables}
	g.blocks = make(map[uint64]Hash, len(base.blockMap())+len(d.read))
	g.deps = make(map[uint32][]uint64, len(base.depMap())+len(d.deps))
	for ino, deps := range base.depMap() {
		if !d.parsed[ino] {
			g.deps[ino] = deps
		}
	}
	for ino, deps := range d.deps {
		g.deps[ino] = deps
	}
	var carried []uint64
	used := map[uint64]bool{}
	need := func(b uint64) error {
		if _, done := g.blocks[b]; done {
			return nil
		}
		if h, ok := d.read[b]; ok {
			g.blocks[b] = h
			used[b] = true
			return nil
		}
		if h, ok := base.blockMap()[b]; ok {
			g.blocks[b] = h
			carried = append(carried, b)
			return nil
		}
		return fmt.Errorf("block %d is metadata but was neither read nor captured before", b)
	}
	fail := func(err error) (*Generation, error) {
		for b := range used { // give the references back to d, which drops them
			delete(g.blocks, b)
		}
		d.release()
		return nil, err
	}
	for _, b := range d.meta {
		if err := need(b); err != nil {
			return fail(err)
		}
	}
	for _, t := range d.tables {
		for b := t.start; b < t.start+t.used; b++ {
			if err := need(b); err != nil {
				return fail(err)
			}
		}
	}
	for _, deps := range g.deps {
		for _, b := range deps {
			if err := need(b); err != nil {
				return fail(err)
			}
		}
	}
	d.store.refAll(g.blocks, carried)
	g.nblocks = len(g.blocks)
	var diff []uint64
	for b, h := range d.read {
		if !used[b] {
			d.store.unref(h)
			continue
		}
		if ph, ok := base.lookup(b); !ok || ph != h {
			diff = append(diff, b)
		}
	}
	d.read = nil
	slices.Sort(diff)
	g.Changed = vsockproto.Ranges(diff)
	if !g.All {
		g.ChangedInodes = d.changed
	}
	d.store.born(g)
	return g, nil
}

// lookup is g.blocks[b] for a possibly nil generation.
func (g *Generation) lookup(b uint64) (Hash, bool) {
	if g == nil {
		return Hash{}, false
	}
	h, ok := g.blocks[b]
	return h, ok
}

// blockMap and depMap are g's maps, or nil for a nil generation.
func (g *Generation) blockMap() map[uint64]Hash {
	if g == nil {
		return nil
	}
	return g.blocks
}

func (g *Generation) depMap() map[uint32][]uint64 {
	if g == nil {
		return nil
	}
	return g.deps
}

// changesSince lists what differs between prev and g, whole maps
// compared (for a generation captured against another base than prev).
func (g *Generation) changesSince(prev *Generation) {
	var diff []uint64
	for b, h := range g.blocks {
		if ph, ok := prev.lookup(b); !ok || ph != h {
			diff = append(diff, b)
		}
	}
	slices.Sort(diff)
	g.Changed = vsockproto.Ranges(diff)
}
