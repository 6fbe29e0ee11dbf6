package guestagent

import (
	"time"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/vsockproto"
)

// A file's lease outlives its last close for a while (as an NFSv4 client
// keeps a delegation): a program that opens the same files again — every
// start of a program opens its binary and libraries, an interpreter its
// modules — opens them without asking the host. The lease stays in
// c.files while idle, so a break or a revoke fences and drops it as any
// other; an idle lease found fenced or gone is not reused. Idle leases
// are let go after ClientConfig.Linger (30 s; negative: at once), the
// oldest first past maxIdle, and at a
// switch those of files the new generation changed: they would keep the
// space of a replaced file only for opens that can no longer come.
const (
	defaultLinger = 30 * time.Second
	maxIdle       = 4096
)

// idleFile is a lease kept after its file's last close.
type idleFile struct {
	lf    *leasedFile
	since time.Time
}

// park keeps lf's lease after its last close, instead of releasing it.
// It returns what must be released now (lf itself if it cannot be kept,
// or the oldest idle leases past maxIdle). Called with c.mu held.
func (c *Client) parkLocked(lf *leasedFile) []*leasedFile {
	if c.closed || c.cfg.Linger < 0 || lf.Stale() != nil {
		return []*leasedFile{lf}
	}
	var out []*leasedFile
	if old, ok := c.idle[lf.node]; ok && old.lf != lf {
		out = append(out, old.lf) // one lease per version is enough
	}
	c.idle[lf.node] = idleFile{lf, time.Now()}
	for len(c.idle) > maxIdle {
		var oldest uint64
		var at time.Time
		for node, f := range c.idle {
			if at.IsZero() || f.since.Before(at) {
				oldest, at = node, f.since
			}
		}
		out = append(out, c.idle[oldest].lf)
		delete(c.idle, oldest)
	}
	if c.idleTimer == nil {
		c.idleTimer = time.AfterFunc(c.cfg.Linger, c.expireIdle)
	}
	return out
}

// reuse returns the idle lease of node (a version of a file: its
// content), taking it out of the idle ones, or nil. Called with c.mu held.
func (c *Client) reuseLocked(node uint64) *leasedFile {
	f, ok := c.idle[node]
	if !ok {
		return nil
	}
	delete(c.idle, node)
	if c.files[f.lf.id] != f.lf || f.lf.Stale() != nil {
		return nil // broken, revoked or lost while idle: nothing to release
	}
	c.m.leasesReused.Inc()
	return f.lf
}

// expireIdle releases the leases idle for the Linger, and runs again
// while some remain.
func (c *Client) expireIdle() {
	c.mu.Lock()
	var out []*leasedFile
	next := time.Duration(0)
	for node, f := range c.idle {
		if age := time.Since(f.since); age >= c.cfg.Linger || c.closed {
			out = append(out, f.lf)
			delete(c.idle, node)
		} else if next == 0 || c.cfg.Linger-age < next {
			next = c.cfg.Linger - age
		}
	}
	c.idleTimer = nil
	if len(c.idle) > 0 && !c.closed {
		c.idleTimer = time.AfterFunc(next, c.expireIdle)
	}
	c.mu.Unlock()
	c.release(out)
}

// dropIdle releases every idle lease, and says how many there were.
func (c *Client) dropIdle() int {
	c.mu.Lock()
	out := make([]*leasedFile, 0, len(c.idle))
	for node, f := range c.idle {
		out = append(out, f.lf)
		delete(c.idle, node)
	}
	c.mu.Unlock()
	c.release(out)
	return len(out)
}

// pruneIdle releases, after a switch to view f, the idle leases of files
// that f no longer has as they were (ch says which inodes changed): a new
// open would find another version, so they only kept the old one's space.
func (c *Client) pruneIdle(f *ext4ro.FS, ch *changes) {
	c.mu.Lock()
	var check []uint64
	for node := range c.idle {
		if _, changed := ch.inodes[nodeIno(node)]; ch.all || changed {
			check = append(check, node)
		}
	}
	c.mu.Unlock()
	var out []*leasedFile
	for _, node := range check {
		if in, err := f.Inode(nodeIno(node)); err == nil && NodeID(in) == node {
			continue
		}
		c.mu.Lock()
		if idle, ok := c.idle[node]; ok {
			out = append(out, idle.lf)
			delete(c.idle, node)
		}
		c.mu.Unlock()
	}
	c.release(out)
}

// release gives the host back the leases of lfs that are still held.
// No lock may be held.
func (c *Client) release(lfs []*leasedFile) {
	for _, lf := range lfs {
		c.mu.Lock()
		_, held := c.files[lf.id]
		delete(c.files, lf.id)
		c.mu.Unlock()
		if held {
			if _, err := c.call(nil, &vsockproto.Release{Lease: lf.id}); err != nil {
				c.log.Debug("releasing a lease", "inode", lf.ino, "error", err)
			}
		}
	}
}
