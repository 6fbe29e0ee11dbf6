package guestagent

import (
	"fmt"
	"slices"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/leasefs/leasefs/ext4ro"
)

// kernel tells the kernel what a switch, a break or a lost session made
// stale of what it caches: the switcher's alone (switcher.go), with no
// lock held. It knows what the kernel holds from the FileSystem's nodes.
type kernel struct {
	n       Notifier
	nodes   *nodes
	count   *prometheus.CounterVec // kind: inode, entry
	log     hclog.Logger
	refused func(error) // notes an invalidation the kernel refused
}

// dirState is a directory the kernel holds, as the old view listed it.
type dirState struct {
	id    uint64
	names map[string]uint32
}

// changedDirs lists, in the old view, the changed inodes that are
// directories the kernel holds.
func (k *kernel) changedDirs(oldFS *ext4ro.FS, ch *changes) map[uint32]dirState {
	out := map[uint32]dirState{}
	for ino := range ch.inodes {
		in, err := oldFS.Inode(ino)
		if err != nil || !in.IsDir() {
			continue
		}
		id := NodeID(in)
		if k.nodes.has(id) {
			out[ino] = dirState{id, listing(oldFS, in, nil)}
		}
	}
	return out
}

// invalidate tells the kernel what changed: each changed inode's
// attributes and pages, and in each changed directory the names that
// went, came (cached misses) or now name another inode.
func (k *kernel) invalidate(oldFS, newFS *ext4ro.FS, ch *changes, before map[uint32]dirState) {
	for ino := range ch.inodes {
		// The kernel knows the inode as the old view had it.
		oldIn, err := oldFS.Inode(ino)
		if err != nil {
			continue // new: nothing of it is cached (its name is, below)
		}
		id := NodeID(oldIn)
		if !k.nodes.has(id) {
			continue
		}
		k.inodeNotify(id)
		if newIn, err := newFS.Inode(ino); oldIn.IsRegular() && (err != nil || NodeID(newIn) != id) {
			// A file changed in place is another node now: the
			// name the kernel has for the old one must go too.
			if parent, name, ok := k.nodes.nameOf(id); ok {
				k.entryNotify(parent, name)
			}
		}
	}
	for ino, d := range before {
		newIn, err := newFS.Inode(ino)
		after := listing(newFS, newIn, err)
		if err == nil && NodeID(newIn) != d.id {
			after = nil // another directory has its number now
		}
		for name, child := range d.names {
			if after[name] != child {
				k.entryNotify(d.id, name)
			}
		}
		for name := range after {
			if _, ok := d.names[name]; !ok {
				k.entryNotify(d.id, name) // a cached miss
			}
		}
	}
}

// invalidateAll is invalidate when what changed is not known (missed
// announcements, a host agent restart): every node the kernel holds
// loses its attributes and pages, every name it was given under that no
// longer names it goes, and in every directory it holds every name of
// the new view goes that is not known to name what it names there (it
// may be a cached miss).
func (k *kernel) invalidateAll(newFS *ext4ro.FS) {
	// .generations and what is under it never change with the view
	// served (browse.go).
	entries := slices.DeleteFunc(k.nodes.entries(), func(e entry) bool { return e.id&browseBit != 0 || e.parent&browseBit != 0 })
	children := map[uint64]map[string]uint64{} // what the kernel was told each directory holds
	for _, e := range entries {
		k.inodeNotify(e.id)
		if children[e.parent] == nil {
			children[e.parent] = map[string]uint64{}
		}
		children[e.parent][e.name] = e.id
	}
	k.inodeNotify(fuseRoot)
	for parent, names := range children {
		dir, err := k.sameNode(newFS, parent)
		now := listing(newFS, dir, err)
		for name, id := range names {
			if ino, ok := now[name]; !ok || !k.sameInode(newFS, ino, id) {
				k.entryNotify(parent, name)
			}
		}
		for name, ino := range now {
			if id, ok := names[name]; !ok || !k.sameInode(newFS, ino, id) {
				k.entryNotify(parent, name)
			}
		}
	}
	// Directories the kernel holds whose children it was never told of
	// may still hold cached misses.
	for _, e := range entries {
		if _, seen := children[e.id]; seen {
			continue
		}
		dir, err := k.sameNode(newFS, e.id)
		if err != nil || !dir.IsDir() {
			continue
		}
		for name := range listing(newFS, dir, nil) {
			k.entryNotify(e.id, name)
		}
	}
}

// sameNode returns node id's inode in f, if f still has it.
func (k *kernel) sameNode(f *ext4ro.FS, id uint64) (*ext4ro.Inode, error) {
	in, err := f.Inode(nodeIno(id))
	if err == nil && id != fuseRoot && NodeID(in) != id {
		err = ErrStale
	}
	return in, err
}

// sameInode reports whether inode ino of f is node id.
func (k *kernel) sameInode(f *ext4ro.FS, ino uint32, id uint64) bool {
	in, err := f.Inode(ino)
	return err == nil && NodeID(in) == id
}

func (k *kernel) inodeNotify(id uint64) {
	k.count.WithLabelValues("inode").Inc()
	k.notified("inode", id, "", k.n.InodeNotify(id, 0, 0))
}

func (k *kernel) entryNotify(parent uint64, name string) {
	k.count.WithLabelValues("entry").Inc()
	k.notified("entry", parent, name, k.n.EntryNotify(parent, name))
}

// notified logs an invalidation the kernel refused. ENOENT is not one:
// the kernel had nothing of it cached.
func (k *kernel) notified(kind string, node uint64, name string, st fuse.Status) {
	if st.Ok() || st == fuse.ENOENT {
		return
	}
	k.log.Error("the kernel refused an invalidation: it may serve what it cached of the old generation", "kind", kind, "node", node, "name", name, "status", st)
	k.refused(fmt.Errorf("invalidation of %s %#x %q: %v", kind, node, name, st))
}

// listing maps a directory's names to inodes (none if it is gone).
func listing(f *ext4ro.FS, dir *ext4ro.Inode, err error) map[string]uint32 {
	m := map[string]uint32{}
	if err != nil || dir == nil || !dir.IsDir() {
		return m
	}
	_ = f.ReadDir(dir, 0, func(e ext4ro.DirEntry) bool {
		if e.Name != "." && e.Name != ".." {
			m[e.Name] = e.Ino
		}
		return true
	})
	return m
}
