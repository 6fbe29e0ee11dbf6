package ext4ro

import (
	"encoding/binary"
	"fmt"
)

// A run maps the file blocks [logical, logical+length) to the device
// blocks [physical, physical+length). Unwritten runs read as zeros.
type run struct {
	logical, physical, length uint64
	unwritten                 bool
}

// maxFileBlocks bounds logical block numbers: ext4's are 32 bits.
const maxFileBlocks = 1 << 32

// walkMap calls fn, in logical order, for every run of in that overlaps
// the file blocks [from, to). Runs are not clipped to the range. Holes are
// simply not visited. Every pointer is checked; a malformed map is an
// ErrCorrupt naming the inode and block.
func (f *FS) walkMap(in *Inode, from, to uint64, fn func(run) error) error {
	return f.walkMapTree(in, from, to, fn, nil)
}

// walkMapTree is walkMap that also calls tree, if not nil, with each
// extent tree or indirect block it reads.
func (f *FS) walkMapTree(in *Inode, from, to uint64, fn func(run) error, tree func(uint64)) error {
	to = min(to, maxFileBlocks)
	if from >= to {
		return nil
	}
	if in.hasExtents() {
		w := extentWalker{f: f, in: in, from: from, to: to, fn: fn, tree: tree}
		return w.node(in.iblock(), 0, -1)
	}
	if in.hasInlineData() {
		return nil
	}
	w := indirectWalker{f: f, in: in, from: from, to: to, fn: fn, per: f.bs / 4, tree: tree}
	return w.walk()
}

const extentMagic = 0xF30A

type extentWalker struct {
	f        *FS
	in       *Inode
	from, to uint64
	fn       func(run) error
	next     uint64              // every later run must start at or after this
	seen     map[uint64]struct{} // tree blocks visited, against shared subtrees
	tree     func(uint64)        // told of every tree block read, if not nil
}

// node walks one extent tree node. blk is 0 for the root in the inode;
// wantDepth is the depth the parent expects, or -1 at the root.
func (w *extentWalker) node(b []byte, blk uint64, wantDepth int) error {
	le := binary.LittleEndian
	ino := w.in.Ino
	if le.Uint16(b[0:]) != extentMagic {
		return corrupt("extent header", ino, blk, "bad magic %#x", le.Uint16(b[0:]))
	}
	entries, maxEntries, depth := int(le.Uint16(b[2:])), int(le.Uint16(b[4:])), int(le.Uint16(b[6:]))
	if capacity := (len(b) - 12) / 12; maxEntries > capacity || entries > maxEntries {
		return corrupt("extent header", ino, blk, "%d entries, max %d, room for %d", entries, maxEntries, capacity)
	}
	if depth > 5 || (wantDepth >= 0 && depth != wantDepth) {
		return corrupt("extent header", ino, blk, "depth %d, expected %d", depth, wantDepth)
	}
	if blk != 0 && w.f.csum {
		tail := 12 + 12*maxEntries
		if tail+4 > len(b) {
			return corrupt("extent block", ino, blk, "no room for the checksum")
		}
		if crc32c(w.f.inodeSeed(w.in), b[:tail]) != le.Uint32(b[tail:]) {
			return badChecksum("extent block", ino, blk)
		}
	}
	if depth == 0 {
		return w.leaf(b, blk, entries)
	}
	// Index node: visit the children whose ranges overlap [from, to).
	// Child i covers [start_i, start_{i+1}).
	start := func(i int) uint64 { return uint64(le.Uint32(b[12+12*i:])) }
	first := 0
	for i := 1; i < entries; i++ {
		if start(i) <= start(i-1) {
			return corrupt("extent index", ino, blk, "entries out of order")
		}
		if start(i) <= w.from {
			first = i
		}
	}
	for i := first; i < entries && start(i) < w.to; i++ {
		e := b[12+12*i:]
		child := uint64(le.Uint32(e[4:])) | uint64(le.Uint16(e[8:]))<<32
		if w.seen == nil {
			w.seen = make(map[uint64]struct{})
		}
		if _, dup := w.seen[child]; dup {
			return corrupt("extent index", ino, blk, "block %d is referenced twice", child)
		}
		w.seen[child] = struct{}{}
		if w.tree != nil {
			w.tree(child)
		}
		cb, err := w.f.block(child)
		if err != nil {
			return fmt.Errorf("inode %d: extent tree: %w", ino, err)
		}
		if err := w.node(cb, child, depth-1); err != nil {
			return err
		}
	}
	return nil
}

func (w *extentWalker) leaf(b []byte, blk uint64, entries int) error {
	le := binary.LittleEndian
	ino := w.in.Ino
	for i := range entries {
		e := b[12+12*i:]
		r := run{
			logical:  uint64(le.Uint32(e[0:])),
			length:   uint64(le.Uint16(e[4:])),
			physical: uint64(le.Uint16(e[6:]))<<32 | uint64(le.Uint32(e[8:])),
		}
		if r.length > 32768 {
			r.length -= 32768
			r.unwritten = true
		}
		if r.length == 0 {
			return corrupt("extent", ino, blk, "zero length at file block %d", r.logical)
		}
		if r.logical < w.next {
			return corrupt("extent", ino, blk, "file block %d overlaps the previous extent", r.logical)
		}
		w.next = r.logical + r.length
		if r.physical < uint64(w.f.sb.FirstDataBlock) || r.physical+r.length > w.f.sb.BlocksCount {
			return corrupt("extent", ino, blk, "blocks %d+%d are outside the filesystem", r.physical, r.length)
		}
		if r.logical+r.length <= w.from {
			continue
		}
		if r.logical >= w.to {
			return nil
		}
		if err := w.fn(r); err != nil {
			return err
		}
	}
	return nil
}

// indirectWalker walks an ext2/ext3 block map: 12 direct pointers, then a
// single, a double and a triple indirect block.
type indirectWalker struct {
	f        *FS
	in       *Inode
	from, to uint64
	fn       func(run) error
	per      uint64       // pointers per block
	pending  run          // adjacent blocks are merged into one run
	tree     func(uint64) // told of every indirect block read, if not nil
}

func (w *indirectWalker) walk() error {
	le := binary.LittleEndian
	ib := w.in.iblock()
	for i := uint64(0); i < 12; i++ {
		if err := w.emit(i, uint64(le.Uint32(ib[4*i:])), 0); err != nil {
			return err
		}
	}
	base, span := uint64(12), w.per
	for level := 1; level <= 3; level++ {
		if err := w.emit(base, uint64(le.Uint32(ib[4*(11+level):])), level); err != nil {
			return err
		}
		base += span
		span *= w.per
	}
	return w.flush()
}

// emit handles pointer p covering file blocks from logical on, at the
// given indirection level (0 = a data block).
func (w *indirectWalker) emit(logical, p uint64, level int) error {
	span := uint64(1)
	for range level {
		span *= w.per
	}
	if p == 0 || logical >= w.to || logical+span <= w.from {
		return nil
	}
	if p < uint64(w.f.sb.FirstDataBlock) || p >= w.f.sb.BlocksCount {
		return corrupt("block map", w.in.Ino, 0, "pointer %d for file block %d is outside the filesystem", p, logical)
	}
	if level == 0 {
		if w.pending.length > 0 && w.pending.logical+w.pending.length == logical &&
			w.pending.physical+w.pending.length == p {
			w.pending.length++
			return nil
		}
		if err := w.flush(); err != nil {
			return err
		}
		w.pending = run{logical: logical, physical: p, length: 1}
		return nil
	}
	if w.tree != nil {
		w.tree(p)
	}
	b, err := w.f.block(p)
	if err != nil {
		return fmt.Errorf("inode %d: block map: %w", w.in.Ino, err)
	}
	child := span / w.per
	le := binary.LittleEndian
	for i := uint64(0); i < w.per; i++ {
		if err := w.emit(logical+i*child, uint64(le.Uint32(b[4*i:])), level-1); err != nil {
			return err
		}
	}
	return nil
}

func (w *indirectWalker) flush() error {
	if w.pending.length == 0 {
		return nil
	}
	r := w.pending
	w.pending = run{}
	return w.fn(r)
}
