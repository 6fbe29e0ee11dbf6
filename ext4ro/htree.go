package ext4ro

import (
	"encoding/binary"
	"fmt"
	"sort"
)

// An htree directory keeps a hash index in blocks that read as empty to a
// linear reader: block 0 is the root (after "." and ".."), interior nodes
// start with one empty record covering the block. Leaves are ordinary
// directory blocks, each holding the names whose hashes fall in its range.

const (
	dxRootInfoOff  = 0x18 // dx_root_info, after "." and ".."
	dxRootCountOff = 0x20 // first dx_entry of the root (count/limit)
	dxNodeCountOff = 0x08 // first dx_entry of an interior node
)

// dxNode is a verified index node: the hashes and child blocks of its
// entries. hash[0] is 0 (entry 0 covers everything below hash[1]).
type dxNode struct {
	hash  []uint32
	block []uint32
}

// isDxNode reports whether b looks like an interior htree node: a single
// empty record spanning the whole block.
func isDxNode(b []byte, bs uint64) bool {
	le := binary.LittleEndian
	return le.Uint32(b) == 0 && recLen(b, bs) == int(bs) && b[6] == 0
}

// dxEntries decodes and verifies the index entries of a root (root=true)
// or interior node.
func (f *FS) dxEntries(dir *Inode, b []byte, phys uint64, root bool) (dxNode, error) {
	le := binary.LittleEndian
	countOff := dxNodeCountOff
	if root {
		countOff = dxRootCountOff
	}
	limit, count := int(le.Uint16(b[countOff:])), int(le.Uint16(b[countOff+2:]))
	room := (len(b) - countOff) / 8
	if f.sb.roCompat(roCompatMetadataCsum) {
		room = (len(b) - countOff - 8) / 8
	}
	if limit != room || count == 0 || count > limit {
		return dxNode{}, corrupt("htree node", dir.Ino, phys, "count %d, limit %d, room for %d", count, limit, room)
	}
	if f.csum {
		tail := countOff + 8*limit
		c := crc32c(f.inodeSeed(dir), b[:countOff+8*count])
		c = crc32c(c, b[tail:tail+4])
		c = crc32c(c, zero4[:])
		if c != le.Uint32(b[tail+4:]) {
			return dxNode{}, badChecksum("htree node", dir.Ino, phys)
		}
	}
	n := dxNode{hash: make([]uint32, count), block: make([]uint32, count)}
	for i := range count {
		e := b[countOff+8*i:]
		if i > 0 {
			n.hash[i] = le.Uint32(e)
			if n.hash[i] < n.hash[i-1] {
				return dxNode{}, corrupt("htree node", dir.Ino, phys, "hashes out of order")
			}
		}
		n.block[i] = le.Uint32(e[4:])
	}
	return n, nil
}

// dirBlockAt maps logical block lblk of dir and reads it.
func (f *FS) dirBlockAt(dir *Inode, lblk uint64) ([]byte, uint64, error) {
	if lblk >= dir.Size/f.bs {
		return nil, 0, corrupt("htree", dir.Ino, 0, "points at block %d beyond the directory's %d", lblk, dir.Size/f.bs)
	}
	var phys uint64
	err := f.walkMap(dir, lblk, lblk+1, func(r run) error {
		phys = r.physical + (lblk - r.logical)
		return errStop
	})
	if err != nil && err != errStop {
		return nil, 0, err
	}
	if phys == 0 {
		return nil, 0, corrupt("htree", dir.Ino, 0, "points at a hole (block %d)", lblk)
	}
	b, err := f.dirBlock(dir, lblk, phys, 1)
	return b, phys, err
}

// dxFrame is one level of the path from the root to a leaf.
type dxFrame struct {
	node dxNode
	at   int
}

// htreeLookup finds name through the hash index. Any damage to the index
// is an ErrCorrupt, on which the caller falls back to a linear search.
func (f *FS) htreeLookup(dir *Inode, m nameMatcher) (DirEntry, error) {
	root, rootPhys, err := f.dirBlockAt(dir, 0)
	if err != nil {
		return DirEntry{}, err
	}
	info := root[dxRootInfoOff:]
	version, infoLen, levels := info[4], info[5], int(info[6])
	maxLevels := 2
	if f.sb.incompat(incompatLargeDir) {
		maxLevels = 3
	}
	if infoLen != 8 || levels >= maxLevels {
		return DirEntry{}, corrupt("htree root", dir.Ino, rootPhys, "info length %d, %d levels", infoLen, levels)
	}
	hash, err := f.dirHash([]byte(m.key), version)
	if err != nil {
		return DirEntry{}, corrupt("htree root", dir.Ino, rootPhys, "%v", err)
	}
	node, err := f.dxEntries(dir, root, rootPhys, true)
	if err != nil {
		return DirEntry{}, err
	}
	// Walk down to the leaf for hash, remembering the path so that a run
	// of equal hashes can be followed into the next leaf.
	frames := make([]dxFrame, 0, levels+1)
	frames = append(frames, dxFrame{node: node, at: search(node, hash)})
	for len(frames) <= levels {
		if err := f.dxDescend(dir, &frames, hash, false); err != nil {
			return DirEntry{}, err
		}
	}
	for {
		top := frames[len(frames)-1]
		leaf, phys, err := f.dirBlockAt(dir, uint64(top.node.block[top.at]))
		if err != nil {
			return DirEntry{}, err
		}
		var found DirEntry
		err = parseDirents(leaf, f.hasFiletype(), dir.Ino, phys, func(_ int, e DirEntry) bool {
			if m.match(e.Name) {
				found = e
				return false
			}
			return true
		})
		if err != nil {
			return DirEntry{}, err
		}
		if found.Ino != 0 {
			return found, nil
		}
		// Not here: the name can only be in the next leaf if that leaf
		// continues a run of this same hash (its start hash has the
		// collision bit set).
		startHash, ok, err := f.dxNext(dir, &frames, levels)
		if err != nil {
			return DirEntry{}, err
		}
		if !ok || startHash&^1 != hash {
			return DirEntry{}, fmt.Errorf("ext4ro: %q in directory inode %d: %w", m.name, dir.Ino, ErrNotExist)
		}
	}
}

// search returns the index of the last entry whose hash is <= hash.
func search(n dxNode, hash uint32) int {
	return sort.Search(len(n.hash)-1, func(i int) bool { return n.hash[i+1] > hash })
}

// dxDescend reads the child of the last frame and pushes it, positioned
// at the entry for hash, or at its first entry if first is set.
func (f *FS) dxDescend(dir *Inode, frames *[]dxFrame, hash uint32, first bool) error {
	top := (*frames)[len(*frames)-1]
	b, phys, err := f.dirBlockAt(dir, uint64(top.node.block[top.at]))
	if err != nil {
		return err
	}
	if !isDxNode(b, f.bs) {
		return corrupt("htree node", dir.Ino, phys, "not an index block")
	}
	n, err := f.dxEntries(dir, b, phys, false)
	if err != nil {
		return err
	}
	at := 0
	if !first {
		at = search(n, hash)
	}
	*frames = append(*frames, dxFrame{node: n, at: at})
	return nil
}

// dxNext moves the path to the next leaf in hash order and returns that
// leaf's start hash. It reports false at the end of the index.
func (f *FS) dxNext(dir *Inode, frames *[]dxFrame, levels int) (uint32, bool, error) {
	i := len(*frames) - 1
	for ; i >= 0; i-- {
		if fr := &(*frames)[i]; fr.at+1 < len(fr.node.hash) {
			fr.at++
			break
		}
	}
	if i < 0 {
		return 0, false, nil
	}
	startHash := (*frames)[i].node.hash[(*frames)[i].at]
	*frames = (*frames)[:i+1]
	for len(*frames) <= levels {
		if err := f.dxDescend(dir, frames, 0, true); err != nil {
			return 0, false, err
		}
	}
	return startHash, true, nil
}
