package hostagent

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"

	"github.com/leasefs/leasefs/internal/lockrank"
	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
)

// ServerOptions configure a Server. Zero fields take the defaults.
type ServerOptions struct {
	Lease  lease.Config       // per export; Root, Logger and FDs are set by the server
	Conn   vsockproto.Options // per connection
	Limits Limits
	// FDs is the budget of descriptors that guests' files and
	// connections come from; nil: the fd limit less lease.Config's
	// FDReserve (256, or a quarter of a limit under 1,024).
	FDs    *lease.FDs
	Logger hclog.Logger
	// Version is the agent's version, for leasefs_build_info.
	Version string
	// Listeners, if set, adds and removes guest listen addresses on
	// request through the control socket (op "listen").
	Listeners Listeners
	// Reload, if set, reads the settings again and applies them (op
	// "reload"), answering what changed; with dry it only says what
	// would, of the file config if not "".
	Reload func(dry bool, config string) ([]string, error)
	// Upgrade, if set, starts an in-place upgrade (op "upgrade"): it
	// checks what it can, answers, and execs the new binary after.
	Upgrade func() (exec func(), err error)
}

// Listeners are the guest addresses an agent serves, changed at run time.
type Listeners interface {
	// AddListener starts serving guests on addr (vsockproto.ParseAddr).
	AddListener(addr string) error
	// RemoveListener stops serving on addr; its guests' connections go on.
	RemoveListener(addr string) error
	// ListenAddrs lists the addresses served.
	ListenAddrs() []string
}

// Server serves guests the exports' generations and leases.
type Server struct {
	opt     ServerOptions
	log     hclog.Logger
	exports atomic.Pointer[map[string]*served] // replaced whole, under mu
	m       *metrics
	quotas  *quotas
	fds     *lease.FDs
	spare   spareFD
	gate    ctlGate       // of the control socket
	warn    *rate.Limiter // of log lines about refused guests
	glog    *guestLog     // log lines about each guest, limited per guest
	started time.Time

	mu     lockrank.Mutex[lockrank.Server]
	conns  map[*guest]struct{}   // guarded by mu
	closed bool                  // guarded by mu
	lost   map[string]LostExport // exports whose filesystem went away (LoseExport); guarded by mu
}

// served is one export with its lease coordinator.
type served struct {
	exp   *Export
	coord *lease.Coordinator
	m     *metrics

	mu   lockrank.Mutex[lockrank.Served]
	on   map[lease.Token]uint64 // the generation each session is on; guarded by mu
	pins map[lease.Token]bool   // the sessions that pinned theirs (vsockproto.FeaturePin); guarded by mu
}

// guest is one connection.
type guest struct {
	s      *Server
	sv     *served
	conn   *vsockproto.Conn
	sess   *lease.Session
	att    uint64 // which attachment of sess this connection is
	peer   vsockproto.Peer
	quota  *guestQuota
	breaks chan []lease.ID
	max    uint32 // the guest's frame limit
	// confirmed: the guest made a request on this connection, so it has
	// the session's secret the Welcome gave (lease.Session.Confirm).
	confirmed atomic.Bool
	labels    bool // the guest takes generations' labels (FeatureLabel)
	kept      bool // the guest may ask which generations are kept (FeatureKept); set with labels, before any request
	digests   bool // the guest may ask for blocks' digests (FeatureDigests); set with labels

	// One announcement in flight at a time (publish.go), and the newest
	// of those that came meanwhile: a guest that does not answer costs
	// one waiting call, however often the host publishes.
	annMu   sync.Mutex
	annBusy bool      // guarded by annMu
	annNext *announce // guarded by annMu
}

// NewServer starts a lease coordinator for each export.
func NewServer(exports []*Export, opt ServerOptions) (*Server, error) {
	if opt.Logger == nil {
		opt.Logger = hclog.NewNullLogger()
	}
	opt.Limits = opt.Limits.withDefaults()
	if err := opt.Limits.Validate(); err != nil {
		return nil, err
	}
	// Guests' requests are small; a receive limit of the smallest frame
	// bounds what one can make us buffer.
	if opt.Conn.MaxFrame == 0 {
		opt.Conn.MaxFrame = vsockproto.MinFrame
	}
	// A guest's requests beyond those in flight wait in its socket: it
	// makes the agent work no faster than the agent answers it.
	opt.Conn.WaitWhenBusy = true
	if opt.FDs == nil {
		var err error
		if opt.FDs, err = lease.NewFDs(fdReserve(opt.Lease.FDReserve)); err != nil {
			return nil, err
		}
	}
	s := &Server{opt: opt, log: opt.Logger, conns: map[*guest]struct{}{}, fds: opt.FDs, started: time.Now(),
		warn: rate.NewLimiter(rate.Every(time.Second), 10), glog: newGuestLog(opt.Logger)}
	s.exports.Store(&map[string]*served{})
	s.m = newMetrics(s)
	s.quotas = newQuotas(opt.Limits, s.m)
	s.spare.open()
	s.gate.init()
	for _, e := range exports {
		if err := s.AddExport(e); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

// export is the served export name, or nil.
func (s *Server) export(name string) *served { return (*s.exports.Load())[name] }

// all is every served export, by name; the map is not to be changed.
func (s *Server) all() map[string]*served { return *s.exports.Load() }

// AddExport serves e (opened by the caller, who closes it after
// RemoveExport or Close) to guests from now on; it has no generation
// until its first Publish.
func (s *Server) AddExport(e *Export) error {
	cfg := e.leaseConfig(s.opt.Lease)
	cfg.FDs = s.opt.FDs
	cfg.Logger = s.opt.Logger.Named("lease").With("export", e.Name())
	if s.export(e.Name()) != nil {
		return fmt.Errorf("export %s is named twice", e.Name())
	}
	// The coordinator (which may take over the lease journal) and the
	// keeper's budget are made without Server.mu, a leaf.
	c, err := lease.New(cfg)
	if err != nil {
		return fmt.Errorf("export %s: %w", e.Name(), err)
	}
	e.SetFDs(s.fds)
	on, pins := e.handedOn()
	s.mu.Lock()
	old := s.all()
	if old[e.Name()] != nil {
		s.mu.Unlock()
		c.Close()
		return fmt.Errorf("export %s is named twice", e.Name())
	}
	delete(s.lost, e.Name())
	next := make(map[string]*served, len(old)+1)
	maps.Copy(next, old)
	next[e.Name()] = &served{exp: e, coord: c, m: s.m, on: on, pins: pins}
	s.m.addExport(e.Name())
	s.exports.Store(&next)
	s.mu.Unlock()
	return nil
}

// RemoveExport stops serving export name: its guests' connections end
// (a reconnect finds no such export) and every lease of it is released.
// Its auto-publishing must have stopped; the caller then closes it.
func (s *Server) RemoveExport(name string) error {
	s.mu.Lock()
	_, wasLost := s.lost[name]
	delete(s.lost, name)
	s.mu.Unlock()
	if wasLost && s.export(name) == nil {
		return nil
	}
	return s.removeExport(name, fmt.Sprintf("export %s was removed from the host agent's settings", name))
}

// LoseExport stops serving an export whose filesystem went away (see
// Export.Mounted): its guests are told why and their leases revoked, as
// when it is removed, and status and metrics show it as lost until it is
// added again.
func (s *Server) LoseExport(name string, why error) error {
	sv := s.export(name)
	if sv == nil {
		return fmt.Errorf("no export %q", name)
	}
	s.mu.Lock()
	if s.lost == nil {
		s.lost = map[string]LostExport{}
	}
	s.lost[name] = LostExport{Name: name, Mount: sv.exp.Mount(), Since: time.Now(), Reason: why.Error()}
	s.mu.Unlock()
	return s.removeExport(name, fmt.Sprintf("export %s is no longer served: %v", name, why))
}

func (s *Server) removeExport(name, why string) error {
	s.mu.Lock()
	old := s.all()
	sv := old[name]
	if sv == nil {
		s.mu.Unlock()
		return fmt.Errorf("no export %q", name)
	}
	next := maps.Clone(old)
	delete(next, name)
	s.exports.Store(&next)
	s.mu.Unlock()
	gs := s.guests(func(g *guest) bool { return g.sv == sv })
	revokeAll(gs, why)
	for _, g := range gs {
		g.conn.Close()
	}
	sv.coord.Close()
	s.m.removeExport(name)
	return nil
}

// fdReserve is the descriptors left out of the guests' budget for the
// agent itself: listeners, the control socket, logs, the watchdog's
// pipe, inotify.
func fdReserve(want int) int {
	if want > 0 {
		return want
	}
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err == nil && rl.Cur < 1024 {
		return int(rl.Cur / 4)
	}
	return 256
}

// Close ends every connection and coordinator, revoking every lease
// first: guests answer that they read nothing more of the files before
// they are let go of.
func (s *Server) Close() { s.stop("the host agent stopped", (*lease.Coordinator).Close) }

// Leave is Close that gives no lease back: the held files stay leased,
// kept outside the process (ExportConfig.Keeper), and the lease journals
// stay, for the next run to take over (a restart with systemd's fd
// store).
func (s *Server) Leave() { s.stop("", func(c *lease.Coordinator) error { c.Leave(); return nil }) }

// stop ends every connection, after revoking its leases if why says why
// they are let go of, then every coordinator.
func (s *Server) stop(why string, end func(*lease.Coordinator) error) {
	s.mu.Lock()
	s.closed = true
	conns := s.conns
	s.conns = map[*guest]struct{}{}
	s.mu.Unlock()
	if why != "" {
		revokeAll(slices.Collect(maps.Keys(conns)), why)
	}
	for g := range conns {
		g.conn.Close()
	}
	for _, sv := range s.all() {
		_ = end(sv.coord)
	}
	s.spare.close()
}

// Serve accepts guests on l until ctx ends or l fails.
func (s *Server) Serve(ctx context.Context, l *vsockproto.Listener) error {
	return s.acceptLoop(ctx, l, false, func(nc net.Conn, peer vsockproto.Peer) { go s.serveConn(ctx, nc, peer) })
}

// acceptLoop hands every connection l accepts to serve until ctx ends
// (nil) or l fails. Running out of descriptors (or memory) does not end
// it: it backs off and tries again, and meanwhile uses the spare
// descriptor to take the connection waiting and — a guest's — close it
// at once, so the guest learns at once rather than at its timeout; or —
// trusted (the control socket) — serve it.
func (s *Server) acceptLoop(ctx context.Context, l *vsockproto.Listener, trusted bool, serve func(net.Conn, vsockproto.Peer)) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	backoff := 5 * time.Millisecond
	for {
		if trusted && !s.gate.wait(ctx) {
			return nil
		}
		nc, peer, err := l.Accept()
		switch {
		case err == nil:
			backoff = 5 * time.Millisecond
			serve(nc, peer)
			continue
		case ctx.Err() != nil:
			return nil
		case !exhausted(err):
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		if s.warn.Allow() {
			s.log.Error("out of descriptors or memory accepting a connection; backing off", "listener", l.Addr().String(), "error", err)
		}
		if nc, peer, ok := s.spare.acceptWith(l); ok {
			if trusted {
				serve(nc, peer)
			} else {
				nc.Close()
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Second)
	}
}

// exhausted reports whether an accept failed for want of descriptors or
// memory, which passes.
func exhausted(err error) bool {
	for _, e := range []error{unix.EMFILE, unix.ENFILE, unix.ENOBUFS, unix.ENOMEM} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// spareFD is a descriptor kept open to be given up when the process has
// none left, so that one more connection can still be accepted.
type spareFD struct {
	mu sync.Mutex
	fd int // guarded by mu
}

func (sp *spareFD) open() {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	sp.fd, _ = unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
}

func (sp *spareFD) close() {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.fd >= 0 {
		unix.Close(sp.fd)
		sp.fd = -1
	}
}

// acceptWith gives up the spare descriptor, accepts the connection
// waiting on l, if one comes within a moment, and takes the spare again.
func (sp *spareFD) acceptWith(l *vsockproto.Listener) (net.Conn, vsockproto.Peer, bool) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.fd < 0 {
		sp.fd, _ = unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		return nil, vsockproto.Peer{}, false
	}
	unix.Close(sp.fd)
	_ = l.SetDeadline(time.Now().Add(10 * time.Millisecond))
	nc, peer, err := l.Accept()
	_ = l.SetDeadline(time.Time{})
	sp.fd, _ = unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	return nc, peer, err == nil
}

func (s *Server) serveConn(ctx context.Context, nc net.Conn, peer vsockproto.Peer) {
	who := peer.Guest()
	refuse := func(limit, why string) {
		s.m.quota.WithLabelValues("", limit).Inc()
		if s.warn.Allow() {
			s.glog.Warn(who, "refusing a connection: "+why, "peer", peer.String())
		}
		nc.Close()
	}
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		nc.Close()
		return
	}
	if !s.fds.Take() {
		refuse("fds", "the descriptors for guests are all in use")
		return
	}
	defer s.fds.Give()
	gq, ok := s.quotas.connect(who)
	if !ok {
		refuse("connections", "too many from this guest")
		return
	}
	defer s.quotas.disconnect(gq)

	g := &guest{s: s, peer: peer, quota: gq, breaks: make(chan []lease.ID, 1024)}
	conn, _, err := vsockproto.Server(ctx, nc, func(h *vsockproto.Hello) (*vsockproto.Welcome, vsockproto.Handler, error) {
		return s.welcome(g, h)
	}, s.opt.Conn)
	if err != nil {
		s.log.Debug("handshake failed", "peer", peer.String(), "error", err)
		if g.sess != nil { // the Welcome was not sent
			g.sess.Detach(g.att)
		}
		return
	}
	g.conn = conn
	s.mu.Lock()
	s.conns[g] = struct{}{}
	// A session lives on one connection: one it was resumed from ends
	// (it may be a copy of the same VM, restored from one snapshot).
	var before []*guest
	for o := range s.conns {
		if g.att == 1 {
			break // a new session: on no other connection
		}
		if o != g && o.sess == g.sess {
			before = append(before, o)
		}
	}
	s.mu.Unlock()
	for _, o := range before {
		s.glog.Info(who, "session resumed on another connection: closing the one before", "peer", peer.String())
		o.conn.Close()
	}
	s.glog.Info(who, "guest connected", "peer", peer.String(), "export", g.sv.exp.Name())

	go g.forwardBreaks(s.opt.Lease.AckTimeout)
	<-conn.Done()
	s.glog.Info(who, "guest disconnected", "peer", peer.String(), "why", conn.Err())
	s.mu.Lock()
	delete(s.conns, g)
	s.mu.Unlock()
	g.sess.Detach(g.att)
	// g.breaks is not closed: a break computed before the Detach may
	// still be delivered to it; forwardBreaks ends with the connection.
}

// revokeWait bounds how long the host waits for guests to answer a
// Revoke before it lets go of their files all the same.
const revokeWait = 3 * time.Second

// revokeAll tells each guest of gs that every lease of its session ends,
// and why, and waits (revokeWait at most) for their answers, all at
// once. A guest that answered reads nothing more of the files; one that
// did not (or an older guest, which is not asked) stops reading them
// from the device when it sees its connection end.
func revokeAll(gs []*guest, why string) {
	var wg sync.WaitGroup
	for _, g := range gs {
		if !g.conn.Features().Has(vsockproto.FeatureLeaseTime) {
			continue
		}
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), revokeWait)
			defer cancel()
			if _, err := g.conn.Call(ctx, &vsockproto.Revoke{Why: why}); err != nil {
				g.s.log.Warn("a guest did not answer the revocation of its leases", "peer", g.peer.String(), "error", err)
			}
		})
	}
	wg.Wait()
}

var zeroToken vsockproto.Token

// welcome answers a Hello: the export, a new or resumed session.
func (s *Server) welcome(g *guest, h *vsockproto.Hello) (*vsockproto.Welcome, vsockproto.Handler, error) {
	sv := s.export(h.Export)
	if sv == nil {
		return nil, nil, vsockproto.Errorf(vsockproto.CodeNoExport, "no export %q", h.Export)
	}
	cur := sv.exp.Current()
	if cur == nil {
		return nil, nil, vsockproto.Errorf(vsockproto.CodeGone, "export %q has no generation yet", h.Export)
	}
	sink := func(ids []lease.ID) {
		select {
		case g.breaks <- ids:
		default: // the guest is far behind; the deadline revokes these
			s.log.Warn("break queue full; the guest will be revoked", "peer", g.peer.String())
		}
	}
	who := g.peer.Guest()
	resumed := false
	var err error
	if h.Token != zeroToken && h.Features.Has(vsockproto.FeatureResume) {
		if g.sess, g.att, err = sv.coord.Resume(lease.Token(h.Token), who, g.peer.String(), sink); err == nil {
			resumed = true
		}
	}
	if !resumed {
		if g.sess, err = sv.coord.NewSession(who, g.peer.String(), sink); err != nil {
			if errors.Is(err, lease.ErrQuota) {
				s.m.quota.WithLabelValues(sv.exp.Name(), "sessions").Inc()
			}
			return nil, nil, protoErr(err)
		}
		g.att = 1
	}
	g.sv, g.max, g.labels, g.kept = sv, h.MaxFrame, h.Features.Has(vsockproto.FeatureLabel), h.Features.Has(vsockproto.FeatureKept)
	g.digests = h.Features.Has(vsockproto.FeatureDigests)
	// The guest may stay on the generation it names if it is kept; one
	// that pins it stays there, one that pins a label on the newest
	// generation kept with it.
	want := h.Generation
	pin := h.Features.Has(vsockproto.FeaturePin)
	if pin && want == 0 && h.Label != "" {
		want = sv.exp.labeled(h.Label)
	}
	kept := want != 0 && sv.exp.Has(want)
	w := &vsockproto.Welcome{
		Resumed: resumed, Kept: kept, Token: vsockproto.Token(g.sess.Secret()), Generation: cur.Number,
		BlockSize: uint32(cur.BlockSize),
		Features: vsockproto.FeatureReadData | vsockproto.FeatureLayout | vsockproto.FeatureResume | vsockproto.FeaturePublishPolicy |
			vsockproto.FeatureLeaseTime | vsockproto.FeatureKept | vsockproto.FeaturePin | vsockproto.FeatureDigests,
		LeaseTime: sv.coord.Grace(),
	}
	if pin && kept {
		w.Pinned = want
	}
	if g.labels {
		w.Features |= vsockproto.FeatureLabel
		w.Label = cur.Label
	}
	on := cur.Number
	if kept {
		on = want
	}
	if ap := sv.exp.AutoPublish(); ap != nil {
		w.PublishQuiet, w.PublishMax = ap.Quiet, ap.Max
	}
	sv.mu.Lock()
	if prev, ok := sv.on[g.sess.Token()]; ok && on < prev {
		// A session never goes back (as in its acknowledgements): a
		// resumed one that names an older generation would pin it. It
		// moves to the current one.
		w.Kept, w.Pinned, on = false, 0, cur.Number
	}
	sv.on[g.sess.Token()] = on
	if w.Pinned != 0 {
		sv.pins[g.sess.Token()] = true
	} else {
		delete(sv.pins, g.sess.Token())
	}
	sv.mu.Unlock()
	return w, g.handle, nil
}

// forwardBreaks sends the session's breaks to the guest, each in its own
// call, and acknowledges the leases when the guest answers.
func (g *guest) forwardBreaks(deadline time.Duration) {
	if deadline <= 0 {
		deadline = 5 * time.Second
	}
	for {
		var ids []lease.ID
		select {
		case ids = <-g.breaks:
		case <-g.conn.Done():
			return // the deadline revokes what is left
		}
		go func() {
			start := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), deadline)
			defer cancel()
			msg := &vsockproto.Break{Leases: make([]uint64, len(ids))}
			for i, id := range ids {
				msg.Leases[i] = uint64(id)
			}
			if _, err := g.conn.Call(ctx, msg); err != nil {
				return // not acknowledged: the coordinator's deadline revokes
			}
			g.sv.m.breakAck.WithLabelValues(g.sv.exp.Name()).Observe(since(start))
			for _, id := range ids {
				_ = g.sess.Ack(id)
			}
		}()
	}
}
