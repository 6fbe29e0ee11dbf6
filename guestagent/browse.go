package guestagent

import (
	"errors"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/vsockproto"
)

// The .generations directory at a live mount's root (Config.Generations)
// shows the generations the host keeps: a directory per generation, by
// number, holding its tree as it was published, and a symbolic link per
// label to the newest generation published with it. It is found by name
// but hidden from the root's listing, unless Config.ShowGenerations says
// otherwise, as a NAS filer's .snapshot is; one the export itself has in
// its root is hidden by it.
//
// Its nodes have the top bit set, which a view's never have (NodeID): the
// directory itself is genDirID; a generation's tree is the slot the mount
// gave it when first browsed (never given again) with each inode's number,
// resolved in that generation's reader only, as a published generation
// never changes; a label's link has labelBit and the generation's number.

// GenerationsDir is the name of the directory.
const GenerationsDir = ".generations"

const (
	browseBit = 1 << 63
	labelBit  = 1 << 62
	genDirID  = browseBit
	// showCookie is the root listing's position right after the
	// .generations entry it shows first (ShowGenerations).
	showCookie = 1<<cookieBits - 1
	// genDirTimeout is how long the kernel may cache the directory's
	// entries: kept generations come and go.
	genDirTimeout = time.Second
)

// Generations serves .generations: what the host keeps, and a reader of
// each kept generation.
type Generations interface {
	Kept() ([]vsockproto.KeptGeneration, error)
	Browse(gen uint64) (*ext4ro.FS, error)
}

// browsed is the readers of generations the mount has given a slot: the
// slot's number is its index in views (0 is none).
type browsed struct {
	mu     sync.Mutex
	views  []*ext4ro.FS          // guarded by mu
	slotFS map[*ext4ro.FS]uint32 // guarded by mu
}

// slot returns the slot of generation gen's reader (Generations.Browse),
// giving it one the first time. A generation read again after its reader
// died (another lineage of generations on the host) gets another.
func (fs *FileSystem) slot(gen uint64) (uint32, *ext4ro.FS, error) {
	v, err := fs.gens.Browse(gen)
	if err != nil {
		return 0, nil, err
	}
	b := &fs.browsed
	b.mu.Lock()
	defer b.mu.Unlock()
	if s, ok := b.slotFS[v]; ok {
		return s, v, nil
	}
	if b.slotFS == nil {
		b.views, b.slotFS = []*ext4ro.FS{nil}, map[*ext4ro.FS]uint32{}
	}
	if len(b.views) >= 1<<30 {
		return 0, nil, syscall.ENOSPC
	}
	s := uint32(len(b.views))
	b.views = append(b.views, v)
	b.slotFS[v] = s
	return s, v, nil
}

// forgetBrowsed lets go of v's slot (its generation is gone): its nodes
// answer ESTALE, and the slot is never given again.
func (fs *FileSystem) forgetBrowsed(v *ext4ro.FS) {
	b := &fs.browsed
	b.mu.Lock()
	defer b.mu.Unlock()
	if s, ok := b.slotFS[v]; ok {
		b.views[s] = nil
		delete(b.slotFS, v)
	}
}

// slotView returns the reader of slot s; nil if there is none.
func (fs *FileSystem) slotView(s uint32) *ext4ro.FS {
	b := &fs.browsed
	b.mu.Lock()
	defer b.mu.Unlock()
	if int(s) >= len(b.views) {
		return nil
	}
	return b.views[s]
}

// nodeID is in's node id in view v: NodeID for the view served (and
// earlier ones), the slot's for a browsed generation.
func (fs *FileSystem) nodeID(v *ext4ro.FS, in *ext4ro.Inode) uint64 {
	if fs.gens != nil {
		b := &fs.browsed
		b.mu.Lock()
		s, ok := b.slotFS[v]
		b.mu.Unlock()
		if ok {
			return browseBit | uint64(s)<<32 | uint64(in.Ino)
		}
	}
	return NodeID(in)
}

// browseInode resolves a node of a browsed generation's tree.
func (fs *FileSystem) browseInode(id uint64) (*ext4ro.FS, *ext4ro.Inode, fuse.Status) {
	if id&labelBit != 0 || id == genDirID {
		return nil, nil, fuse.EINVAL // the caller answers these itself
	}
	v := fs.slotView(uint32(id>>32) &^ (browseBit >> 32))
	if v == nil {
		return nil, nil, fuse.Status(syscall.ESTALE)
	}
	in, err := v.Inode(uint32(id))
	if err != nil {
		if errors.Is(err, ext4ro.ErrNotExist) {
			return nil, nil, fuse.Status(syscall.ESTALE)
		}
		return nil, nil, fs.status("inode", err)
	}
	return v, in, fuse.OK
}

// synthetic reports whether id is .generations or one of its links.
func synthetic(id uint64) bool {
	return id == genDirID || id&(browseBit|labelBit) == browseBit|labelBit
}

// syntheticAttr fills the attributes of .generations or a link in it.
func (fs *FileSystem) syntheticAttr(id uint64, a *fuse.Attr) {
	t := uint64(fs.started.Unix())
	*a = fuse.Attr{Ino: id, Mode: syscall.S_IFDIR | 0o555, Nlink: 2, Atime: t, Mtime: t, Ctime: t, Blksize: 4096}
	if id != genDirID {
		target := strconv.FormatUint(id&^(browseBit|labelBit), 10)
		a.Mode, a.Nlink, a.Size = syscall.S_IFLNK|0o777, 1, uint64(len(target))
	}
}

// lookupGenerations answers a lookup of name in .generations: a
// generation's number, or a label.
func (fs *FileSystem) lookupGenerations(name string, out *fuse.EntryOut) fuse.Status {
	kept, err := fs.gens.Kept()
	if err != nil {
		return fs.status("lookup", err)
	}
	var gen uint64
	label := false
	for _, k := range kept {
		switch {
		case strconv.FormatUint(k.Number, 10) == name:
			gen = k.Number
		case k.Label == name && gen == 0 || k.Label == name && label:
			gen, label = k.Number, true // the newest with the label
		}
	}
	if gen == 0 {
		*out = fuse.EntryOut{}
		return fuse.OK // a negative entry, cached for no time
	}
	out.SetEntryTimeout(genDirTimeout)
	out.SetAttrTimeout(genDirTimeout)
	if label {
		out.NodeId = browseBit | labelBit | gen
		fs.syntheticAttr(out.NodeId, &out.Attr)
	} else {
		s, v, err := fs.slot(gen)
		if err != nil {
			return fs.status("lookup", err)
		}
		root, err := v.Inode(ext4ro.RootIno)
		if err != nil {
			return fs.status("lookup", err)
		}
		out.NodeId = browseBit | uint64(s)<<32 | ext4ro.RootIno
		out.Generation = uint64(root.Generation)
		fs.fillAttr(v, root, &out.Attr)
	}
	if fs.nodes != nil {
		fs.nodes.add(out.NodeId, genDirID, name)
	}
	return fuse.OK
}

// listGenerations lists .generations: each kept generation by number,
// then each label. Positions are indexes into that list. A READDIRPLUS
// entry carries no lookup (node 0): the kernel looks each name up.
func (fs *FileSystem) listGenerations(pos uint64, out *fuse.DirEntryList, plus bool) fuse.Status {
	kept, err := fs.gens.Kept()
	if err != nil {
		return fs.status("readdir", err)
	}
	entries := []fuse.DirEntry{{Name: ".", Mode: syscall.S_IFDIR, Ino: genDirID}, {Name: "..", Mode: syscall.S_IFDIR, Ino: fuseRoot}}
	labels := map[string]bool{}
	for _, k := range kept {
		entries = append(entries, fuse.DirEntry{Name: strconv.FormatUint(k.Number, 10), Mode: syscall.S_IFDIR, Ino: browseBit | k.Number})
	}
	for i := len(kept) - 1; i >= 0; i-- {
		if l := kept[i].Label; l != "" && !labels[l] {
			labels[l] = true
			entries = append(entries, fuse.DirEntry{Name: l, Mode: syscall.S_IFLNK, Ino: browseBit | labelBit | kept[i].Number})
		}
	}
	for i := pos; i < uint64(len(entries)); i++ {
		e := entries[i]
		e.Off = i + 1
		if plus && out.AddDirLookupEntry(e) == nil || !plus && !out.AddDirEntry(e) {
			break
		}
	}
	return fuse.OK
}

// keptFor is how long the client's list of kept generations serves
// .generations before it asks the host again.
const keptFor = time.Second

// Kept is the generations the host keeps (Generations), asked at most
// once per keptFor; the readers of those it no longer keeps go. A host
// without FeatureKept keeps none for guests.
func (c *Client) Kept() ([]vsockproto.KeptGeneration, error) {
	c.mu.Lock()
	if time.Since(c.sw.keptAt) < keptFor {
		list := c.sw.keptList
		c.mu.Unlock()
		return list, nil
	}
	conn := c.sess.conn
	c.mu.Unlock()
	var list []vsockproto.KeptGeneration
	if conn == nil || conn.Features().Has(vsockproto.FeatureKept) {
		reply, err := c.call(nil, &vsockproto.ListGens{})
		if err != nil {
			return nil, err
		}
		list = reply.(*vsockproto.Generations).List
	}
	kept := map[uint64]bool{}
	for _, k := range list {
		kept[k.Number] = true
	}
	var gone []*ext4ro.FS
	c.mu.Lock()
	c.sw.keptList, c.sw.keptAt = list, time.Now()
	for gen, v := range c.sw.browse {
		if !kept[gen] {
			gone = append(gone, v.fs)
			delete(c.sw.browse, gen)
		}
	}
	c.mu.Unlock()
	for _, f := range gone {
		c.fs.forgetBrowsed(f)
	}
	return list, nil
}

// Browse returns a reader of kept generation gen, for .generations: one
// per generation, kept while the host keeps it.
func (c *Client) Browse(gen uint64) (*ext4ro.FS, error) {
	c.mu.Lock()
	if v, ok := c.sw.browse[gen]; ok {
		c.mu.Unlock()
		return v.fs, nil
	}
	bs := c.sw.cur.bs
	c.mu.Unlock()
	gv := &genView{c: c, gen: gen, bs: bs}
	f, err := c.open(gv)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if o, ok := c.sw.browse[gen]; ok { // opened meanwhile
		return o.fs, nil
	}
	c.sw.browse[gen] = servedView{fs: f, gen: gv}
	return f, nil
}
