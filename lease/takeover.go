package lease

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/layout"
)

// takeOver adopts what the journal of the previous run says it held, of
// the files handed over (Config.Held), then starts the new journal. A
// held file is adopted only if it is still the file recorded, unchanged
// (size, mtime, the layout of its blocks), and its lease can be taken
// again for this process; otherwise its leases are revoked (fenced: the
// guest's reads of it are ESTALE, never other bytes) and it is let go.
// Sessions come back detached, for their guests to resume within the
// grace period.
func (c *Coordinator) takeOver() error {
	held := c.cfg.Held
	var l *ledger
	if c.cfg.Journal != "" {
		var err error
		if l, err = loadJournal(c.cfg.Journal); err != nil {
			c.log.Error("the lease journal of the last run is unreadable; nothing is taken over", "journal", c.cfg.Journal, "error", err)
			l = nil
		}
		if c.journal, err = openJournal(c.cfg.Journal, c.log); err != nil {
			c.letGo(held)
			return err
		}
	}
	if !c.cfg.Successor {
		l = nil
	}
	if len(held) > 0 && l == nil {
		c.log.Warn("held files were handed over without a lease journal; letting them go", "files", len(held))
	}
	if l == nil {
		c.letGo(held)
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	files := map[*heldRec]*file{}
	for ino, fd := range held {
		rec := l.files[ino]
		if rec == nil {
			c.letGo(map[uint32]int{ino: fd})
			continue
		}
		f, err := c.adopt(rec, fd)
		if err != nil {
			c.log.Warn("a held file changed while the agent was away; its leases are revoked", "inode", ino, "path", c.pathOfFD(fd), "why", err)
			c.letGo(map[uint32]int{ino: fd})
			continue
		}
		files[rec] = f
	}
	// The caps hold for what is taken over too: a guest's newest
	// sessions up to its session cap, and its leases up to its lease
	// cap; the rest end (a journal is the last run's word, and that
	// run's guests' doing).
	keep := map[*sessionRec]bool{}
	perGuest := map[string]int{}
	for _, sr := range slices.Backward(l.sessions) {
		if !sr.ended && perGuest[sr.guest] < c.cfg.MaxSessionsPerGuest {
			perGuest[sr.guest]++
			keep[sr] = true
		}
	}
	nRevoked, overCap := 0, 0
	for _, sr := range l.sessions {
		if sr.ended {
			continue
		}
		if !keep[sr] {
			overCap++
			continue
		}
		a := c.accounts[sr.guest]
		if a == nil {
			a = &account{guest: sr.guest}
			c.accounts[sr.guest] = a
		}
		s := &Session{c: c, token: sr.token, name: sr.name, acct: a, grants: map[ID]*grant{},
			secret: sr.secret, prev: sr.prev}
		a.sessions = append(a.sessions, s)
		c.sessions[s.token] = s
		c.secrets[s.secret] = s
		if s.prev != (Token{}) {
			c.secrets[s.prev] = s
		}
		for _, gr := range sr.grants {
			if gr.dropped {
				continue
			}
			if a.leases >= c.cfg.MaxPerGuest {
				overCap++
				continue
			}
			g := &grant{id: gr.id, s: s, since: gr.since, gen: gr.gen, state: revoked}
			if f := files[gr.file]; f != nil {
				g.f, g.idx, g.state = f, len(f.grants), active
				f.grants = append(f.grants, g)
				if f.owner == nil {
					f.owner = a
					a.files++
				}
			} else {
				nRevoked++
				c.revoked.Add(1)
			}
			c.grants[g.id] = g
			s.grants[g.id] = g
			a.leases++
		}
		c.detached(s)
	}
	kept := 0
	for _, f := range files {
		if len(f.grants) == 0 {
			c.finish(f)
			continue
		}
		kept++
	}
	c.compact(true)
	if overCap > 0 {
		c.log.Warn("the last run's lease journal has sessions or leases over a guest's caps; those are not taken over", "ended", overCap)
	}
	if kept+nRevoked+len(c.sessions) > 0 {
		c.log.Info("took over the last run's leases", "files", kept, "sessions", len(c.sessions), "leases", len(c.grants)-nRevoked, "revoked", nRevoked)
	}
	return nil
}

// adopt takes over one handed-over file: its lease re-armed for this
// process's signal thread, checked against what the journal recorded.
// Called with c.mu held: the fd's breaks wait for it, and find the file.
func (c *Coordinator) adopt(rec *heldRec, fd int) (*file, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Dev != c.dev || st.Ino != uint64(rec.ino) {
		return nil, errors.New("the descriptor is not that file")
	}
	if igen, err := iGeneration(fd); err != nil || igen != rec.igen {
		return nil, errors.New("another incarnation of the inode")
	}
	unix.CloseOnExec(fd)
	if !c.fds.Take() {
		return nil, fmt.Errorf("%w: no descriptor left in the budget", ErrQuota)
	}
	c.held.Add(1)
	f := &file{ino: rec.ino, igen: rec.igen, fd: fd, wd: -1, state: held, size: rec.size, mtime: rec.mtime, ready: make(chan struct{}), recorded: true}
	close(f.ready)
	f.layout.Store(rec.layout)
	fail := func(err error) (*file, error) {
		f.recorded = false
		if f.wd >= 0 {
			c.watch.remove(f.wd)
			delete(c.byWD, f.wd)
		}
		delete(c.byFD, fd)
		c.held.Add(-1)
		c.fds.Give()
		return nil, err
	}
	c.byFD[fd] = f
	// Our lease may have been broken and given up by the kernel while
	// nobody listened: taking it again fails while a writer has the file
	// open, and the checks below catch a write that has come and gone.
	if err := takeLease(fd, c.cfg.Signal, c.sig.tid); err != nil {
		return fail(fmt.Errorf("taking the lease again: %w", err))
	}
	wd, err := c.watch.add(fd)
	if err != nil {
		return fail(err)
	}
	f.wd = wd
	c.byWD[wd] = f
	if !leaseHeld(fd) {
		return fail(errors.New("a writer wants it"))
	}
	if err := unix.Fstat(fd, &st); err != nil {
		return fail(err)
	}
	if st.Size != rec.size || st.Mtim != rec.mtime {
		return fail(fmt.Errorf("size %d mtime %d.%09d, recorded %d %d.%09d", st.Size, st.Mtim.Sec, st.Mtim.Nsec, rec.size, rec.mtime.Sec, rec.mtime.Nsec))
	}
	if rec.layout != 0 {
		runs, err := layout.Fiemap(fd, c.bsize)
		if err != nil {
			return fail(err)
		}
		if layout.Hash(runs) != rec.layout {
			return fail(errors.New("its blocks have moved"))
		}
	}
	c.files[rec.ino] = f
	return f, nil
}

// letGo gives up handed-over files not taken over: their leases dropped,
// their descriptors closed and no longer kept.
func (c *Coordinator) letGo(held map[uint32]int) { LetGo(held, c.cfg.Keeper) }

// LetGo gives up held files handed over that no coordinator takes over
// (their export is gone): their leases dropped, so no writer waits for
// them, their descriptors closed and no longer kept by k (if not nil).
func LetGo(held map[uint32]int, k Keeper) {
	for ino, fd := range held {
		dropLease(fd)
		if k != nil {
			k.Forget(ino)
		}
		unix.Close(fd)
	}
}

// detached starts s's grace period, as Detach does. Called with c.mu
// held.
func (c *Coordinator) detached(s *Session) {
	s.grace = time.AfterFunc(c.cfg.Grace, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if s.sink == nil && !c.closed {
			c.endSession(s)
		}
	})
}
