package guestagent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/leasefs/leasefs/vsockproto"
)

// session is the guest's connection to the host and what the host said
// of it, guarded by Client.mu.
type session struct {
	conn *vsockproto.Conn // nil while disconnected
	lost time.Time        // when the last connection ended
	gone string           // why the host no longer serves the export, if it said so
	// downAfterWait: a wait for the host timed out since the last
	// connection (DownPolicy): requests fail at once until the next.
	downAfterWait bool
	token         vsockproto.Token
	policy        publishPolicy
	connected     time.Time
	reconnects    int
	resumes       int
	// epoch counts the sessions the host did not resume: a lease is
	// the epoch's it was granted in, and goes with it.
	epoch uint64
}

// begin records a new connection and its Welcome.
func (s *session) begin(conn *vsockproto.Conn, w *vsockproto.Welcome) {
	s.conn, s.token, s.connected, s.gone, s.downAfterWait = conn, w.Token, time.Now(), "", false
	s.policy = publishPolicy{known: conn.Features().Has(vsockproto.FeaturePublishPolicy), quiet: w.PublishQuiet, max: w.PublishMax}
	if w.Resumed {
		s.resumes++
	} else {
		s.epoch++
	}
}

// end records that conn ended, if it is the session's, and says
// whether it was.
func (s *session) end(conn *vsockproto.Conn) bool {
	if s.conn != conn {
		return false
	}
	s.conn, s.lost = nil, time.Now()
	return true
}

func (c *Client) features() vsockproto.Features {
	// Data through the host even with a device: the fallback while the
	// device does not verify.
	f := vsockproto.FeatureLayout | vsockproto.FeatureResume | vsockproto.FeatureReadData | vsockproto.FeaturePublishPolicy |
		vsockproto.FeatureLabel | vsockproto.FeatureLeaseTime | vsockproto.FeatureKept
	if c.dev != nil {
		f |= vsockproto.FeatureDigests // metadata from the device, checked (digests.go)
	}
	return f
}

// dial connects and runs the handshake, resuming the session if the host
// still has it. If it does not, the files open under the old session are
// fenced: the host may have freed what they were.
func (c *Client) dial(ctx context.Context) (*vsockproto.Welcome, error) {
	c.mu.Lock()
	hello := vsockproto.Hello{Export: c.cfg.Export, Token: c.sess.token, Features: c.features()}
	if c.sw.cur != nil {
		hello.Generation = c.sw.cur.gen
	}
	switch {
	case c.sw.cur == nil && (c.cfg.Pin != 0 || c.cfg.PinLabel != ""):
		// Only a guest that pins says so: a host that does not know
		// the feature refuses the Hello.
		hello.Features |= vsockproto.FeaturePin
		hello.Generation, hello.Label = c.cfg.Pin, c.cfg.PinLabel
	case c.sw.pinned != 0:
		hello.Features |= vsockproto.FeaturePin
	}
	pinned := c.sw.pinned
	c.mu.Unlock()
	conn, w, err := vsockproto.DialHello(ctx, c.cfg.Addr, hello, c.handle, c.cfg.Conn)
	if err != nil {
		var pe *vsockproto.Error
		if errors.As(err, &pe) && pe.Code == vsockproto.CodeNoExport {
			// Said plainly: what waits for the host fails at once.
			c.mu.Lock()
			c.sess.gone = pe.Message
			c.changed.Broadcast()
			c.mu.Unlock()
		}
		return nil, fmt.Errorf("connecting to %v: %w", c.cfg.Addr, err)
	}
	if c.dev == nil && !conn.Features().Has(vsockproto.FeatureReadData) {
		conn.Close()
		return nil, ErrNeedsDevice
	}
	c.mu.Lock()
	cur := c.sw.cur
	c.mu.Unlock()
	if w.Kept && cur != nil && !sameGeneration(ctx, conn, cur) {
		// Another lineage of generations (another export under the same
		// name, or a host agent whose state was wiped): the number is
		// the same, the generation is not.
		c.log.Warn("the host's generation of this number is not ours; moving to the host's newest", "generation", cur.gen)
		w.Kept = false
	}
	if w.LeaseTime > 0 {
		// A connection that died silently is found within a third of
		// the lease time after its keepalive ping: the host keeps the
		// session that long after a disconnect, and no longer.
		conn.SetPingTimeout(max(time.Second, w.LeaseTime/3))
	}
	var lost []*leasedFile
	c.mu.Lock()
	c.sess.begin(conn, w)
	c.live.Store(&liveSession{conn: conn, lease: w.LeaseTime})
	if !w.Resumed {
		lost = c.files.takeAll()
	}
	if pinned != 0 && w.Pinned != pinned {
		c.log.Error("the host no longer keeps the generation this mount is pinned to; moving to its newest", "generation", pinned)
		c.sw.pinned = 0
	}
	var recent []servedView
	if c.fs != nil {
		recent = c.fs.views.all()
	}
	if c.sw.cur != nil && !w.Kept {
		c.cache.forget()
	}
	forget := c.sw.welcomed(w, w.Kept, recent)
	c.checkSwitcher()
	c.changed.Broadcast()
	c.mu.Unlock()
	for _, f := range forget {
		c.fs.forgetBrowsed(f)
	}
	for _, lf := range lost {
		c.fence(lf, "the host agent's session is gone (restarted?)")
	}
	c.wake()
	return w, nil
}

// Run keeps the connection up, reconnecting with backoff, until ctx ends
// or the client is closed.
func (c *Client) Run(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	var lastWhy string // of the last failure to reconnect, while they last
	var lastSaid time.Time
	for {
		c.mu.Lock()
		conn := c.sess.conn
		c.mu.Unlock()
		if conn != nil {
			select {
			case <-ctx.Done():
				c.Close()
				return nil
			case <-c.done:
				return nil
			case <-conn.Done():
			}
			c.log.Warn("lost the host: reads of open files wait for it to come back", "error", conn.Err(), "down", c.cfg.Down)
			c.noteError(fmt.Errorf("lost the host: %w", conn.Err()))
			c.mu.Lock()
			if c.sess.end(conn) {
				c.live.Store(nil)
			}
			c.changed.Broadcast()
			c.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			c.Close()
			return nil
		case <-c.done:
			return nil
		case <-time.After(backoff):
		}
		w, err := c.dial(ctx)
		if err != nil {
			// Tried again often while the host is newly gone (an
			// upgrade, a restart: the session is still there to resume,
			// and reads wait for it), then less.
			c.mu.Lock()
			limit := time.Second
			if !c.sess.lost.IsZero() && time.Since(c.sess.lost) > time.Minute {
				limit = 5 * time.Second
			}
			c.mu.Unlock()
			backoff = min(backoff*2, limit)
			// Said once, again when the reason changes, and once a
			// minute while it lasts.
			if why := err.Error(); why != lastWhy || time.Since(lastSaid) > time.Minute {
				c.log.Warn("cannot reconnect to the host", "error", err)
				lastWhy, lastSaid = why, time.Now()
			}
			c.noteError(fmt.Errorf("reconnecting: %w", err))
			continue
		}
		lastWhy = ""
		backoff = 100 * time.Millisecond
		c.m.reconnects.Inc()
		c.mu.Lock()
		c.sess.reconnects++
		c.mu.Unlock()
		c.log.Info("reconnected to the host", "resumed", w.Resumed, "generation", w.Generation)
		if c.dev != nil {
			c.reverifyDevice(w)
		}
	}
}

// callDeadline bounds one try of a request, and its retries when the
// host answers retry.
const callDeadline = 30 * time.Second

// call sends a request and waits for its reply. Without a connection it
// waits for one as the mount's DownPolicy says, and fails at once when
// the host said it does not serve the export any more. When the
// connection ends under it, the request is sent again on the next
// connection; when the host answers retry (it is at a passing limit),
// again after a short wait, within callDeadline. Every request may be
// sent twice: an Open whose reply was lost leaves a lease the guest does
// not know of on a resumed session, until the session ends.
//
// An application's request that is interrupted (cancel, closed by the
// FUSE server; nil for none) ends its wait for a connection with
// errInterrupted, and its wait for the reply too, but for an Open: its
// lease would be left on the host, unknown, until the session ends (the
// host answers within callDeadline).
func (c *Client) call(cancel <-chan struct{}, m vsockproto.Message) (vsockproto.Message, error) {
	reply, _, err := c.callIn(cancel, m)
	return reply, err
}

// callIn is call, saying which session's epoch answered.
func (c *Client) callIn(cancel <-chan struct{}, m vsockproto.Message) (vsockproto.Message, uint64, error) {
	deadline := time.Now().Add(callDeadline)
	down := c.downDeadline()   // for a connection
	var ended *vsockproto.Conn // the last connection that ended under the request
	backoff := 5 * time.Millisecond
	// Only a request that waits for a connection pays for being woken by
	// its interruption.
	stop, armed := func() {}, false
	arm := func() {
		if !armed {
			armed, stop = true, c.wakeOn(cancel)
		}
	}
	defer func() { stop() }()
	for {
		c.mu.Lock()
		if c.sess.conn == nil && c.sess.gone == "" {
			arm()
		}
		c.waitLocked(func() bool { return c.sess.conn != nil || c.sess.gone != "" || interrupted(cancel) }, down)
		conn, closed, gone, epoch := c.sess.conn, c.closed, c.sess.gone, c.sess.epoch
		c.mu.Unlock()
		switch {
		case interrupted(cancel):
			c.m.interrupted.Inc()
			return nil, 0, errInterrupted
		case closed:
			return nil, 0, fmt.Errorf("%w: the mount is going away", errNotConnected)
		case conn == nil && gone != "":
			return nil, 0, fmt.Errorf("%w: %s", ErrExportGone, gone)
		case conn == nil:
			return nil, 0, c.timedOut()
		}
		abandon := cancel
		if _, ok := m.(*vsockproto.Open); ok {
			abandon = nil
		}
		ctx, end := context.WithTimeout(context.Background(), callDeadline)
		ctx, endWait := withInterrupt(ctx, abandon)
		reply, err := conn.Call(ctx, m)
		endWait()
		end()
		switch {
		case err == nil:
			return reply, epoch, nil
		case interrupted(abandon):
			c.m.interrupted.Inc()
			return nil, 0, errInterrupted
		case errors.Is(err, vsockproto.ErrRetry) && time.Now().Add(backoff).Before(deadline):
			time.Sleep(backoff)
			backoff = min(2*backoff, 500*time.Millisecond)
			continue
		case conn.Err() != nil && conn != ended:
			// The connection ended: wait for the next one, as --down
			// says from now (a connection found dead by its keepalive
			// ends long after the request began).
			ended, down = conn, c.downDeadline()
			fallthrough
		case conn.Err() != nil && (down.IsZero() || time.Now().Before(down)):
			c.mu.Lock()
			arm()
			c.waitLocked(func() bool { return c.sess.conn != conn || c.sess.gone != "" || interrupted(cancel) }, down)
			c.mu.Unlock()
			continue
		}
		return nil, 0, err
	}
}

// handle answers the host's requests.
func (c *Client) handle(ctx context.Context, req vsockproto.Message) (vsockproto.Message, error) {
	switch m := req.(type) {
	case *vsockproto.Announce:
		c.announced(m)
		return &vsockproto.AnnounceAck{Generation: c.Generation()}, nil
	case *vsockproto.Break:
		c.mu.Lock()
		broken := c.files.take(m.Leases)
		c.mu.Unlock()
		for _, lf := range broken {
			c.m.breaks.Inc()
			c.fence(lf, "a writer on the host wanted it back")
		}
		return &vsockproto.BreakAck{}, nil
	case *vsockproto.Revoke:
		// The host lets go of every file: none may be read from the
		// device any more.
		c.mu.Lock()
		revoked := c.files.takeAll()
		c.mu.Unlock()
		c.log.Warn("the host revoked every lease", "why", m.Why, "files", len(revoked))
		c.noteError(fmt.Errorf("the host revoked every lease: %s", m.Why))
		for _, lf := range revoked {
			c.fence(lf, "the host let go of it: "+m.Why)
		}
		return &vsockproto.RevokeAck{}, nil
	case *vsockproto.Unpin:
		c.unpin(m)
		return &vsockproto.UnpinAck{}, nil
	}
	return nil, vsockproto.Errorf(vsockproto.CodeNotSupported, "%v is not served by a guest", req.Type())
}

// generationGone: the host no longer keeps v's generation. If it is the
// one served, move to the newest whatever Follow says: nothing of it can
// be read any more.
func (c *Client) generationGone(v *genView) {
	c.mu.Lock()
	if c.sw.cur == v {
		c.sw.force = true
		if c.sw.pinned != 0 {
			c.log.Error("the host no longer keeps the generation this mount is pinned to; moving to its newest", "generation", c.sw.pinned)
			c.sw.pinned = 0
		}
	}
	c.mu.Unlock()
	c.wake()
}

// sameGeneration reports whether the host's generation numbered like v
// is v's: whether its superblock reads the same.
func sameGeneration(ctx context.Context, conn *vsockproto.Conn, v *genView) bool {
	first, last := uint64(superblockAt/v.bs), uint64((superblockAt+superblockSize-1)/v.bs)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	reply, err := conn.Call(ctx, &vsockproto.ReadMeta{Generation: v.gen, Blocks: []vsockproto.BlockRange{{Start: first, Count: uint32(last - first + 1)}}})
	if err != nil {
		return false
	}
	data := reply.(*vsockproto.Meta).Data
	off := superblockAt - int64(first)*v.bs
	return int64(len(data)) >= off+superblockSize && bytes.Equal(data[off:off+superblockSize], v.sb)
}
