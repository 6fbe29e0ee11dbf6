package guestagent

import (
	"errors"
	"time"

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

// switching is what the mount serves and knows of the host's
// generations, guarded by Client.mu. The switcher alone moves cur.
type switching struct {
	cur         *genView    // the generation served
	moving      *genView    // the one a switch serves the kernel, until it is done
	latest      uint64      // the newest generation the host announced
	latestLabel string      // latest's label, as the host published it
	pinned      uint64      // the generation the mount stays on (ClientConfig.Pin); 0 once it follows
	pending     changes     // from cur to latest
	force       bool        // switch to latest whatever Follow says
	switched    time.Time   // the last switch
	timer       *time.Timer // a deferred switch (Follow.Interval)
	inval       []uint64    // nodes whose pages and attributes to drop
	lineage     uint64      // counts the hosts that lost the generation served (welcomed)

	// The views of kept generations, for .generations (browse.go), and
	// the list of them.
	browse   map[uint64]servedView
	keptList []vsockproto.KeptGeneration
	keptAt   time.Time // when keptList was asked for
}

// start serves v first, the host's newest being latest.
func (s *switching) start(v *genView, latest uint64) {
	s.cur, s.latest, s.switched = v, latest, time.Now()
	if v.gen != latest {
		s.pending.all = true // from a pinned generation: what changed since is not known
	}
}

func (s *switching) stop() {
	if s.timer != nil {
		s.timer.Stop()
	}
}

// announce records a generation the host announced, unless it is late
// or doubled (false).
func (s *switching) announce(m *vsockproto.Announce) bool {
	if m.Generation <= s.latest {
		return false
	}
	switch {
	case s.pinned != 0:
		// Pinned, the changes are not kept (they would grow without
		// bound): a switch, if the pin ends, goes through everything.
		s.pending = changes{all: true}
	case m.Generation > s.latest+1:
		s.pending.all = true // some were missed
		s.pending.add(m)
	default:
		s.pending.add(m)
	}
	// What the host keeps changes with each publish: the list of them
	// is asked for again (browse.go).
	s.keptAt = time.Time{}
	s.latest = m.Generation
	s.noteLabel(m.Generation, m.Label)
	return true
}

// welcomed records what a new session's Welcome says of the host's
// generations; kept says whether the host still has the one served.
// When it does not, every view is dead (nothing more is read for them:
// their numbers may now name another lineage's generations) and the
// switch to the host's newest is forced; it returns the views of kept
// generations to forget.
func (s *switching) welcomed(w *vsockproto.Welcome, kept bool, recent []servedView) (forget []*ext4ro.FS) {
	if s.cur != nil {
		switch {
		case !kept:
			for _, v := range recent {
				if v.gen != nil {
					v.gen.dead.Store(true)
				}
			}
			for gen, v := range s.browse {
				v.gen.dead.Store(true)
				forget = append(forget, v.fs)
				delete(s.browse, gen)
			}
			s.cur.dead.Store(true)
			if s.moving != nil {
				s.moving.dead.Store(true)
			}
			s.lineage++
			s.latest, s.force = w.Generation, true
			s.pending = changes{all: true}
		case w.Generation > s.latest:
			s.latest = w.Generation
			s.pending.all = true // announcements were missed
		}
	}
	s.noteLabel(w.Generation, w.Label)
	return forget
}

// noteLabel records the label ("" for none) the host published
// generation gen with: the newest announced, which the next switch moves
// to, or the one served.
func (s *switching) noteLabel(gen uint64, label string) {
	if gen == s.latest {
		s.latestLabel = label
	}
	if s.cur != nil && s.cur.gen == gen {
		s.cur.label = label
	}
}

// browsed returns the generation of .generations's reader f, if it is
// one.
func (s *switching) browsed(f *ext4ro.FS) *genView {
	for _, v := range s.browse {
		if v.fs == f {
			return v.gen
		}
	}
	return nil
}

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
		err := c.step()
		if errors.Is(err, errLineageChanged) {
			c.wake() // at once, to the new host's generation
			continue
		}
		if err != nil {
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
	nodes := c.sw.inval
	c.sw.inval = nil
	old, target, ch, label, lineage := c.sw.cur, c.sw.latest, c.sw.pending, c.sw.latestLabel, c.sw.lineage
	// A dead view must go even for a generation of the same number.
	due := (target != old.gen || old.dead.Load()) && !c.closed && c.dueLocked()
	if due {
		c.sw.pending, c.sw.force = changes{}, false
	}
	c.mu.Unlock()
	for _, id := range nodes {
		c.kernel.inodeNotify(id)
	}
	if !due {
		return nil
	}
	if err := c.switchTo(old, target, label, lineage, &ch); err != nil {
		c.mu.Lock()
		c.sw.pending.all = true // what was taken is lost: start over
		c.sw.force = c.sw.force || ch.all
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
	case c.sw.pinned != 0:
		return false // until the host drops it (unpin, generationGone)
	case c.sw.force:
		return true
	case f.Manual:
		return false
	case f.Interval > 0:
		if wait := f.Interval - time.Since(c.sw.switched); wait > 0 {
			if c.sw.timer == nil {
				c.sw.timer = time.AfterFunc(wait, func() {
					c.mu.Lock()
					c.sw.timer = nil
					c.mu.Unlock()
					c.wake()
				})
			}
			return false
		}
	}
	return true
}

// switchTo moves from old to generation target (published as label) of
// the host's lineage, ch being what changed between them, and tells the
// kernel.
func (c *Client) switchTo(old *genView, target uint64, label string, lineage uint64, ch *changes) error {
	oldFS := c.fs.View()
	// What the kernel may cache of changed directories, as the old view
	// has it: read now, while its blocks are still the cached ones.
	var before map[uint32]dirState
	if !ch.all {
		before = c.kernel.changedDirs(oldFS, ch)
	}
	c.cache.advance(target, ch)
	nv := &genView{c: c, gen: target, label: label, bs: old.bs}
	c.mu.Lock()
	if c.sw.lineage != lineage {
		// A host that lost our generation came meanwhile: target may
		// name another generation now. The next step goes to its.
		c.mu.Unlock()
		return errLineageChanged
	}
	c.sw.moving = nv // from now on, a host that lost it marks it dead too
	c.mu.Unlock()
	f, err := c.open(nv)
	if err != nil {
		c.mu.Lock()
		c.sw.moving = nil
		c.mu.Unlock()
		if nv.dead.Load() {
			return errLineageChanged
		}
		return err
	}
	c.fs.serve(f, uint32(target), nv)
	if ch.all {
		c.kernel.invalidateAll(f)
	} else {
		c.kernel.invalidate(oldFS, f, ch, before)
	}
	// Only now is the switch done: what the kernel cached of the old
	// view is gone.
	c.mu.Lock()
	c.sw.cur, c.sw.moving, c.sw.switched = nv, nil, time.Now()
	c.checkSwitcher()
	c.changed.Broadcast()
	c.mu.Unlock()
	c.m.switches.Inc()
	c.log.Debug("switched generation", "from", old.gen, "to", target, "all", ch.all)
	c.pruneIdle(f, ch)
	return nil
}

// errLineageChanged: a switch was overtaken by a host that lost the
// generation served.
var errLineageChanged = errors.New("the host lost the generation served during the switch")

// announced records a generation the host announced, and, if Follow
// moves to it now, waits (a while) until the switch is done, so that the
// acknowledgement names it.
func (c *Client) announced(m *vsockproto.Announce) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.sw.announce(m) {
		return
	}
	// .generations's listing, cached by the kernel, goes too.
	if c.fs != nil && c.fs.nodes.has(genDirID) {
		c.sw.inval = append(c.sw.inval, genDirID)
	}
	c.checkSwitcher()
	c.changed.Broadcast()
	c.wake()
	if c.dueLocked() {
		c.waitLocked(func() bool { return c.sw.cur.gen >= m.Generation }, time.Now().Add(10*time.Second))
	}
}

// Refresh moves to the newest generation announced, whatever Follow
// says, and returns once it has (or after a while: it logs why not).
func (c *Client) Refresh() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sw.latest == c.sw.cur.gen || c.sw.pinned != 0 {
		return // nothing newer, or pinned: it stays
	}
	c.sw.force = true
	c.wake()
	old := c.sw.cur
	c.waitLocked(func() bool { return c.sw.cur != old }, time.Now().Add(10*time.Second))
}
