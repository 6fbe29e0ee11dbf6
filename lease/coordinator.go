package lease

import (
	"cmp"
	"crypto/rand"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"

	"github.com/leasefs/leasefs/layout"
)

// Config configures a Coordinator. Zero fields take the defaults.
type Config struct {
	// Root is a directory on the exported filesystem (its mount point);
	// inodes are opened by handle relative to it.
	Root string
	// AckTimeout is how long guests have to acknowledge a break before
	// their leases are revoked (5 s). It must be well below the kernel's
	// /proc/sys/fs/lease-break-time.
	AckTimeout time.Duration
	// Grace is how long a detached session keeps its leases (30 s).
	Grace time.Duration
	// MaxPerGuest caps the leases of one guest: all its sessions
	// together, detached ones included (65,536).
	MaxPerGuest int
	// MaxSessionsPerGuest caps a guest's sessions (16): one more ends
	// its oldest detached session, with its leases.
	MaxSessionsPerGuest int
	// FDs is the budget held files come from, shared with other
	// coordinators and with the guests' connections. Nil: a budget of
	// its own, of MaxFiles if set, else the fd limit less FDReserve
	// (256).
	FDs       *FDs
	MaxFiles  int
	FDReserve int
	// Signal is the real-time signal breaks arrive on (SIGRTMIN+8 = 42).
	Signal int
	Logger hclog.Logger
	// Journal, if set, is the file where the held files, sessions and
	// leases are recorded as they change (journal.go), for a successor
	// to take over. Held are a predecessor's held files, by inode: their
	// descriptors, kept across its exit (an upgrade's exec, or systemd's
	// fd store). New adopts those the journal it left at Journal names,
	// and that no writer has changed meanwhile; the rest are let go, and
	// their leases revoked.
	Journal string
	Held    map[uint32]int
	// Successor says this run follows one that handed its files over
	// (Held, possibly none): its sessions are taken over. Otherwise the
	// journal is started afresh and Held let go.
	Successor bool
	// Keeper, if set, is given each held file's descriptor to keep
	// across a restart of the process, and told when it is let go.
	Keeper Keeper
}

// Keeper keeps held files' descriptors outside the process (systemd's
// file-descriptor store). Its calls are made with the coordinator's lock
// held: they must not block.
type Keeper interface {
	Keep(ino uint32, fd int)
	Forget(ino uint32)
}

// Stats are the coordinator's counters and gauges.
type Stats struct {
	Files, Leases, Sessions int    // now
	Guests                  int    // guests with a session, now
	Breaking                int    // files whose break is out, now
	Breaks                  uint64 // breaks started by a writer
	Modified                uint64 // breaks started by a modification seen after the fact
	Rescans                 uint64 // full F_GETLEASE rescans after a signal queue overflow
	Revoked                 uint64 // leases revoked at the ack deadline
	QuotaRefusals           uint64
	SpuriousSignals         uint64 // signals for fds that were not breaking
}

// Coordinator holds one fd and one kernel read lease per leased inode,
// shared by every session that leases it. See the package documentation.
type Coordinator struct {
	cfg     Config
	log     hclog.Logger
	mountFD int
	dev     uint64
	bsize   uint64
	sig     *signalThread
	watch   *watcher
	closer  *closer
	// ended: lines about sessions ended for the per-guest cap, limited
	// (a guest churning sessions would write one each); unlogged counts
	// those left out.
	ended    *rate.Limiter
	unlogged atomic.Int64

	mu       coordMu
	files    map[uint32]*file    // by inode; guarded by mu
	byFD     map[int]*file       // open fds only; guarded by mu
	byWD     map[int]*file       // guarded by mu
	grants   map[ID]*grant       // every session's; guarded by mu
	sessions map[Token]*Session  // by token; guarded by mu
	secrets  map[Token]*Session  // by the secrets that resume them; guarded by mu
	accounts map[string]*account // by guest; guarded by mu
	rng      *mrand.ChaCha8      // lease ids; guarded by mu
	journal  *journal            // guarded by mu
	closed   bool

	fds  *FDs         // the budget held files come from
	held atomic.Int64 // fds this coordinator holds, including those queued for closing

	breaks, modified, rescans, revoked, quota, spurious atomic.Uint64
}

// ID identifies a lease on the session that holds it. IDs are random.
type ID uint64

// Token identifies a session; it is a secret capability for resuming it.
type Token [16]byte

type fileState uint8

const (
	opening  fileState = iota // being opened and leased by one Acquire
	held                      // kernel lease held, grants active
	breaking                  // a break is out to the holders
	done                      // lease dropped, fd closed or closing
)

// file is one leased inode.
type file struct {
	ino, igen uint32
	fd, wd    int
	state     fileState
	ready     chan struct{} // closed when opening ends
	leased    bool          // F_SETLEASE succeeded (opening ends soon after)
	early     bool          // a break signal arrived while opening
	size      int64         // at lease time, to notice changes after an
	mtime     unix.Timespec // inotify overflow
	grants    []*grant      // active and breaking
	pending   int           // breaking grants not yet acknowledged
	timer     *time.Timer   // ack deadline
	breakAt   time.Time     // when the break in progress began
	users     int           // ReadAt calls using fd now
	owner     *account      // the guest its fd is charged to: one that holds it
	layout    atomic.Uint64 // layout.Hash of its blocks once read; they cannot move while leased
	recorded  bool          // in the journal and the Keeper
}

// account is what one guest (all its sessions) holds, for its quotas.
type account struct {
	guest    string
	leases   int        // grants of all its sessions
	files    int        // files charged to it
	sessions []*Session // oldest first
}

type grantState uint8

const (
	active grantState = iota
	breakingGrant
	revoked
)

type grant struct {
	id    ID
	s     *Session
	f     *file // nil once revoked
	idx   int   // in f.grants
	state grantState
	since time.Time
	gen   uint64 // Request.Generation
}

// New starts a coordinator for the filesystem mounted at cfg.Root.
func New(cfg Config) (*Coordinator, error) {
	if cfg.AckTimeout <= 0 {
		cfg.AckTimeout = 5 * time.Second
	}
	if cfg.Grace <= 0 {
		cfg.Grace = 30 * time.Second
	}
	if cfg.MaxPerGuest <= 0 {
		cfg.MaxPerGuest = 65536
	}
	if cfg.MaxSessionsPerGuest <= 0 {
		cfg.MaxSessionsPerGuest = 16
	}
	if cfg.FDReserve <= 0 {
		cfg.FDReserve = 256
	}
	if cfg.Signal == 0 {
		cfg.Signal = 42
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Signal < 34 || cfg.Signal > 64 {
		return nil, fmt.Errorf("lease: signal %d is not a real-time signal", cfg.Signal)
	}
	if bt, err := breakTime(); err == nil && cfg.AckTimeout > bt/2 {
		return nil, fmt.Errorf("lease: ack timeout %v must be at most half the kernel's lease-break-time (%v)", cfg.AckTimeout, bt)
	}
	switch {
	case cfg.FDs != nil:
	case cfg.MaxFiles > 0:
		cfg.FDs = NewFDsLimit(cfg.MaxFiles)
	default:
		var err error
		if cfg.FDs, err = NewFDs(cfg.FDReserve); err != nil {
			return nil, err
		}
	}
	// Not O_PATH: open_by_handle_at does not accept one as its mount fd.
	mfd, err := unix.Open(cfg.Root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: cfg.Root, Err: err}
	}
	var st unix.Stat_t
	var sfs unix.Statfs_t
	if err := unix.Fstat(mfd, &st); err != nil {
		unix.Close(mfd)
		return nil, err
	}
	if err := unix.Fstatfs(mfd, &sfs); err != nil {
		unix.Close(mfd)
		return nil, err
	}
	var seed [32]byte
	_, _ = rand.Read(seed[:])
	c := &Coordinator{ended: rate.NewLimiter(rate.Every(10*time.Second), 5),
		cfg: cfg, log: cfg.Logger, mountFD: mfd, dev: st.Dev, bsize: uint64(sfs.Bsize),
		files: map[uint32]*file{}, byFD: map[int]*file{}, byWD: map[int]*file{},
		grants: map[ID]*grant{}, sessions: map[Token]*Session{}, secrets: map[Token]*Session{}, accounts: map[string]*account{},
		rng: mrand.NewChaCha8(seed), fds: cfg.FDs,
	}
	c.mu.c = c
	c.closer = newCloser(func() { c.held.Add(-1); c.fds.Give() })
	if c.watch, err = newWatcher(c.onModify, c.onWatchOverflow); err != nil {
		c.closer.stop()
		unix.Close(mfd)
		return nil, err
	}
	if c.sig, err = startSignalThread(cfg.Signal, c.onSignal, c.onOverflow); err != nil {
		c.watch.close()
		c.closer.stop()
		unix.Close(mfd)
		return nil, err
	}
	if err := c.takeOver(); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// breakTime reads /proc/sys/fs/lease-break-time.
func breakTime() (time.Duration, error) {
	b, err := os.ReadFile("/proc/sys/fs/lease-break-time")
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	return time.Duration(n) * time.Second, err
}

// Grace is how long a detached session keeps its leases.
func (c *Coordinator) Grace() time.Duration { return c.cfg.Grace }

// Close ends every session and lease and releases every fd.
func (c *Coordinator) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	for _, s := range c.sessions {
		c.endSession(s)
	}
	for _, f := range c.files {
		if f.state != opening {
			c.finish(f)
		}
	}
	if c.journal != nil {
		c.journal.close()
		os.Remove(c.cfg.Journal)
	}
	c.mu.Unlock()
	c.sig.close()
	c.closer.stop()
	c.watch.close()
	return unix.Close(c.mountFD)
}

// Leave stops the coordinator without giving anything back: the kernel
// leases stay on the held files, which the Keeper keeps, and the journal
// stays as it is, for the next run to take over. Guests' sessions wait
// for it within their grace period.
func (c *Coordinator) Leave() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.journal.close()
	for _, f := range c.files {
		if f.timer != nil {
			f.timer.Stop()
		}
		if f.fd >= 0 && f.users == 0 {
			c.closer.queue(f.fd) // the lease goes with the last descriptor of the file, kept elsewhere
		}
	}
	for _, s := range c.sessions {
		if s.grace != nil {
			s.grace.Stop()
		}
	}
	c.mu.Unlock()
	c.sig.close()
	c.closer.stop()
	c.watch.close()
	unix.Close(c.mountFD)
}

// Handover stops every change (until release, if the handover fails)
// and returns the held files' descriptors by inode, for a successor that
// takes them over with the journal (Config.Held). A file whose break is
// out is not handed over: its leases are revoked in the successor.
func (c *Coordinator) Handover() (fds map[uint32]int, release func()) {
	c.mu.Lock()
	fds = map[uint32]int{}
	for ino, f := range c.files {
		if f.state == held && f.recorded {
			fds[ino] = f.fd
		}
	}
	return fds, c.mu.Unlock
}

// Stats returns the counters.
func (c *Coordinator) Stats() Stats {
	c.mu.Lock()
	s := Stats{Files: len(c.files), Leases: len(c.grants), Sessions: len(c.sessions), Guests: len(c.accounts)}
	for _, f := range c.files {
		if f.state == breaking {
			s.Breaking++
		}
	}
	c.mu.Unlock()
	s.Breaks, s.Modified, s.Rescans = c.breaks.Load(), c.modified.Load(), c.rescans.Load()
	s.Revoked, s.QuotaRefusals, s.SpuriousSignals = c.revoked.Load(), c.quota.Load(), c.spurious.Load()
	return s
}

// Request asks for a lease on an inode as a generation describes it.
type Request struct {
	Ino  uint32
	IGen uint32 // i_generation; 0 matches any
	// Expected state. Ctime catches any change to the inode; Layout (if
	// not 0) is the layout.Hash of its blocks.
	Size   uint64
	Ctime  unix.Timespec
	Layout uint64
	// Links and Mtime, if Links is set, allow one change: the file
	// unlinked since (renamed over, deleted; its inode kept by whoever
	// holds it) with fewer links and a new ctime, its bytes untouched
	// (the same size, mtime and layout).
	Links uint32
	Mtime unix.Timespec
	// Generation is the caller's tag for what the lease was taken at
	// (the host's generation number), reported by Leases.
	Generation uint64
}

func (c *Coordinator) newID() ID {
	for {
		id := ID(c.rng.Uint64())
		if _, taken := c.grants[id]; id != 0 && !taken {
			return id
		}
	}
}

// acquire is Session.Acquire.
func (c *Coordinator) acquire(s *Session, r Request) (ID, error) {
	for {
		c.mu.Lock()
		if c.closed || s.closed {
			c.mu.Unlock()
			return 0, ErrClosed
		}
		if s.acct.leases >= c.cfg.MaxPerGuest {
			c.mu.Unlock()
			c.quota.Add(1)
			return 0, fmt.Errorf("%w: this guest holds %d leases, its limit", ErrQuota, c.cfg.MaxPerGuest)
		}
		f := c.files[r.Ino]
		if f == nil {
			return c.open(s, r) // unlocks
		}
		switch f.state {
		case opening:
			ready := f.ready
			c.mu.Unlock()
			<-ready
			continue
		case breaking:
			c.mu.Unlock()
			return 0, fmt.Errorf("%w: inode %d is being given back to a writer", ErrBusy, r.Ino)
		}
		if r.IGen != 0 && r.IGen != f.igen {
			c.mu.Unlock()
			return 0, fmt.Errorf("%w: inode %d is generation %d, not %d", ErrNotFound, r.Ino, f.igen, r.IGen)
		}
		// Held by another session: only the state check remains.
		f.users++
		c.mu.Unlock()
		_, err := c.check(f, r)
		c.mu.Lock()
		c.unuse(f)
		switch {
		case err == nil && f.state == done:
			// Its last holder released it meanwhile: open it afresh.
			c.mu.Unlock()
			continue
		case err == nil && f.state != held:
			err = fmt.Errorf("%w: inode %d is being given back to a writer", ErrBusy, r.Ino)
		}
		if err != nil {
			c.mu.Unlock()
			return 0, err
		}
		id := c.grant(s, f, r.Generation)
		c.mu.Unlock()
		return id, nil
	}
}

// open opens and leases a file not yet held. Called with c.mu held; it
// unlocks.
func (c *Coordinator) open(s *Session, r Request) (ID, error) {
	if err := c.admit(s.acct); err != nil {
		c.mu.Unlock()
		c.quota.Add(1)
		return 0, err
	}
	// Reserved now, so concurrent opens respect the limits.
	f := &file{ino: r.Ino, fd: -1, wd: -1, state: opening, ready: make(chan struct{}), owner: s.acct}
	s.acct.files++
	c.held.Add(1)
	c.files[r.Ino] = f
	c.mu.Unlock()

	err := c.lease(f, r)

	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil && f.early {
		err = fmt.Errorf("%w: a writer opened inode %d while it was being leased", ErrBusy, r.Ino)
	}
	if err == nil && (c.closed || s.closed) {
		err = ErrClosed
	}
	if err != nil {
		close(f.ready)
		c.finish(f)
		return 0, err
	}
	f.state = held
	close(f.ready)
	c.record(f)
	return c.grant(s, f, r.Generation), nil
}

// record writes a newly held file to the journal and gives it to the
// Keeper. Called with c.mu held.
func (c *Coordinator) record(f *file) {
	f.recorded = true
	if c.cfg.Keeper != nil {
		c.cfg.Keeper.Keep(f.ino, f.fd)
	}
	c.journal.file(f)
}

// admit takes a descriptor from the budget for one more file of a's, if
// a is within its share: half of what the other guests leave. So a guest
// that grabs what it can still leaves half of what remains for the next,
// and a guest holding nothing gets a file whenever any is left. Called
// with c.mu held.
func (c *Coordinator) admit(a *account) error {
	limit, used := c.fds.Limit(), c.fds.Used()
	share := (limit - (used - int64(a.files))) / 2
	if a.files > 0 && int64(a.files) >= share {
		return fmt.Errorf("%w: this guest holds %d of the host's %d files, its share of what the other guests leave", ErrQuota, a.files, limit)
	}
	if !c.fds.Take() {
		return fmt.Errorf("%w: the host holds all the %d files it may", ErrQuota, limit)
	}
	return nil
}

// recharge moves f's charge from its owner, if the owner no longer
// holds it, to a guest that does. Called with c.mu held.
func (c *Coordinator) recharge(f *file) {
	if f.owner == nil {
		return
	}
	for _, g := range f.grants {
		if g.s.acct == f.owner {
			return
		}
	}
	f.owner.files--
	f.owner = nil
	if len(f.grants) > 0 {
		f.owner = f.grants[0].s.acct
		f.owner.files++
	}
}

// lease does the syscalls of open, outside c.mu. Every step that can
// fail leaves f in a state finish can undo.
func (c *Coordinator) lease(f *file, r Request) error {
	fd, st, err := openInode(c.mountFD, r.Ino, r.IGen)
	if err != nil {
		return err
	}
	if st.Dev != c.dev {
		unix.Close(fd)
		return fmt.Errorf("%w: inode %d is on another filesystem", ErrNotFound, r.Ino)
	}
	igen, err := iGeneration(fd)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("inode %d: reading i_generation: %w", r.Ino, err)
	}
	c.mu.Lock()
	f.fd, f.igen = fd, igen
	c.byFD[fd] = f // before the lease, so that no break signal goes unmatched
	c.mu.Unlock()

	if err := takeLease(fd, c.cfg.Signal, c.sig.tid); err != nil {
		switch {
		case errors.Is(err, unix.EAGAIN):
			return fmt.Errorf("%w: inode %d", ErrBusy, r.Ino)
		case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
			return fmt.Errorf("lease: F_SETLEASE on inode %d: %w (needs CAP_LEASE or file ownership)", r.Ino, err)
		}
		return fmt.Errorf("lease: F_SETLEASE on inode %d: %w", r.Ino, err)
	}
	c.mu.Lock()
	f.leased = true
	c.mu.Unlock()
	wd, err := c.watch.add(fd)
	if err != nil {
		return fmt.Errorf("lease: watching inode %d: %w", r.Ino, err)
	}
	c.mu.Lock()
	f.wd = wd
	c.byWD[wd] = f
	c.mu.Unlock()
	// A break that began between F_SETLEASE and F_SETOWN_EX was signalled
	// to the process, where nobody listens; the lease state shows it.
	if !leaseHeld(fd) {
		return fmt.Errorf("%w: a writer opened inode %d while it was being leased", ErrBusy, r.Ino)
	}
	now, err := c.check(f, r)
	f.size, f.mtime = now.Size, now.Mtim
	return err
}

// check compares the live inode behind f.fd with the request, and
// returns what fstat said of it. Its layout is read (FIEMAP) once: the
// blocks of a leased file do not move without a write, which breaks the
// lease first.
func (c *Coordinator) check(f *file, r Request) (st unix.Stat_t, err error) {
	if err := unix.Fstat(f.fd, &st); err != nil {
		return st, err
	}
	unlinked := uint32(st.Nlink) < r.Links && st.Mtim == r.Mtime
	if uint64(st.Size) != r.Size || st.Ctim != r.Ctime && !unlinked {
		return st, fmt.Errorf("%w: inode %d has size %d ctime %d.%09d, the generation says %d, %d.%09d",
			ErrStale, r.Ino, st.Size, st.Ctim.Sec, st.Ctim.Nsec, r.Size, r.Ctime.Sec, r.Ctime.Nsec)
	}
	if r.Layout == 0 {
		return st, nil
	}
	hash := f.layout.Load()
	if hash == 0 {
		runs, err := layout.Fiemap(f.fd, c.bsize)
		if errors.Is(err, layout.ErrNotAllocated) {
			return st, fmt.Errorf("%w: inode %d has data not yet allocated", ErrStale, r.Ino)
		}
		if err != nil {
			return st, fmt.Errorf("inode %d: %w", r.Ino, err)
		}
		hash = layout.Hash(runs)
		f.layout.Store(hash)
	}
	if hash != r.Layout {
		return st, fmt.Errorf("%w: inode %d's blocks have moved", ErrStale, r.Ino)
	}
	return st, nil
}

// grant adds a lease of s on f. Called with c.mu held.
func (c *Coordinator) grant(s *Session, f *file, gen uint64) ID {
	g := &grant{id: c.newID(), s: s, f: f, idx: len(f.grants), since: time.Now(), gen: gen}
	f.grants = append(f.grants, g)
	c.grants[g.id] = g
	s.grants[g.id] = g
	s.acct.leases++
	c.journal.grant(g)
	c.compact(false)
	return g.id
}

// unlink removes g from its file. Called with c.mu held.
func (c *Coordinator) unlink(g *grant) {
	f := g.f
	last := f.grants[len(f.grants)-1]
	f.grants[g.idx] = last
	last.idx = g.idx
	f.grants[len(f.grants)-1] = nil
	f.grants = f.grants[:len(f.grants)-1]
	g.f = nil
	c.recharge(f)
}

// forget removes g entirely. Called with c.mu held.
func (c *Coordinator) forget(g *grant) {
	c.journal.drop(g)
	delete(c.grants, g.id)
	delete(g.s.grants, g.id)
	g.s.acct.leases--
}

// end ends the lease g, acknowledged or released. Called with c.mu held.
func (c *Coordinator) end(g *grant) {
	c.forget(g)
	defer c.journal.flush()
	if g.f == nil {
		return // revoked
	}
	f := g.f
	wasBreaking := g.state == breakingGrant
	c.unlink(g)
	switch {
	case f.state == breaking && wasBreaking:
		f.pending--
		if f.pending == 0 {
			c.finish(f)
		}
	case f.state == held && len(f.grants) == 0:
		c.finish(f)
	}
}

// finish drops f's kernel lease and closes its fd (once no ReadAt uses
// it). Called with c.mu held. It never blocks: the close, which can wait
// on a frozen filesystem when it frees an unlinked inode, is queued.
func (c *Coordinator) finish(f *file) {
	if f.timer != nil {
		f.timer.Stop()
	}
	for _, g := range f.grants { // a file can only finish with grants on Close
		g.f = nil
	}
	f.grants = nil
	if f.owner != nil {
		f.owner.files--
		f.owner = nil
	}
	f.state = done
	if f.recorded {
		f.recorded = false
		c.journal.fileDone(f)
		if c.cfg.Keeper != nil {
			c.cfg.Keeper.Forget(f.ino)
		}
	}
	if c.files[f.ino] == f {
		delete(c.files, f.ino)
	}
	if f.wd >= 0 {
		// Now, not with the close: a new watch of the same inode would
		// get the same wd while this one exists, and lose it later.
		delete(c.byWD, f.wd)
		c.watch.remove(f.wd)
		f.wd = -1
	}
	if f.fd < 0 {
		c.held.Add(-1) // the reservation of a failed open
		c.fds.Give()
		return
	}
	delete(c.byFD, f.fd)
	dropLease(f.fd)
	if f.users == 0 {
		c.closer.queue(f.fd)
	}
}

// unuse ends one ReadAt's use of f.fd. Called with c.mu held.
func (c *Coordinator) unuse(f *file) {
	f.users--
	if f.users == 0 && f.state == done && f.fd >= 0 {
		c.closer.queue(f.fd)
	}
}

// onSignal handles a lease-break signal for fd, on the signal thread.
func (c *Coordinator) onSignal(fd int) {
	c.mu.Lock()
	f := c.byFD[fd]
	var out []delivery
	switch {
	case f == nil:
		c.spurious.Add(1)
	case f.state == opening:
		// Before F_SETLEASE the signal is a late one for an earlier file
		// that had this fd number; after it, the lease state tells.
		if f.leased && !leaseHeld(fd) {
			f.early = true
		} else {
			c.spurious.Add(1)
		}
	case f.state != held:
	case leaseHeld(fd):
		// Not breaking: a late signal for an fd number since reused.
		c.spurious.Add(1)
	default:
		c.breaks.Add(1)
		c.log.Debug("lease break", "inode", f.ino, "fd", fd, "holders", len(f.grants))
		out = c.startBreak(f)
	}
	c.mu.Unlock()
	deliver(out)
}

// onOverflow rescans every held fd after the signal queue overflowed.
func (c *Coordinator) onOverflow() {
	c.rescans.Add(1)
	c.mu.Lock()
	var out []delivery
	for fd, f := range c.byFD {
		switch {
		case f.state == opening:
			if f.leased && !leaseHeld(fd) {
				f.early = true
			}
		case f.state == held && !leaseHeld(fd):
			c.breaks.Add(1)
			c.log.Debug("lease break found by a rescan", "inode", f.ino, "fd", fd)
			out = append(out, c.startBreak(f)...)
		}
	}
	c.mu.Unlock()
	deliver(out)
}

// onModify handles a modification of a leased inode: the open(O_TRUNC)
// hole, where the kernel truncates without breaking read leases.
func (c *Coordinator) onModify(wd int) {
	c.mu.Lock()
	var out []delivery
	if f := c.byWD[wd]; f != nil && f.state == held {
		c.modified.Add(1)
		c.log.Warn("a leased file was modified without a lease break (open with O_TRUNC?)", "inode", f.ino)
		out = c.startBreak(f)
	}
	c.mu.Unlock()
	deliver(out)
}

// onWatchOverflow: inotify lost events, so compare every held file with
// what it was when leased.
func (c *Coordinator) onWatchOverflow() {
	c.mu.Lock()
	var out []delivery
	for fd, f := range c.byFD {
		var st unix.Stat_t
		if f.state == held && (unix.Fstat(fd, &st) != nil || st.Size != f.size || st.Mtim != f.mtime) {
			c.log.Warn("a leased file changed while inotify lost events", "inode", f.ino)
			c.modified.Add(1)
			out = append(out, c.startBreak(f)...)
		}
	}
	c.mu.Unlock()
	deliver(out)
}

// delivery is a break to send to one session, outside c.mu.
type delivery struct {
	sink BreakFunc
	ids  []ID
}

func deliver(out []delivery) {
	for _, d := range out {
		d.sink(d.ids)
	}
}

// startBreak sends f's holders a break and arms the ack deadline. Called
// with c.mu held; the deliveries are made after it is released.
func (c *Coordinator) startBreak(f *file) []delivery {
	f.state = breaking
	bySession := map[*Session][]ID{}
	for i := 0; i < len(f.grants); {
		g := f.grants[i]
		if g.s.sink == nil { // detached: nobody can acknowledge
			c.revoke(g)
			continue
		}
		g.state = breakingGrant
		bySession[g.s] = append(bySession[g.s], g.id)
		i++
	}
	f.pending = len(f.grants)
	if f.pending == 0 {
		c.finish(f)
		return nil
	}
	f.timer = time.AfterFunc(c.cfg.AckTimeout, func() { c.deadline(f) })
	f.breakAt = time.Now()
	out := make([]delivery, 0, len(bySession))
	for s, ids := range bySession {
		out = append(out, delivery{s.sink, ids})
	}
	return out
}

// revoke fences g: its file is gone, and every use answers ErrRevoked
// until the guest releases it. Called with c.mu held.
func (c *Coordinator) revoke(g *grant) {
	c.unlink(g)
	g.state = revoked
	c.revoked.Add(1)
	c.journal.revoke(g)
}

// deadline revokes what was not acknowledged in time and lets the
// writer go.
func (c *Coordinator) deadline(f *file) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.state != breaking {
		return
	}
	for len(f.grants) > 0 {
		g := f.grants[0]
		c.log.Warn("lease break not acknowledged in time; revoking", "guest", g.s.name, "path", c.pathOf(f), "inode", f.ino,
			"waited", time.Since(f.breakAt).Round(time.Millisecond))
		c.revoke(g)
	}
	c.finish(f)
}

// Lease describes one lease, for an operator (Leases).
type Lease struct {
	Guest      string    // the session's name: its peer
	Path       string    // the file's path now, as the kernel names its fd ("" if unknown)
	Inode      uint32    //
	Generation uint64    // Request.Generation
	Since      time.Time // when it was granted
	// BreakSince is when the file's pending break began; zero when no
	// break waits for this lease's acknowledgement.
	BreakSince time.Time
}

// Leases lists every lease held, by guest, then path.
func (c *Coordinator) Leases() []Lease {
	// The leases under the lock; the paths (a readlink each) outside it,
	// each file's fd held open meanwhile as a read holds it (users).
	c.mu.Lock()
	out := make([]Lease, 0, len(c.grants))
	of := make([]*file, 0, len(c.grants))
	paths := map[*file]string{}
	for _, g := range c.grants {
		if g.f == nil {
			continue // revoked, not yet released
		}
		if _, ok := paths[g.f]; !ok && g.f.fd >= 0 && g.f.state != done {
			paths[g.f] = ""
			g.f.users++
		}
		l := Lease{Guest: g.s.name, Inode: g.f.ino, Generation: g.gen, Since: g.since}
		if g.state == breakingGrant {
			l.BreakSince = g.f.breakAt
		}
		out, of = append(out, l), append(of, g.f)
	}
	c.mu.Unlock()
	for f := range paths {
		paths[f] = c.pathOfFD(f.fd)
	}
	c.mu.Lock()
	for f := range paths {
		c.unuse(f)
	}
	c.mu.Unlock()
	for i := range out {
		out[i].Path = paths[of[i]]
	}
	slices.SortFunc(out, func(a, b Lease) int {
		return cmp.Or(cmp.Compare(a.Guest, b.Guest), cmp.Compare(a.Path, b.Path), cmp.Compare(a.Inode, b.Inode))
	})
	return out
}

// pathOf is the path of f's held fd below the export, as the kernel
// names it (d_path: no disk I/O, so it may be called with c.mu held);
// "" when f has no fd. A file deleted since ends in " (deleted)".
func (c *Coordinator) pathOf(f *file) string {
	if f.fd < 0 || f.state == done { // its fd may be closed, and the number reused
		return ""
	}
	return c.pathOfFD(f.fd)
}

// pathOfFD is pathOf for an fd its caller keeps open.
func (c *Coordinator) pathOfFD(fd int) string {
	p, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return ""
	}
	if rel, err := filepath.Rel(c.cfg.Root, p); err == nil && !strings.HasPrefix(rel, "..") {
		return "/" + rel
	}
	return p
}
