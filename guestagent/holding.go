package guestagent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/leasefs/leasefs/vsockproto"
)

// A guest reads a leased file from the shared device only while it knows
// that the host holds the lease: the blocks it reads are the file's only
// as long as the host keeps the file open. So a device read needs a live
// session, one whose connection is up and whose host answered a request
// sent less than the lease time ago (the Welcome's LeaseTime: how long the
// host keeps a session's leases after that, less a margin). A read that
// finds no such session waits for one, as the mount's DownPolicy says; a
// read during which the session was lost (or went quiet past its lease
// time) is thrown away and made again once a session is back. A session
// that comes back resumed still holds the leases, and the read goes on;
// one that does not fences every open file (dial), and the read is
// ESTALE. Reads through the host need none of this: the host checks the
// lease.

// DownPolicy says what a request waits for while the host is down (or
// unreachable): reads of open files, metadata the guest has not cached,
// opens. Like NFS: hard waits until the host is back; soft fails with
// EIO after Timeout, and then at once until a session is back.
type DownPolicy struct {
	Hard    bool
	Timeout time.Duration // soft: how long to wait
}

// DefaultDown is the policy of a mount that says none.
var DefaultDown = DownPolicy{Timeout: 30 * time.Second}

// ParseDownPolicy parses "hard" or "soft=DURATION" ("soft" alone: 30 s).
func ParseDownPolicy(s string) (DownPolicy, error) {
	switch {
	case s == "hard":
		return DownPolicy{Hard: true}, nil
	case s == "soft":
		return DefaultDown, nil
	case strings.HasPrefix(s, "soft="):
		d, err := time.ParseDuration(strings.TrimPrefix(s, "soft="))
		if err != nil || d <= 0 {
			return DownPolicy{}, fmt.Errorf("%q: want a positive duration after soft=", s)
		}
		return DownPolicy{Timeout: d}, nil
	}
	return DownPolicy{}, fmt.Errorf("%q: want hard, soft or soft=DURATION", s)
}

func (p DownPolicy) String() string {
	if p.Hard {
		return "hard"
	}
	return "soft=" + p.Timeout.String()
}

// deadline is when a request that starts now gives up waiting for the
// host; zero for never.
func (p DownPolicy) deadline() time.Time {
	if p.Hard {
		return time.Time{}
	}
	return time.Now().Add(p.Timeout)
}

// liveSession is a connection and the lease time its host announced.
type liveSession struct {
	conn  *vsockproto.Conn
	lease time.Duration // 0: not announced (an older host): the connection alone says
}

// leaseMargin is what a guest takes off the host's lease time: its own
// clock measures both ends of the interval, so only the rate of the two
// clocks and the delays of the last exchange can differ.
func leaseMargin(lease time.Duration) time.Duration { return lease/10 + 50*time.Millisecond }

// holds reports whether s still guarantees its leases: its connection
// is up — as the kernel knows it now, not only as the reader has seen:
// a VM resumed after a pause longer than the lease time may not have
// counted the pause on its clocks, and the reset its host sent
// meanwhile is the first sign — and its host answered recently enough.
func (s *liveSession) holds() bool {
	if s == nil || !s.conn.Alive() {
		return false
	}
	return s.lease == 0 || time.Since(s.conn.Confirmed()) < s.lease-leaseMargin(s.lease)
}

// ErrExportGone: the host no longer serves the export (it was removed
// from its settings).
var ErrExportGone = errors.New("the host does not serve this export any more")

// errDown: the host stayed unreachable for as long as the policy waits.
var errDown = errors.New("the host is down")

// holding returns a session that holds the leases, waiting for one as
// the policy says: the current one, renewed with a ping if it went quiet;
// or the next one. It fails at once if the export is gone.
func (c *Client) holding(cancel <-chan struct{}) (*liveSession, error) {
	var deadline time.Time // zero: not waited yet, or waiting for ever
	stop := func() {}
	defer func() { stop() }()
	for waited := false; ; waited = true {
		s := c.live.Load()
		if s.holds() {
			return s, nil
		}
		if s != nil && s.conn.Err() == nil {
			// Up but quiet: an answer renews the lease time.
			ctx, end := context.WithTimeout(context.Background(), max(s.lease/4, time.Second))
			ctx, endWait := withInterrupt(ctx, cancel)
			_, err := s.conn.Call(ctx, &vsockproto.Ping{})
			endWait()
			end()
			if err == nil && s.holds() {
				return s, nil
			}
		}
		if !waited {
			deadline = c.downDeadline()
			stop = c.wakeOn(cancel) // only a request that waits pays for it
		}
		until := deadline
		if s != nil && s.conn.Err() == nil {
			// Quiet still: ask again in a while.
			if again := time.Now().Add(time.Second); until.IsZero() || again.Before(until) {
				until = again
			}
		}
		c.mu.Lock()
		c.waitLocked(func() bool { return c.live.Load() != s || c.sess.gone != "" || interrupted(cancel) }, until)
		gone, closed := c.sess.gone, c.closed
		c.mu.Unlock()
		switch {
		case interrupted(cancel) && !c.live.Load().holds():
			c.m.interrupted.Inc()
			return nil, errInterrupted
		case closed:
			return nil, fmt.Errorf("%w: the mount is going away", errNotConnected)
		case gone != "" && !c.live.Load().holds():
			return nil, fmt.Errorf("%w: %s", ErrExportGone, gone)
		case !deadline.IsZero() && !time.Now().Before(deadline) && !c.live.Load().holds():
			return nil, c.timedOut()
		}
	}
}

// downDeadline is when a request that starts now stops waiting for the
// host: as the policy says, or at once once a wait timed out and no
// session came since (a host down for long fails each request once, not
// after the timeout each time).
func (c *Client) downDeadline() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sess.downAfterWait && c.sess.conn == nil {
		return time.Now()
	}
	return c.cfg.Down.deadline()
}

// timedOut records that a wait for the host timed out, and says so.
func (c *Client) timedOut() error {
	c.mu.Lock()
	c.sess.downAfterWait = true
	c.mu.Unlock()
	return fmt.Errorf("%w: no session with %v (down policy %v)", errDown, c.cfg.Addr, c.cfg.Down)
}
