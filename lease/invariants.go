package lease

import (
	"errors"
	"fmt"

	"github.com/leasefs/leasefs/internal/lockrank"
)

// coordMu is the coordinator's lock. In builds with the invariants tag
// its Unlock first checks what the coordinator's maps and counters
// promise of each other, so that every operation that changed them is
// checked as it ends (the tests run so: make test).
type coordMu struct {
	lockrank.Mutex[lockrank.Coordinator]
	c *Coordinator
}

func (m *coordMu) Unlock() {
	var err error
	if checkInvariants && m.c != nil {
		err = m.c.invariants()
	}
	m.Mutex.Unlock() // first: what the panic unwinds may need the lock
	if err != nil {
		panic("lease: " + err.Error())
	}
}

// invariants checks the coordinator's state. Called with c.mu held.
func (c *Coordinator) invariants() error {
	if c.closed {
		return nil
	}
	var errs []error
	fail := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	leases := map[*account]int{}
	for id, g := range c.grants {
		switch {
		case g.id != id:
			fail("grant %d is filed as %d", g.id, id)
		case g.s.grants[id] != g:
			fail("grant %d is not its session's", id)
		case g.f == nil && g.state != revoked:
			fail("grant %d has no file and is not revoked", id)
		case g.f != nil && (g.idx >= len(g.f.grants) || g.f.grants[g.idx] != g):
			fail("grant %d is not where its file says", id)
		}
		leases[g.s.acct]++
	}
	for tok, s := range c.sessions {
		if s.token != tok {
			fail("session %x is filed as %x", s.token, tok)
		}
		if c.accounts[s.acct.guest] != s.acct {
			fail("session %x's guest %q has another account", tok, s.acct.guest)
		}
		for id, g := range s.grants {
			if c.grants[id] != g {
				fail("session %x's grant %d is not the coordinator's", tok, id)
			}
		}
	}
	// Files: those being opened or held (c.files) and those whose fd is
	// still open (c.byFD: a break or a close under way).
	all := map[*file]bool{}
	for ino, f := range c.files {
		if f.ino != ino {
			fail("file of inode %d is filed as %d", f.ino, ino)
		}
		if f.state == done {
			fail("inode %d is done and still filed", ino)
		}
		all[f] = true
	}
	for fd, f := range c.byFD {
		if f.fd != fd {
			fail("fd %d's file has fd %d", fd, f.fd)
		}
		all[f] = true
	}
	files := map[*account]int{}
	for f := range all {
		acks := 0
		for i, g := range f.grants {
			if g.f != f || g.idx != i || c.grants[g.id] != g {
				fail("inode %d's grant %d is not filed as it", f.ino, g.id)
			}
			if g.state == breakingGrant {
				acks++
			}
		}
		if f.state == breaking && f.pending != acks {
			fail("inode %d waits for %d acks with %d grants breaking", f.ino, f.pending, acks)
		}
		if f.owner != nil {
			files[f.owner]++
		}
	}
	for _, a := range c.accounts {
		if a.leases != leases[a] {
			fail("guest %q counts %d leases and has %d", a.guest, a.leases, leases[a])
		}
		if a.files != files[a] {
			fail("guest %q counts %d files and is charged %d", a.guest, a.files, files[a])
		}
	}
	return errors.Join(errs...)
}
