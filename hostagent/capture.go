package hostagent

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/internal/directio"
	"github.com/leasefs/leasefs/vsockproto"
)

// scan captures the metadata of the frozen filesystem on dev, against
// the previous generation (nil for the first). Inode table blocks are
// read — all of them, or with cand only those holding the candidate
// inodes — and compared by hash; an inode whose bytes differ has its
// MetaBlocks listed and read again. An unchanged inode's blocks are
// carried over unread: ext4 changes an inode (its times, size or block
// count) whenever it changes a block the inode's metadata lives in.
func scan(dev *directio.File, tables io.ReaderAt, store *Store, prev *Generation, cand map[uint32]bool) (g *Generation, err error) {
	sr := &scanReader{dev: dev}
	fs, err := ext4ro.Open(sr, &ext4ro.Options{Size: dev.Size(), CacheBytes: 8 << 20, ReadAhead: 1})
	if err != nil {
		return nil, fmt.Errorf("reading the frozen device: %w", err)
	}
	sb := fs.Superblock()
	bs := uint64(fs.BlockSize())
	if prev != nil && uint64(prev.BlockSize) != bs {
		prev = nil // a different filesystem: start over
	}
	g = &Generation{BlockSize: int(bs), store: store}
	if prev != nil {
		g.blocks = make(map[uint64]Hash, len(prev.blocks)+64)
		g.deps = make(map[uint32][]uint64, len(prev.deps)+64)
	} else {
		g.blocks, g.deps = map[uint64]Hash{}, map[uint32][]uint64{}
	}
	sr.g = g
	var carried []uint64 // inode-table blocks carried over unread
	carriedRefs := false // whether their references are taken yet
	defer func() {
		if err != nil {
			if !carriedRefs {
				for _, b := range carried {
					delete(g.blocks, b)
				}
			}
			g.release()
		}
	}()
	fresh := map[uint64]bool{} // blocks read from the device in this scan
	set := func(b uint64, h Hash) {
		if old, ok := g.blocks[b]; ok {
			store.unref(old)
		}
		g.blocks[b] = h
	}
	buf := directio.AlignedBuf(int(bs) * 256)
	readBlocks := func(start, n uint64) ([]byte, error) {
		p := buf[:n*bs]
		if _, err := dev.ReadAt(p, int64(start*bs)); err != nil {
			return nil, err
		}
		return p, nil
	}
	// Inode table blocks are read through the device's page cache,
	// which is where ext4 itself keeps them (its buffer heads are that
	// cache), so it is never stale, and mostly already in memory. Other
	// metadata can have been file data before, whose writes bypass that
	// cache: it is read with O_DIRECT.
	readTable := func(start, n uint64) ([]byte, error) {
		p := buf[:n*bs]
		if _, err := tables.ReadAt(p, int64(start*bs)); err != nil {
			return nil, fmt.Errorf("reading inode table blocks %d+%d: %w", start, n, err)
		}
		return p, nil
	}
	readFresh := func(b uint64) error {
		if fresh[b] {
			return nil
		}
		p, err := readBlocks(b, 1)
		if err != nil {
			return err
		}
		fresh[b] = true
		set(b, store.put(p))
		return nil
	}

	// Superblock and group descriptors.
	for _, b := range append([]uint64{1024 / bs}, fs.DescriptorBlocks()...) {
		if err := readFresh(b); err != nil {
			return g, err
		}
	}

	// Inode tables: find the inodes whose bytes changed. A narrowed scan
	// (cand not nil) reads only the blocks holding candidate inodes, and
	// blocks newly in use; the others are carried over unread.
	var changed []uint32
	parse := map[uint32]bool{} // changed inodes that may have blocks of their own
	isz := uint64(sb.InodeSize)
	perBlock := bs / isz
	if prev == nil {
		cand = nil
	}
	want := map[uint64]bool{}
	for ino := range cand {
		if ino == 0 || ino > sb.InodesCount {
			continue
		}
		grp := (ino - 1) / sb.InodesPerGroup
		start, _, err := fs.InodeTable(grp)
		if err != nil {
			return g, err
		}
		want[start+uint64((ino-1)%sb.InodesPerGroup)*isz/bs] = true
	}
	for grp := range sb.GroupCount() {
		start, used, err := fs.InodeTable(grp)
		if err != nil {
			return g, err
		}
		read := func(blk uint64) bool {
			if cand == nil || want[blk] {
				return true
			}
			_, had := prev.blocks[blk]
			return !had
		}
		for done := uint64(0); done < used; {
			blk := start + done
			if !read(blk) {
				// Carried over: its reference is taken below, with the
				// others, under one lock.
				g.blocks[blk] = prev.blocks[blk]
				carried = append(carried, blk)
				done++
				continue
			}
			n := uint64(1)
			for n < 256 && done+n < used && read(blk+n) {
				n++
			}
			p, err := readTable(blk, n)
			if err != nil {
				return g, err
			}
			for i := range n {
				blk := start + done + i
				content := p[i*bs : (i+1)*bs]
				h := Hash(sha256.Sum256(content))
				var old []byte
				if prev != nil {
					if ph, ok := prev.blocks[blk]; ok {
						if ph == h {
							store.ref(h)
							set(blk, h)
							fresh[blk] = true
							continue
						}
						old = store.get(ph)
					}
				}
				first := uint64(grp)*uint64(sb.InodesPerGroup) + (done+i)*perBlock + 1
				for k := range perBlock {
					cur := content[k*isz : (k+1)*isz]
					has := ext4ro.HasMetaBlocks(cur)
					switch {
					case prev == nil && !has:
						// A first capture lists no changes: only inodes
						// with blocks of their own need a look.
					case old == nil || !bytes.Equal(cur, old[k*isz:(k+1)*isz]):
						changed = append(changed, uint32(first+k))
						if has {
							parse[uint32(first+k)] = true
						}
					}
				}
				set(blk, store.putHashed(h, content))
				fresh[blk] = true
			}
			done += n
		}
	}
	store.refAll(g.blocks, carried)
	carriedRefs = true
	if prev == nil {
		// Everything is new; only the inodes in use matter below.
		g.All = true
	}

	// Inode dependencies: carried over, then redone for changed inodes.
	isChanged := make(map[uint32]bool, len(changed))
	for _, ino := range changed {
		isChanged[ino] = true
	}
	reread := map[uint64]bool{}
	if prev != nil {
		for ino, deps := range prev.deps {
			if !isChanged[ino] {
				g.deps[ino] = deps
				continue
			}
			for _, b := range deps {
				reread[b] = true // shared blocks (xattr) may have changed for others
			}
		}
	}
	var realChanged []uint32
	for _, ino := range changed {
		if !parse[ino] {
			// No blocks of its own now (and any it had are re-read
			// above): listing it is all there is to do.
			realChanged = append(realChanged, ino)
			continue
		}
		in, err := fs.Inode(ino)
		if errors.Is(err, ext4ro.ErrNotExist) || errors.Is(err, ext4ro.ErrInvalid) {
			if prev != nil {
				realChanged = append(realChanged, ino) // removed
			}
			continue
		}
		if err != nil {
			return g, fmt.Errorf("inode %d: %w", ino, err)
		}
		realChanged = append(realChanged, ino)
		if ino < sb.FirstIno && ino != ext4ro.RootIno {
			continue // the journal, resize inode and the like: never read by guests
		}
		var deps []uint64
		if err := fs.MetaBlocks(in, func(start, n uint64) {
			for b := start; b < start+n; b++ {
				deps = append(deps, b)
			}
		}); err != nil {
			return g, fmt.Errorf("inode %d: %w", ino, err)
		}
		if len(deps) > 0 {
			g.deps[ino] = deps
			for _, b := range deps {
				reread[b] = true
			}
		}
	}
	var toRead []uint64
	for _, deps := range g.deps {
		for _, b := range deps {
			if _, done := g.blocks[b]; done {
				continue
			}
			if ph, ok := prev.lookup(b); ok && !reread[b] {
				store.ref(ph)
				set(b, ph)
				continue
			}
			if !fresh[b] {
				fresh[b] = true
				toRead = append(toRead, b)
			}
		}
	}
	// Read them in runs: directories' blocks mostly lie together.
	slices.Sort(toRead)
	for i := 0; i < len(toRead); {
		j := i + 1
		for j < len(toRead) && j-i < 256 && toRead[j] == toRead[i]+uint64(j-i) {
			j++
		}
		p, err := readBlocks(toRead[i], uint64(j-i))
		if err != nil {
			return g, err
		}
		for k := i; k < j; k++ {
			off := uint64(k-i) * bs
			set(toRead[k], store.put(p[off:off+bs]))
		}
		i = j
	}

	// What changed since prev: only blocks read in this scan can have;
	// the others were carried over.
	var diff []uint64
	for b := range fresh {
		if ph, ok := prev.lookup(b); !ok || ph != g.blocks[b] {
			diff = append(diff, b)
		}
	}
	slices.Sort(diff)
	g.Changed = vsockproto.Ranges(diff)
	if !g.All {
		g.ChangedInodes = realChanged
	}
	return g, nil
}

// scanReader is what ext4ro reads the frozen device through during a
// scan: blocks already read in this scan come from the generation being
// built, the rest from the device.
type scanReader struct {
	dev *directio.File
	g   *Generation // nil until the scan has started filling it
}

func (r *scanReader) ReadAt(p []byte, off int64) (int, error) {
	n := 0
	if r.g != nil {
		n, _ = r.g.ReadAt(p, off) // as far as blocks read so far go
	}
	if n == len(p) {
		return n, nil
	}
	m, err := r.dev.ReadAt(p[n:], off+int64(n))
	return n + m, err
}

// lookup is prev.blocks[b] for a possibly nil generation.
func (g *Generation) lookup(b uint64) (Hash, bool) {
	if g == nil {
		return Hash{}, false
	}
	h, ok := g.blocks[b]
	return h, ok
}
