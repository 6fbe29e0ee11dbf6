package hostagent

import (
	"fmt"
	"time"

	"github.com/leasefs/leasefs/vsockproto"
)

// Generation is a numbered, immutable state of an export's metadata:
// every block a reader of the filesystem reads besides file data (the
// superblock, the group descriptors, the used inode tables and each
// inode's MetaBlocks), as it was during one freeze.
type Generation struct {
	Number    uint64
	BlockSize int
	Frozen    time.Duration // how long writers were held by the freeze
	Full      bool          // captured by a full scan, not a narrowed one
	Scan      time.Duration // the scan, part of Frozen
	Resolve   time.Duration // resolving changed names to inodes, part of Frozen
	Ioctls    time.Duration // FIFREEZE and FITHAW themselves, part of Frozen
	Captured  time.Time

	// What changed since the generation before: the blocks whose bytes
	// differ (or that are new) and the inodes whose bytes differ. All is
	// set for the first generation and after a generation with gaps.
	Changed       []vsockproto.BlockRange
	ChangedInodes []uint32
	All           bool

	store  *Store
	blocks map[uint64]Hash     // block number → content
	deps   map[uint32][]uint64 // inode → its MetaBlocks, for the next capture
}

// Blocks returns how many metadata blocks the generation holds.
func (g *Generation) Blocks() int { return len(g.blocks) }

// Has reports whether block n is metadata of the generation.
func (g *Generation) Has(n uint64) bool { _, ok := g.blocks[n]; return ok }

// ReadAt reads the generation's metadata as an image would read: a block
// that is not metadata of this generation is an error, so nothing but
// metadata is ever served from it. It makes a Generation the metadata
// reader of an ext4ro.FS.
func (g *Generation) ReadAt(p []byte, off int64) (int, error) {
	if n := g.copyOut(p, off); n < len(p) {
		return n, fmt.Errorf("generation %d: block %d is not metadata", g.Number, (off+int64(n))/int64(g.BlockSize))
	}
	return len(p), nil
}

// copyOut copies the bytes at off into p for as long as their blocks are
// in the generation, and returns how many it copied.
func (g *Generation) copyOut(p []byte, off int64) int {
	bs := int64(g.BlockSize)
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		h, ok := g.blocks[uint64(pos/bs)]
		if !ok {
			break
		}
		n += copy(p[n:], g.store.get(h)[pos%bs:])
	}
	return n
}

// release drops the generation's references to its blocks.
func (g *Generation) release() {
	for _, h := range g.blocks {
		g.store.unref(h)
	}
	g.blocks = nil
}
