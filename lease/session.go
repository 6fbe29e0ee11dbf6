package lease

import (
	"crypto/rand"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// BreakFunc receives the ids of a session's leases that a writer wants
// back. It is called from the coordinator's own goroutines and must not
// block: queue the break and return.
type BreakFunc func(ids []ID)

// Session is a set of leases of one guest. A guest's connection attaches
// to it; when the connection goes, the session waits for a reconnect for
// the grace period, then ends and its leases go with it. A guest may
// have several sessions (one per connection, and detached ones); its
// quotas hold for all of them together.
type Session struct {
	c     *Coordinator
	token Token    // its name for good (the journal's, the host's maps)
	acct  *account // its guest's

	// The secret a guest resumes the session with: a copy of the
	// token at first, a new one at each resume, so that two copies of
	// one VM (restored from one snapshot) cannot both hold the session.
	// prev, the secret before, still resumes it until the guest shows,
	// by a request on the new attachment (Confirm), that it has the new
	// one: a guest whose Welcome was lost is not cut off. prev is zero
	// once confirmed. Both in c.secrets while good; guarded by c.mu.
	secret, prev Token

	// All guarded by c.mu.
	name     string
	grants   map[ID]*grant
	sink     BreakFunc // nil while detached
	attached uint64    // counts attachments: 1 for NewSession, +1 per Resume
	grace    *time.Timer
	closed   bool
}

// NewSession starts a session of guest (the identity its quotas hold
// for, from the transport), called name in logs, whose breaks go to sink.
// This first attachment is number 1 (Detach). A guest with
// MaxSessionsPerGuest sessions loses its oldest detached one, with its
// leases; if none is detached, the answer is ErrQuota.
func (c *Coordinator) NewSession(guest, name string, sink BreakFunc) (*Session, error) {
	if sink == nil {
		return nil, fmt.Errorf("lease: a session needs a BreakFunc")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	a := c.accounts[guest]
	if a == nil {
		a = &account{guest: guest}
		c.accounts[guest] = a
	}
	if len(a.sessions) >= c.cfg.MaxSessionsPerGuest {
		var oldest *Session
		for _, s := range a.sessions {
			if s.sink == nil {
				oldest = s
				break
			}
		}
		if oldest == nil {
			c.quota.Add(1)
			return nil, fmt.Errorf("%w: guest %s has %d sessions, its limit", ErrQuota, guest, len(a.sessions))
		}
		if c.ended.Allow() {
			c.log.Warn("a guest has too many sessions: ending its oldest detached one", "guest", guest, "session", oldest.name, "leases", len(oldest.grants),
				"more_since_last_line", c.unlogged.Swap(0))
		} else {
			c.unlogged.Add(1)
		}
		c.endSession(oldest)
	}
	s := &Session{c: c, name: name, acct: a, grants: map[ID]*grant{}, sink: sink, attached: 1}
	_, _ = rand.Read(s.token[:])
	s.secret = s.token
	a.sessions = append(a.sessions, s)
	c.sessions[s.token] = s
	c.secrets[s.secret] = s
	c.journal.session(s)
	return s, nil
}

// Resume reattaches guest's session with this secret, within its grace
// period or while an old connection of it is still thought alive, to a
// new connection's sink. It returns the attachment's number, for Detach;
// the session's secret is a new one then (Secret), and the one before
// resumes it no more once the new attachment is confirmed. Another
// guest's secret, or an older one, resumes nothing.
func (c *Coordinator) Resume(secret Token, guest, name string, sink BreakFunc) (*Session, uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.secrets[secret]
	if s == nil || s.closed || sink == nil || s.acct.guest != guest {
		return nil, 0, ErrNoSession
	}
	c.rotate(s, secret)
	if s.grace != nil {
		s.grace.Stop()
		s.grace = nil
	}
	s.attached++
	s.name, s.sink = name, sink
	// Leases revoked while it was away (a takeover that found their
	// files changed) may not have reached the guest as breaks: they go
	// now, and the guest fences those files. Acks of them do nothing.
	var gone []ID
	for id, g := range s.grants {
		if g.state == revoked {
			gone = append(gone, id)
		}
	}
	if len(gone) > 0 {
		go sink(gone)
	}
	return s, s.attached, nil
}

// rotate gives s a new secret, resumed with presented: that one stays
// good until the attachment the new one is given to is confirmed, and
// any other goes. Called with c.mu held.
func (c *Coordinator) rotate(s *Session, presented Token) {
	if presented == s.secret {
		delete(c.secrets, s.prev)
		s.prev = s.secret
	} else { // the guest never had the current one
		delete(c.secrets, s.secret)
	}
	_, _ = rand.Read(s.secret[:])
	c.secrets[s.secret] = s
	c.journal.secret(s)
}

// Token returns the session's name for good; it resumes nothing (Secret).
func (s *Session) Token() Token { return s.token }

// Secret returns what the guest resumes the session with.
func (s *Session) Secret() Token {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.secret
}

// Confirm says that the guest of attachment number attachment has the
// session's current secret (it made a request after being given it): the
// one before resumes the session no more.
func (s *Session) Confirm(attachment uint64) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.closed || s.prev == (Token{}) || attachment != s.attached {
		return
	}
	delete(c.secrets, s.prev)
	s.prev = Token{}
	c.journal.secret(s)
}

// Leases returns how many leases the session holds, revoked ones included.
func (s *Session) Leases() int {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return len(s.grants)
}

// Detach is called when the connection of attachment number attachment
// ends. If the session has been resumed on another connection since, it
// does nothing. Otherwise breaks in flight to it are revoked at once (it
// cannot acknowledge them), and the rest of its leases wait for the grace
// period.
func (s *Session) Detach(attachment uint64) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || s.closed || s.sink == nil || attachment != s.attached {
		return
	}
	s.sink = nil
	for _, g := range s.grants {
		if g.state == breakingGrant {
			f := g.f
			c.revoke(g)
			if f.pending--; f.pending == 0 {
				c.finish(f)
			}
		}
	}
	c.detached(s)
}

// Close ends the session and all its leases now.
func (s *Session) Close() {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	s.c.endSession(s)
}

// endSession ends s and its leases. Called with c.mu held.
func (c *Coordinator) endSession(s *Session) {
	if s.closed {
		return
	}
	s.closed = true
	if s.grace != nil {
		s.grace.Stop()
	}
	s.sink = nil
	for _, g := range s.grants {
		c.end(g)
	}
	c.journal.sessionEnd(s)
	delete(c.sessions, s.token)
	delete(c.secrets, s.secret)
	delete(c.secrets, s.prev) // a zero prev is in no map
	a := s.acct
	for i, o := range a.sessions {
		if o == s {
			a.sessions = append(a.sessions[:i], a.sessions[i+1:]...)
			break
		}
	}
	if len(a.sessions) == 0 {
		delete(c.accounts, a.guest)
	}
}

// Acquire leases inode r.Ino for the session, if the live inode matches
// r. It fails with ErrStale, ErrBusy, ErrNotFound, ErrNotRegular or
// ErrQuota.
func (s *Session) Acquire(r Request) (ID, error) { return s.c.acquire(s, r) }

// lookup finds the session's lease id. Called with c.mu held. Another
// session's lease, a released or an invented one are all ErrUnknown.
func (s *Session) lookup(id ID) (*grant, error) {
	g := s.grants[id]
	if g == nil {
		return nil, fmt.Errorf("%w: %#x", ErrUnknown, uint64(id))
	}
	return g, nil
}

// Release ends a lease; releasing a revoked lease clears it. Releasing a
// lease that is being broken counts as acknowledging the break.
func (s *Session) Release(id ID) error {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	g, err := s.lookup(id)
	if err != nil {
		return err
	}
	s.c.end(g)
	return nil
}

// Ack acknowledges the break of a lease, which ends it. An ack for a
// lease that is not being broken is ErrNotBreaking; one that comes after
// the deadline is ErrRevoked; neither has any effect.
func (s *Session) Ack(id ID) error {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	g, err := s.lookup(id)
	if err != nil {
		return err
	}
	switch g.state {
	case active:
		return fmt.Errorf("%w: %#x", ErrNotBreaking, uint64(id))
	case revoked:
		return fmt.Errorf("%w: %#x", ErrRevoked, uint64(id))
	}
	s.c.end(g)
	return nil
}

// ReadAt reads the leased file at off. Reading goes on while a break is
// out (the writer still waits); after a revocation it is ErrRevoked.
func (s *Session) ReadAt(id ID, p []byte, off int64) (int, error) {
	c := s.c
	c.mu.Lock()
	g, err := s.lookup(id)
	if err == nil && g.state == revoked {
		err = fmt.Errorf("%w: %#x", ErrRevoked, uint64(id))
	}
	if err != nil {
		c.mu.Unlock()
		return 0, err
	}
	f := g.f
	f.users++
	c.mu.Unlock()

	n, err := preadFull(f.fd, p, off)

	c.mu.Lock()
	c.unuse(f)
	c.mu.Unlock()
	return n, err
}

// Size checks lease id as ReadAt does and returns the size of its file
// when it was leased (it cannot grow while leased: a write breaks the
// lease first).
func (s *Session) Size(id ID) (int64, error) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	g, err := s.lookup(id)
	if err == nil && g.state == revoked {
		err = fmt.Errorf("%w: %#x", ErrRevoked, uint64(id))
	}
	if err != nil {
		return 0, err
	}
	return g.f.size, nil
}

// preadFull reads until p is full or the file ends.
func preadFull(fd int, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("lease: negative offset %d", off)
	}
	n := 0
	for n < len(p) {
		m, err := unix.Pread(fd, p[n:], off+int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return n, err
		}
		if m == 0 {
			break
		}
		n += m
	}
	return n, nil
}

// HasSession reports whether the session with this token exists, attached
// or within its grace period.
func (c *Coordinator) HasSession(token Token) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sessions[token] != nil
}
