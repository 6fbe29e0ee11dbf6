package guestagent

import (
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/layout"
	"github.com/leasefs/leasefs/vsockproto"
)

// Open leases a regular file for a FUSE open (Files). If the host says
// the file is not as the view's generation has it (it changed, went, or a
// writer has it), the open moves to a newer generation and tries the
// same inode there: at once if one was announced; otherwise, when the
// host publishes on its own, after waiting for one (OpenWait); when it
// publishes only when told, it fails at once. The error then says which
// generation and why.
func (c *Client) Open(cancel <-chan struct{}, v *ext4ro.FS, in *ext4ro.Inode, fixed bool) (OpenFile, error) {
	var waitUntil time.Time // for a newer generation; set on the first refusal
	for {
		gv := c.viewOf(v)
		if gv == nil && fixed {
			return nil, fmt.Errorf("%w: inode %d: the host no longer keeps its generation", ErrStale, in.Ino)
		}
		if gv == nil { // a reader too old to remember: the view served now
			if v == c.fs.View() {
				// The one served is dead (the host lost its
				// generation): the switcher is moving away from it.
				if why := c.awaitSwitchFrom(cancel, v); why != "" {
					return nil, fmt.Errorf("%w: inode %d: the host no longer has the generation served, and %s", ErrStale, in.Ino, why)
				}
			}
			var err error
			if v, in, err = c.sameFileNow(in); err != nil {
				return nil, err
			}
			continue
		}
		c.mu.Lock()
		lf := c.files.reuse(NodeID(in))
		c.mu.Unlock()
		if lf != nil {
			c.m.leasesReused.Inc()
			return lf, nil
		}
		lf, err := c.lease(cancel, gv, v, in)
		if errors.Is(err, vsockproto.ErrQuota) && c.dropIdle() > 0 {
			// The leases kept idle count against this guest's share
			// of the host's files: they go first.
			lf, err = c.lease(cancel, gv, v, in)
		}
		if errors.Is(err, errLeaseLost) {
			continue // granted by a session that is gone: ask the next one
		}
		if err == nil {
			return lf, nil
		}
		var cause error
		switch {
		case errors.Is(err, vsockproto.ErrStale), errors.Is(err, vsockproto.ErrNotFound),
			errors.Is(err, vsockproto.ErrNotRegular), errors.Is(err, vsockproto.ErrGone):
			cause = ErrStale
		case errors.Is(err, vsockproto.ErrBusy):
			cause = ErrBusy
		default:
			return nil, err
		}
		if fixed {
			// A file of .generations is that generation's or nothing.
			return nil, fmt.Errorf("%w: inode %d of kept generation %d: %v", cause, in.Ino, gv.gen, err)
		}
		if waitUntil.IsZero() {
			c.mu.Lock()
			waitUntil = time.Now().Add(c.openWaitLocked())
			c.mu.Unlock()
		}
		if why := c.awaitNewer(cancel, gv, waitUntil); why != "" {
			label := "stale"
			if cause == ErrBusy {
				label = "busy"
			}
			c.m.openRefusals.WithLabelValues(label).Inc()
			return nil, fmt.Errorf("%w: inode %d at generation %d: %v; %s", cause, in.Ino, gv.gen, err, why)
		}
		if v, in, err = c.sameFileNow(in); err != nil {
			return nil, err
		}
	}
}

// openWaitLocked is how long an open may wait for a newer generation.
// Called with c.mu held.
func (c *Client) openWaitLocked() time.Duration {
	if c.cfg.OpenWait > 0 {
		return c.cfg.OpenWait
	}
	return c.sess.policy.max + 5*time.Second
}

// awaitNewer moves the client off gv (forcing the switch), waiting until
// the deadline for a newer generation to be announced. It returns why it
// could not, or "".
func (c *Client) awaitNewer(cancel <-chan struct{}, gv *genView, deadline time.Time) string {
	stop := c.wakeOn(cancel)
	defer stop()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sw.cur != gv {
		return "" // moved meanwhile
	}
	if c.sw.pinned != 0 {
		return fmt.Sprintf("the mount is pinned to generation %d", c.sw.pinned)
	}
	if c.sw.latest == gv.gen {
		if c.sess.policy.known && c.sess.policy.max == 0 {
			return "the host publishes only when told (leasefs publish), and has not since"
		}
		c.waitLocked(func() bool { return c.sw.latest != gv.gen || interrupted(cancel) }, deadline)
		if interrupted(cancel) {
			return "interrupted"
		}
		if c.sw.latest == gv.gen {
			return fmt.Sprintf("no newer generation came within %v", c.openWaitLocked())
		}
	}
	c.sw.force = true
	c.wake()
	switchBy := time.Now().Add(10 * time.Second)
	if deadline.After(switchBy) {
		switchBy = deadline
	}
	c.waitLocked(func() bool { return c.sw.cur != gv }, switchBy)
	if c.sw.cur == gv {
		return "the switch to a newer generation did not finish in time"
	}
	return ""
}

// awaitSwitchFrom waits a while for the switcher to serve another view
// than f, and returns why it did not, or "".
func (c *Client) awaitSwitchFrom(cancel <-chan struct{}, f *ext4ro.FS) string {
	stop := c.wakeOn(cancel)
	defer stop()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.waitLocked(func() bool { return c.fs.View() != f || interrupted(cancel) }, time.Now().Add(10*time.Second))
	switch {
	case c.fs.View() != f:
		return ""
	case interrupted(cancel):
		return "the open was interrupted"
	}
	return "the switch to its newest did not finish in time"
}

// sameFileNow finds in (the same version of the same file: its node) in
// the view served now. A file that changed is another node, which the
// kernel must look up by name: the ESTALE this open then answers makes
// it do so (the VFS looks the path up again, and opens what it finds).
func (c *Client) sameFileNow(in *ext4ro.Inode) (*ext4ro.FS, *ext4ro.Inode, error) {
	v := c.fs.View()
	nin, err := v.Inode(in.Ino)
	switch {
	case err != nil || !nin.IsRegular() || nin.Generation != in.Generation:
		return nil, nil, fmt.Errorf("%w: inode %d is another file, or none, in the generation served now", ErrStale, in.Ino)
	case NodeID(nin) != NodeID(in):
		return nil, nil, fmt.Errorf("%w: inode %d changed in the generation served now", ErrStale, in.Ino)
	}
	return v, nin, nil
}

// lease asks the host for a lease on in as generation gv has it.
func (c *Client) lease(cancel <-chan struct{}, gv *genView, v *ext4ro.FS, in *ext4ro.Inode) (*leasedFile, error) {
	file, err := v.OpenFile(in)
	if err != nil {
		return nil, err
	}
	reply, epoch, err := c.callIn(cancel, &vsockproto.Open{Generation: gv.gen, Inode: in.Ino, IGen: in.Generation, Size: in.Size,
		Ctime: vsockproto.Timespec{Sec: in.Ctime.Sec, Nsec: in.Ctime.Nsec}, Layout: layout.Hash(file.Extents())})
	if err != nil {
		c.log.Debug("open refused", "inode", in.Ino, "generation", gv.gen, "error", err)
		return nil, err
	}
	lf := &leasedFile{c: c, id: reply.(*vsockproto.Leased).Lease, node: NodeID(in), ino: in.Ino, gen: gv.gen, file: file}
	switch {
	case file.Inline():
		lf.data = c.m.data.WithLabelValues("inline")
	case c.dev != nil:
		lf.data = c.m.data.WithLabelValues("device")
	}
	if err := c.hold(lf, epoch); err != nil {
		return nil, err
	}
	return lf, nil
}

// hold counts lf among the files held, unless the session of epoch that
// granted its lease ended, and the next did not resume it, before this:
// the lost session's fence went through the files held without it, and
// the host no longer holds its lease.
func (c *Client) hold(lf *leasedFile, epoch uint64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sess.epoch != epoch {
		return errLeaseLost
	}
	c.files.add(lf)
	return nil
}

// errLeaseLost: a lease was granted by a session that is gone.
var errLeaseLost = errors.New("the lease was granted by a session that is gone")

// openFiles is the leases a guest holds, guarded by Client.mu: those of
// open files and those kept idle after their last close (idle.go), and
// the files fenced last, for status.
type openFiles struct {
	leases    map[uint64]*leasedFile // by lease id, idle ones too
	idle      map[uint64]idleFile    // by node (idle.go)
	idleTimer *time.Timer            // releases them
	fenced    []FencedFile           // the latest, newest last
}

func newOpenFiles() openFiles {
	return openFiles{leases: map[uint64]*leasedFile{}, idle: map[uint64]idleFile{}}
}

func (o *openFiles) add(lf *leasedFile) { o.leases[lf.id] = lf }

// holds says whether lf's lease is still held.
func (o *openFiles) holds(lf *leasedFile) bool { return o.leases[lf.id] == lf }

// remove forgets lf, and says whether its lease was held.
func (o *openFiles) remove(lf *leasedFile) bool {
	held := o.holds(lf)
	if held {
		delete(o.leases, lf.id)
	}
	return held
}

// take forgets the leases of ids (a break) and returns those held.
func (o *openFiles) take(ids []uint64) []*leasedFile {
	var out []*leasedFile
	for _, id := range ids {
		if lf := o.leases[id]; lf != nil {
			out = append(out, lf)
			delete(o.leases, id)
		}
	}
	return out
}

// takeAll forgets every lease (a revoke, a session lost) and returns
// them.
func (o *openFiles) takeAll() []*leasedFile {
	out := make([]*leasedFile, 0, len(o.leases))
	for id, lf := range o.leases {
		out = append(out, lf)
		delete(o.leases, id)
	}
	return out
}

// noteFenced remembers a fenced file, for status: the last maxFenced.
func (o *openFiles) noteFenced(f FencedFile) {
	o.fenced = append(o.fenced, f)
	if n := len(o.fenced); n > maxFenced {
		o.fenced = append(o.fenced[:0], o.fenced[n-maxFenced:]...)
	}
}

func (o *openFiles) stop() {
	if o.idleTimer != nil {
		o.idleTimer.Stop()
	}
}

// leasedFile is a file open under a lease. It reads its data from the
// device through the block map it was opened with, or through the host
// (no device, or one that does not verify).
type leasedFile struct {
	c    *Client
	id   uint64
	node uint64 // the FUSE node id, for invalidation
	ino  uint32
	gen  uint64       // the generation it was opened in
	file *ext4ro.File // its size and block map then, over the device (if any)
	data prometheus.Counter

	// fenced is why the file may no longer be read (a break, a lost
	// session), once it is. Reads check it before and after they read:
	// one that finds it set after is thrown away, for the lease may have
	// ended while it read.
	fenced atomic.Pointer[string]
}

// fence stops lf's reads: from now on, and of those in flight, every one
// that ends after this is ESTALE. Its pages and attributes are dropped
// from the kernel's caches (by the switcher). No lock may be held.
func (c *Client) fence(lf *leasedFile, why string) {
	lf.fenced.Store(&why)
	path := c.fs.nodes.path(lf.node)
	c.log.Warn("an open file was fenced: its reads are ESTALE from now on", "path", path, "inode", lf.ino, "generation", lf.gen, "why", why)
	c.mu.Lock()
	c.sw.inval = append(c.sw.inval, lf.node)
	c.files.noteFenced(FencedFile{Inode: lf.ino, Path: path, Generation: lf.gen, Why: why, At: time.Now()})
	c.mu.Unlock()
	c.wake()
}

// maxFenced is how many fenced files status remembers.
const maxFenced = 32

// Stale says why lf may no longer be read, or nil.
func (lf *leasedFile) Stale() error {
	if why := lf.fenced.Load(); why != nil {
		return fmt.Errorf("%w: inode %d: %s", ErrStale, lf.ino, *why)
	}
	return nil
}

func (lf *leasedFile) ReadAt(p []byte, off int64) (int, error) { return lf.ReadAtOrCancel(nil, p, off) }

// ReadAtOrCancel is ReadAt, ending with errInterrupted if cancel closes
// while it waits for the host (Interruptible).
func (lf *leasedFile) ReadAtOrCancel(cancel <-chan struct{}, p []byte, off int64) (int, error) {
	if lf.file.Inline() || !lf.c.deviceOK() {
		if err := lf.Stale(); err != nil {
			return 0, err
		}
		var n int
		var err error
		if lf.file.Inline() { // the bytes are the generation's metadata
			n, err = lf.file.ReadAt(p, off)
		} else {
			n, err = lf.readHost(cancel, p, off)
		}
		if serr := lf.Stale(); serr != nil {
			return 0, serr // the lease may have ended while we read
		}
		return n, err
	}
	// From the device: only while a session holds the lease, before and
	// after the read (holding.go); a read the session's loss overlapped
	// is made again, or fails, once the session is back or not.
	for {
		if err := lf.Stale(); err != nil {
			return 0, err
		}
		s, err := lf.c.holding(cancel)
		if err != nil {
			return 0, fmt.Errorf("inode %d: %w", lf.ino, err)
		}
		if err := lf.Stale(); err != nil { // fenced while it waited
			return 0, err
		}
		n, err := lf.file.ReadAt(p, off)
		if serr := lf.Stale(); serr != nil {
			return 0, serr // the lease may have ended while we read
		}
		if lf.c.live.Load() == s && s.holds() {
			if lf.data != nil {
				lf.data.Add(float64(n))
			}
			return n, err
		}
		lf.c.m.readsRedone.Inc()
	}
}

// readHost reads through the host, a frame at most per request.
func (lf *leasedFile) readHost(cancel <-chan struct{}, p []byte, off int64) (int, error) {
	c := lf.c
	if off >= 0 && uint64(off) >= lf.file.Size() {
		return 0, io.EOF
	}
	n := 0
	for n < len(p) {
		want := min(len(p)-n, maxRead)
		reply, err := c.call(cancel, &vsockproto.Read{Lease: lf.id, Offset: uint64(off) + uint64(n), Length: uint32(want)})
		if err != nil {
			return n, err
		}
		d := reply.(*vsockproto.Data).Data
		if len(d) > want {
			return n, fmt.Errorf("the host sent %d bytes for a read of %d", len(d), want)
		}
		n += copy(p[n:], d)
		c.m.data.WithLabelValues("host").Add(float64(len(d)))
		if len(d) < want {
			return n, io.EOF
		}
	}
	return n, nil
}

// maxRead is the most one Read asks for: the most a host answers with.
const maxRead = vsockproto.MaxReply

// Close ends the last open of lf: its lease is kept idle for a while
// (idle.go), for the next open of the same version.
func (lf *leasedFile) Close() error {
	c := lf.c
	c.mu.Lock()
	if !c.files.holds(lf) {
		c.mu.Unlock()
		return nil // broken, revoked or lost: nothing to release
	}
	out := c.parkLocked(lf)
	c.mu.Unlock()
	c.release(out)
	return nil
}
