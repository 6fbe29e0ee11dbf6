package guestagent

import (
	"fmt"
	"slices"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/vsockproto"
)

// The switcher is one goroutine per client, the only one that moves the
// served view to another generation and the only one that tells the
// kernel anything (invalidations). It takes c.mu only to read and update
// the switching state, never while it talks to the kernel or the host:
// a notification can wait for the kernel's locks (a directory's, while a
// LOOKUP in it is answered; a page's, while a READ of it is), and the
// requests holding those never wait for the switcher. The one request
// that does wait for it is an OPEN that needs a newer generation, during
// which the kernel holds no lock a notification takes. It starts once
// the client is attached to its mount (Attach): what breaks and switches
// ask of it before then waits, not lost.

// wake asks the switcher to look at the state again.
func (c *Client) wake() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

func (c *Client) switcher() {
	select {
	case <-c.attached:
	case <-c.done:
		return
	}
	backoff := 100 * time.Millisecond
	for {
		select {
		case <-c.kick:
		case <-c.done:
			return
		}
		if err := c.step(); err != nil {
			c.log.Error("cannot read the new generation; staying on the one served", "error", err)
			c.noteError(err)
			time.AfterFunc(backoff, c.wake)
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
	}
}

// step does what the state asks: drops what breaks and lost sessions
// made stale from the kernel's caches, and moves to the newest
// generation when Follow (or a forced switch) says so.
func (c *Client) step() error {
	c.mu.Lock()
	nodes := c.inval
	c.inval = nil
	old, target, ch, label := c.cur, c.latest, c.pending, c.latestLabel
	// A dead view must go even for a generation of the same number.
	due := (target != old.gen || old.dead.Load()) && !c.closed && c.dueLocked()
	if due {
		c.pending, c.force = changes{}, false
	}
	c.mu.Unlock()
	for _, id := range nodes {
		c.inodeNotify(id)
	}
	if !due {
		return nil
	}
	if err := c.switchTo(old, target, label, &ch); err != nil {
		c.mu.Lock()
		c.pending.all = true // what was taken is lost: start over
		c.force = c.force || ch.all
		c.checkSwitcher()
		c.mu.Unlock()
		return err
	}
	return nil
}

// dueLocked says whether a switch may happen now; if Follow defers it, it
// arms a timer for when it may. Called with c.mu held.
func (c *Client) dueLocked() bool {
	f := c.cfg.Follow
	switch {
	case c.pinned != 0:
		return false // until the host drops it (unpin, generationGone)
	case c.force:
		return true
	case f.Manual:
		return false
	case f.Interval > 0:
		if wait := f.Interval - time.Since(c.switched); wait > 0 {
			if c.timer == nil {
				c.timer = time.AfterFunc(wait, func() {
					c.mu.Lock()
					c.timer = nil
					c.mu.Unlock()
					c.wake()
				})
			}
			return false
		}
	}
	return true
}

// switchTo moves from old to generation target (published as label), ch
// being what changed between them, and tells the kernel.
func (c *Client) switchTo(old *genView, target uint64, label string, ch *changes) error {
	oldFS := c.fs.View()
	// What the kernel may cache of changed directories, as the old view
	// has it: read now, while its blocks are still the cached ones.
	var before map[uint32]dirState
	if !ch.all {
		before = c.changedDirs(oldFS, ch)
	}
	c.cache.advance(target, ch)
	nv := &genView{c: c, gen: target, label: label, bs: old.bs}
	f, err := c.open(nv)
	if err != nil {
		return err
	}
	c.fs.SetView(f, uint32(target))
	if ch.all {
		c.invalidateAll(f)
	} else {
		c.invalidate(oldFS, f, ch, before)
	}
	// Only now is the switch done: what the kernel cached of the old
	// view is gone.
	c.mu.Lock()
	c.cur, c.switched = nv, time.Now()
	for fs, v := range c.views { // keep the readers of recent generations only
		if !v.browse && (v.gen+8 < nv.gen || v.gen > nv.gen) {
			delete(c.views, fs)
		}
	}
	c.checkSwitcher()
	c.changed.Broadcast()
	c.mu.Unlock()
	c.m.switches.Inc()
	c.log.Debug("switched generation", "from", old.gen, "to", target, "all", ch.all)
	c.pruneIdle(f, ch)
	return nil
}

// dirState is a directory the kernel holds, as the old view listed it.
type dirState struct {
	id    uint64
	names map[string]uint32
}

// changedDirs lists, in the old view, the changed inodes that are
// directories the kernel holds.
func (c *Client) changedDirs(oldFS *ext4ro.FS, ch *changes) map[uint32]dirState {
	out := map[uint32]dirState{}
	for ino := range ch.inodes {
		in, err := oldFS.Inode(ino)
		if err != nil || !in.IsDir() {
			continue
		}
		id := NodeID(in)
		if c.fs.nodes.has(id) {
			out[ino] = dirState{id, listing(oldFS, in, nil)}
		}
	}
	return out
}

// invalidate tells the kernel what changed: each changed inode's
// attributes and pages, and in each changed directory the names that
// went, came (cached misses) or now name another inode.
func (c *Client) invalidate(oldFS, newFS *ext4ro.FS, ch *changes, before map[uint32]dirState) {
	for ino := range ch.inodes {
		// The kernel knows the inode as the old view had it.
		oldIn, err := oldFS.Inode(ino)
		if err != nil {
			continue // new: nothing of it is cached (its name is, below)
		}
		id := NodeID(oldIn)
		if !c.fs.nodes.has(id) {
			continue
		}
		c.inodeNotify(id)
		if newIn, err := newFS.Inode(ino); oldIn.IsRegular() && (err != nil || NodeID(newIn) != id) {
			// A file changed in place is another node now: the
			// name the kernel has for the old one must go too.
			if parent, name, ok := c.fs.nodes.nameOf(id); ok {
				c.entryNotify(parent, name)
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
				c.entryNotify(d.id, name)
			}
		}
		for name := range after {
			if _, ok := d.names[name]; !ok {
				c.entryNotify(d.id, name) // a cached miss
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
func (c *Client) invalidateAll(newFS *ext4ro.FS) {
	// .generations and what is under it never change with the view
	// served (browse.go).
	entries := slices.DeleteFunc(c.fs.nodes.entries(), func(e entry) bool { return e.id&browseBit != 0 || e.parent&browseBit != 0 })
	children := map[uint64]map[string]uint64{} // what the kernel was told each directory holds
	for _, e := range entries {
		c.inodeNotify(e.id)
		if children[e.parent] == nil {
			children[e.parent] = map[string]uint64{}
		}
		children[e.parent][e.name] = e.id
	}
	c.inodeNotify(fuseRoot)
	for parent, names := range children {
		dir, err := c.sameNode(newFS, parent)
		now := listing(newFS, dir, err)
		for name, id := range names {
			if ino, ok := now[name]; !ok || !c.sameInode(newFS, ino, id) {
				c.entryNotify(parent, name)
			}
		}
		for name, ino := range now {
			if id, ok := names[name]; !ok || !c.sameInode(newFS, ino, id) {
				c.entryNotify(parent, name)
			}
		}
	}
	// Directories the kernel holds whose children it was never told of
	// may still hold cached misses.
	for _, e := range entries {
		if _, seen := children[e.id]; seen {
			continue
		}
		dir, err := c.sameNode(newFS, e.id)
		if err != nil || !dir.IsDir() {
			continue
		}
		for name := range listing(newFS, dir, nil) {
			c.entryNotify(e.id, name)
		}
	}
}

// sameNode returns node id's inode in f, if f still has it.
func (c *Client) sameNode(f *ext4ro.FS, id uint64) (*ext4ro.Inode, error) {
	in, err := f.Inode(nodeIno(id))
	if err == nil && id != fuseRoot && NodeID(in) != id {
		err = ErrStale
	}
	return in, err
}

// sameInode reports whether inode ino of f is node id.
func (c *Client) sameInode(f *ext4ro.FS, ino uint32, id uint64) bool {
	in, err := f.Inode(ino)
	return err == nil && NodeID(in) == id
}

func (c *Client) inodeNotify(id uint64) {
	c.m.inval.WithLabelValues("inode").Inc()
	c.notified("inode", id, "", c.notify.InodeNotify(id, 0, 0))
}

func (c *Client) entryNotify(parent uint64, name string) {
	c.m.inval.WithLabelValues("entry").Inc()
	c.notified("entry", parent, name, c.notify.EntryNotify(parent, name))
}

// notified logs an invalidation the kernel refused. ENOENT is not one:
// the kernel had nothing of it cached.
func (c *Client) notified(kind string, node uint64, name string, st fuse.Status) {
	if st.Ok() || st == fuse.ENOENT {
		return
	}
	c.log.Error("the kernel refused an invalidation: it may serve what it cached of the old generation", "kind", kind, "node", node, "name", name, "status", st)
	c.noteError(fmt.Errorf("invalidation of %s %#x %q: %v", kind, node, name, st))
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

// announced records a generation the host announced, and, if Follow
// moves to it now, waits (a while) until the switch is done, so that the
// acknowledgement names it.
func (c *Client) announced(m *vsockproto.Announce) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if m.Generation <= c.latest {
		return // late, or doubled
	}
	switch {
	case c.pinned != 0:
		// Pinned, the changes are not kept (they would grow without
		// bound): a switch, if the pin ends, goes through everything.
		c.pending = changes{all: true}
	case m.Generation > c.latest+1:
		c.pending.all = true // some were missed
		c.pending.add(m)
	default:
		c.pending.add(m)
	}
	// What the host keeps changes with each publish: .generations's
	// listing, cached by the kernel, and ours, go (browse.go).
	c.keptAt = time.Time{}
	if c.fs != nil && c.fs.nodes.has(genDirID) {
		c.inval = append(c.inval, genDirID)
	}
	c.latest = m.Generation
	c.noteLabel(m.Generation, m.Label)
	c.checkSwitcher()
	c.changed.Broadcast()
	c.wake()
	if c.dueLocked() {
		c.waitLocked(func() bool { return c.cur.gen >= m.Generation }, time.Now().Add(10*time.Second))
	}
}

// Refresh moves to the newest generation announced, whatever Follow
// says, and returns once it has (or after a while: it logs why not).
func (c *Client) Refresh() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.latest == c.cur.gen || c.pinned != 0 {
		return // nothing newer, or pinned: it stays
	}
	c.force = true
	c.wake()
	old := c.cur
	c.waitLocked(func() bool { return c.cur != old }, time.Now().Add(10*time.Second))
}

// noteLabel records the label ("" for none) the host published
// generation gen with: the newest announced, which the next switch moves
// to, or the one served. Called with c.mu held.
func (c *Client) noteLabel(gen uint64, label string) {
	if gen == c.latest {
		c.latestLabel = label
	}
	if c.cur != nil && c.cur.gen == gen {
		c.cur.label = label
	}
}
