// Package layout describes where a file's data lives on its filesystem's
// device — runs of blocks — and hashes that description as the wire
// protocol defines it (docs/protocol.md, "Layout hash"). It is a leaf:
// the ext4 reader produces layouts, the lease coordinator reads them
// from the kernel with FIEMAP, and both agents compare their hashes,
// without any of them depending on another.
package layout

import (
	"encoding/binary"
	"hash/fnv"
)

// Extent is a run of a file's mapped blocks: file blocks [Logical,
// Logical+Count) live in device blocks [Physical, Physical+Count), in
// filesystem blocks. Unwritten extents read as zeros.
type Extent struct {
	Logical, Physical, Count uint64
	Unwritten                bool
}

// Hash is the layout hash: runs merged where they continue each other in
// logical and physical block with the same unwritten state, empty runs
// left out, then FNV-1a (64 bits) over each run as u64 logical, u64
// physical, u64 count, u8 unwritten. No runs hash to 0, which the
// protocol reads as "do not check". The runs must be sorted by Logical.
func Hash(runs []Extent) uint64 {
	h := fnv.New64a()
	var b [25]byte
	put := func(r Extent) {
		binary.LittleEndian.PutUint64(b[0:], r.Logical)
		binary.LittleEndian.PutUint64(b[8:], r.Physical)
		binary.LittleEndian.PutUint64(b[16:], r.Count)
		b[24] = 0
		if r.Unwritten {
			b[24] = 1
		}
		h.Write(b[:])
	}
	var cur Extent // the run being merged; Count 0 before the first
	for _, r := range runs {
		switch {
		case r.Count == 0:
			continue
		case cur.Count > 0 && cur.Logical+cur.Count == r.Logical && cur.Physical+cur.Count == r.Physical && cur.Unwritten == r.Unwritten:
			cur.Count += r.Count
			continue
		case cur.Count > 0:
			put(cur)
		}
		cur = r
	}
	if cur.Count == 0 {
		return 0
	}
	put(cur)
	return h.Sum64()
}
