package guestagent

import (
	"time"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/vsockproto"
)

// A file's lease outlives its last close for a while (as an NFSv4 client
// keeps a delegation): a program that opens the same files again — every
// start of a program opens its binary and libraries, an interpreter its
// modules — opens them without asking the host. The lease stays among
// the open files (openFiles.leases) while idle, so a break or a revoke
// fences and drops it as any other; an idle lease found fenced or gone
// is not reused. Idle leases are let go after ClientConfig.Linger (30 s;
// negative: at once), the oldest first past maxIdle, and at a switch
// those of files the new generation changed: they would keep the space
// of a replaced file only for opens that can no longer come.
const (
	defaultLinger = 30 * time.Second
	maxIdle       = 4096
)

// idleFile is a lease kept after its file's last close.
type idleFile struct {
	lf    *leasedFile
	since time.Time
}

// park keeps lf's lease after its last close, as the node's idle one,
// and returns what must be released now: the node's lease it replaces,
// or the oldest idle leases past maxIdle. The first lease parked arms the
// timer that runs expire.
func (o *openFiles) park(lf *leasedFile, linger time.Duration, expire func()) []*leasedFile {
	var out []*leasedFile
	if old, ok := o.idle[lf.node]; ok && old.lf != lf {
		out = append(out, old.lf) // one lease per version is enough
	}
	o.idle[lf.node] = idleFile{lf, time.Now()}
	for len(o.idle) > maxIdle {
		var oldest uint64
		var at time.Time
		for node, f := range o.idle {
			if at.IsZero() || f.since.Before(at) {
				oldest, at = node, f.since
			}
		}
		out = append(out, o.idle[oldest].lf)
		delete(o.idle, oldest)
	}
	if o.idleTimer == nil {
		o.idleTimer = time.AfterFunc(linger, expire)
	}
	return out
}

// reuse returns the idle lease of node (a version of a file: its
// content), taking it out of the idle ones, or nil.
func (o *openFiles) reuse(node uint64) *leasedFile {
	f, ok := o.idle[node]
	if !ok {
		return nil
	}
	delete(o.idle, node)
	if !o.holds(f.lf) || f.lf.Stale() != nil {
		return nil // broken, revoked or lost while idle: nothing to release
	}
	return f.lf
}

// expired takes out the leases idle for linger (all of them, if all),
// and says when the next one will be (0: none left).
func (o *openFiles) expired(linger time.Duration, all bool) (out []*leasedFile, next time.Duration) {
	for node, f := range o.idle {
		if age := time.Since(f.since); age >= linger || all {
			out = append(out, f.lf)
			delete(o.idle, node)
		} else if next == 0 || linger-age < next {
			next = linger - age
		}
	}
	return out, next
}

// takeIdle takes node's idle lease out, if it has one.
func (o *openFiles) takeIdle(node uint64) (*leasedFile, bool) {
	f, ok := o.idle[node]
	delete(o.idle, node)
	return f.lf, ok
}

// parkLocked is openFiles.park for the client: with c.mu held, it keeps
// lf idle unless the client closes, lingers for no time or lf is fenced.
func (c *Client) parkLocked(lf *leasedFile) []*leasedFile {
	if c.closed || c.cfg.Linger < 0 || lf.Stale() != nil {
		return []*leasedFile{lf}
	}
	return c.files.park(lf, c.cfg.Linger, c.expireIdle)
}

// expireIdle releases the leases idle for the Linger, and runs again
// while some remain.
func (c *Client) expireIdle() {
	c.mu.Lock()
	out, next := c.files.expired(c.cfg.Linger, c.closed)
	c.files.idleTimer = nil
	if next > 0 && !c.closed {
		c.files.idleTimer = time.AfterFunc(next, c.expireIdle)
	}
	c.mu.Unlock()
	c.release(out)
}

// dropIdle releases every idle lease, and says how many there were.
func (c *Client) dropIdle() int {
	c.mu.Lock()
	out, _ := c.files.expired(0, true)
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
	for node := range c.files.idle {
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
		if lf, ok := c.files.takeIdle(node); ok {
			out = append(out, lf)
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
		held := c.files.remove(lf)
		c.mu.Unlock()
		if held {
			if _, err := c.call(nil, &vsockproto.Release{Lease: lf.id}); err != nil {
				c.log.Debug("releasing a lease", "inode", lf.ino, "error", err)
			}
		}
	}
}
