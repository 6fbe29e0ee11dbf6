package hostagent

import (
	"cmp"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"

	"github.com/leasefs/leasefs/ext4ro"
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
	Phases    Phases        // every step of the publish, timed
	Captured  time.Time
	Label     string // what it was published as (an upstream revision), or ""

	// What changed since the generation before: the blocks whose bytes
	// differ (or that are new) and the inodes whose bytes differ. All is
	// set for the first generation and after a generation with gaps.
	Changed       []vsockproto.BlockRange
	ChangedInodes []uint32
	All           bool

	store   *Store
	blocks  map[uint64]Hash     // block number → content; nil once released
	nblocks int                 // len(blocks) as captured: read without a reference (status)
	deps    map[uint32][]uint64 // inode → its MetaBlocks, for the next capture
	tables  []tableRange        // the inode tables in use, for the next capture

	// refs counts the export's hold on the generation (one, until it
	// is dropped) and each request reading it (Export.Generation to
	// Release); the last release frees its blocks, so a drop never
	// pulls blocks from under a reader.
	refs   atomic.Int64
	fsOnce sync.Once
	fs     *ext4ro.FS
	fsErr  error
}

// acquire takes a reference, unless the last one is gone.
func (g *Generation) acquire() bool {
	for {
		n := g.refs.Load()
		if n <= 0 {
			return false
		}
		if g.refs.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// Release gives back a reference from Export.Generation.
func (g *Generation) Release() {
	if g.refs.Add(-1) == 0 {
		g.release()
	}
}

// FS is the generation's reader, opened on first use. It reads the
// generation's blocks where the store keeps them (a BlockSource), so it
// keeps no cache of its own.
func (g *Generation) FS() (*ext4ro.FS, error) {
	g.fsOnce.Do(func() { g.fs, g.fsErr = ext4ro.Open(g, nil) })
	return g.fs, g.fsErr
}

// ReadBlock returns block n, shared with the store: it makes a
// Generation an ext4ro.BlockSource.
func (g *Generation) ReadBlock(n, _ uint64) ([]byte, error) {
	h, ok := g.blocks[n]
	if !ok {
		return nil, fmt.Errorf("generation %d: block %d is not metadata", g.Number, n)
	}
	b, err := g.store.get(h)
	if err != nil {
		return nil, fmt.Errorf("generation %d: block %d: %w", g.Number, n, err)
	}
	return b, nil
}

// Blocks returns how many metadata blocks the generation holds (held:
// it may be asked of one being dropped, which no longer has them).
func (g *Generation) Blocks() int { return g.nblocks }

// Has reports whether block n is metadata of the generation.
func (g *Generation) Has(n uint64) bool { _, ok := g.blocks[n]; return ok }

// Digest returns the SHA-256 of block n, if it is metadata of the
// generation: the store's name for it.
func (g *Generation) Digest(n uint64) (Hash, bool) { h, ok := g.blocks[n]; return h, ok }

// ReadAt reads the generation's metadata as an image would read: a block
// that is not metadata of this generation is an error, so nothing but
// metadata is ever served from it.
func (g *Generation) ReadAt(p []byte, off int64) (int, error) {
	bs := int64(g.BlockSize)
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		b, err := g.ReadBlock(uint64(pos/bs), 1)
		if err != nil {
			return n, err
		}
		n += copy(p[n:], b[pos%bs:])
	}
	return n, nil
}

// release drops the generation's references to its blocks.
func (g *Generation) release() {
	g.store.dying(g, func() {
		for _, h := range g.blocks {
			g.store.unref(h)
		}
		g.blocks = nil
	})
}

// GenState is a kept generation as handed to a successor: the blocks it
// names are in the store handed over with it.
type GenState struct {
	Number    uint64
	BlockSize int
	Captured  time.Time
	Frozen    time.Duration
	Label     string
	Full      bool
	Blocks    map[uint64]Hash
	Deps      map[uint32][]uint64
	Tables    [][2]uint64 // start, used
}

// state is g as handed over. A published generation does not change,
// so it shares g's maps.
func (g *Generation) state() GenState {
	gs := GenState{Number: g.Number, BlockSize: g.BlockSize, Captured: g.Captured, Frozen: g.Frozen, Label: g.Label, Full: g.Full,
		Blocks: g.blocks, Deps: g.deps}
	for _, t := range g.tables {
		gs.Tables = append(gs.Tables, [2]uint64{t.start, t.used})
	}
	return gs
}

// generationFromState is a generation a predecessor handed over, over
// the store handed over with it, holding the export's one reference.
func generationFromState(gs GenState, s *Store) (*Generation, error) {
	g := &Generation{Number: gs.Number, BlockSize: gs.BlockSize, Captured: gs.Captured, Frozen: gs.Frozen, Label: gs.Label, Full: gs.Full,
		store: s, blocks: gs.Blocks, nblocks: len(gs.Blocks), deps: gs.Deps}
	for _, t := range gs.Tables {
		g.tables = append(g.tables, tableRange{start: t[0], used: t[1]})
	}
	for _, h := range g.blocks {
		if !s.has(h) {
			return nil, fmt.Errorf("generation %d names a block the store does not have", g.Number)
		}
	}
	g.refs.Store(1)
	s.born(g)
	return g, nil
}

// checkLabel refuses a label that would not print on one line.
func checkLabel(label string) error {
	if len(label) > vsockproto.MaxLabel {
		return fmt.Errorf("label %q: at most %d bytes", label, vsockproto.MaxLabel)
	}
	for _, r := range label {
		if !unicode.IsPrint(r) || unicode.IsSpace(r) {
			return fmt.Errorf("label %q: only printable characters, no spaces", label)
		}
	}
	return nil
}

// compareVersions orders labels as versions: runs of digits compare by
// value (9 < 10), everything else byte by byte.
func compareVersions(a, b string) int {
	for a != "" && b != "" {
		da, db := digits(a), digits(b)
		if da > 0 && db > 0 {
			na, nb := strings.TrimLeft(a[:da], "0"), strings.TrimLeft(b[:db], "0")
			if c := cmp.Or(cmp.Compare(len(na), len(nb)), strings.Compare(na, nb)); c != 0 {
				return c
			}
			a, b = a[da:], b[db:]
			continue
		}
		if a[0] != b[0] {
			return cmp.Compare(a[0], b[0])
		}
		a, b = a[1:], b[1:]
	}
	return cmp.Compare(len(a), len(b))
}

func digits(s string) int {
	n := 0
	for n < len(s) && s[n] >= '0' && s[n] <= '9' {
		n++
	}
	return n
}
