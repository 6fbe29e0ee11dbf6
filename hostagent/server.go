package hostagent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/layout"
	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
)

// ServerOptions configure a Server. Zero fields take the defaults.
type ServerOptions struct {
	Lease           lease.Config       // per export; Root and Logger are set by the server
	Conn            vsockproto.Options // per connection
	MaxConnsPerPeer int                // 8
	Logger          hclog.Logger
}

// Server serves guests the exports' generations and leases.
type Server struct {
	opt     ServerOptions
	log     hclog.Logger
	exports map[string]*served
	m       *metrics

	mu      sync.Mutex
	conns   map[*guest]struct{} // guarded by mu
	perPeer map[string]int      // guarded by mu
	closed  bool                // guarded by mu
}

// served is one export with its lease coordinator and the readers of
// its generations.
type served struct {
	exp   *Export
	coord *lease.Coordinator
	m     *metrics

	mu    sync.Mutex
	views map[uint64]*ext4ro.FS  // guarded by mu
	on    map[lease.Token]uint64 // the generation each session is on; guarded by mu
}

// guest is one connection.
type guest struct {
	sv     *served
	conn   *vsockproto.Conn
	sess   *lease.Session
	att    uint64 // which attachment of sess this connection is
	peer   vsockproto.Peer
	breaks chan []lease.ID
	max    uint32 // the guest's frame limit
}

// NewServer starts a lease coordinator for each export.
func NewServer(exports []*Export, opt ServerOptions) (*Server, error) {
	if opt.Logger == nil {
		opt.Logger = hclog.NewNullLogger()
	}
	if opt.MaxConnsPerPeer <= 0 {
		opt.MaxConnsPerPeer = 8
	}
	s := &Server{opt: opt, log: opt.Logger, exports: map[string]*served{}, conns: map[*guest]struct{}{}, perPeer: map[string]int{}}
	for _, e := range exports {
		cfg := opt.Lease
		cfg.Root = e.cfg.Mount
		cfg.Logger = opt.Logger.Named("lease").With("export", e.cfg.Name)
		c, err := lease.New(cfg)
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("export %s: %w", e.cfg.Name, err)
		}
		s.exports[e.cfg.Name] = &served{exp: e, coord: c, views: map[uint64]*ext4ro.FS{}, on: map[lease.Token]uint64{}}
	}
	s.m = newMetrics(s)
	for _, sv := range s.exports {
		sv.m = s.m
	}
	return s, nil
}

// Close ends every connection and coordinator.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	conns := s.conns
	s.conns = map[*guest]struct{}{}
	s.mu.Unlock()
	for g := range conns {
		g.conn.Close()
	}
	for _, sv := range s.exports {
		sv.coord.Close()
	}
}

// Serve accepts guests on l until ctx ends or l fails.
func (s *Server) Serve(ctx context.Context, l *vsockproto.Listener) error {
	return acceptLoop(ctx, l, func(nc net.Conn, peer vsockproto.Peer) { go s.serveConn(ctx, nc, peer) })
}

// acceptLoop hands every connection l accepts to serve until ctx ends
// (nil) or l fails.
func acceptLoop(ctx context.Context, l *vsockproto.Listener, serve func(net.Conn, vsockproto.Peer)) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		nc, peer, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		serve(nc, peer)
	}
}

func (s *Server) serveConn(ctx context.Context, nc net.Conn, peer vsockproto.Peer) {
	key := peer.String()
	s.mu.Lock()
	if s.closed || s.perPeer[key] >= s.opt.MaxConnsPerPeer {
		s.mu.Unlock()
		s.m.quota.WithLabelValues("", "connections").Inc()
		s.log.Warn("refusing a connection: too many from this peer", "peer", key)
		nc.Close()
		return
	}
	s.perPeer[key]++
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.perPeer[key]--
		s.mu.Unlock()
	}()

	g := &guest{peer: peer, breaks: make(chan []lease.ID, 1024)}
	conn, _, err := vsockproto.Server(ctx, nc, func(h *vsockproto.Hello) (*vsockproto.Welcome, vsockproto.Handler, error) {
		return s.welcome(g, h)
	}, s.opt.Conn)
	if err != nil {
		s.log.Debug("handshake failed", "peer", key, "error", err)
		if g.sess != nil { // the Welcome was not sent
			g.sess.Detach(g.att)
		}
		return
	}
	g.conn = conn
	s.mu.Lock()
	s.conns[g] = struct{}{}
	s.mu.Unlock()
	s.log.Info("guest connected", "peer", key, "export", g.sv.exp.cfg.Name)

	go g.forwardBreaks(s.opt.Lease.AckTimeout)
	<-conn.Done()
	s.log.Info("guest disconnected", "peer", key, "why", conn.Err())
	s.mu.Lock()
	delete(s.conns, g)
	s.mu.Unlock()
	g.sess.Detach(g.att)
	// g.breaks is not closed: a break computed before the Detach may
	// still be delivered to it; forwardBreaks ends with the connection.
}

var zeroToken vsockproto.Token

// welcome answers a Hello: the export, a new or resumed session.
func (s *Server) welcome(g *guest, h *vsockproto.Hello) (*vsockproto.Welcome, vsockproto.Handler, error) {
	sv := s.exports[h.Export]
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
	resumed := false
	var err error
	if h.Token != zeroToken && h.Features.Has(vsockproto.FeatureResume) {
		if g.sess, g.att, err = sv.coord.Resume(lease.Token(h.Token), g.peer.String(), sink); err == nil {
			resumed = true
		}
	}
	if !resumed {
		if g.sess, err = sv.coord.NewSession(g.peer.String(), sink); err != nil {
			return nil, nil, err
		}
		g.att = 1
	}
	g.sv, g.max = sv, h.MaxFrame
	// The guest may stay on the generation it names if it is kept.
	kept := h.Generation != 0 && sv.exp.Generation(h.Generation) != nil
	w := &vsockproto.Welcome{
		Resumed: resumed, Kept: kept, Token: vsockproto.Token(g.sess.Token()), Generation: cur.Number,
		BlockSize: uint32(cur.BlockSize),
		Features:  vsockproto.FeatureReadData | vsockproto.FeatureLayout | vsockproto.FeatureResume | vsockproto.FeaturePublishPolicy,
	}
	on := cur.Number
	if kept {
		on = h.Generation
	}
	if ap := sv.exp.cfg.AutoPublish; ap != nil {
		w.PublishQuiet, w.PublishMax = ap.Quiet, ap.Max
	}
	sv.mu.Lock()
	sv.on[g.sess.Token()] = on
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
			g.sv.m.breakAck.WithLabelValues(g.sv.exp.cfg.Name).Observe(since(start))
			for _, id := range ids {
				_ = g.sess.Ack(id)
			}
		}()
	}
}

// handle answers a guest's request.
func (g *guest) handle(ctx context.Context, req vsockproto.Message) (vsockproto.Message, error) {
	switch m := req.(type) {
	case *vsockproto.ReadMeta:
		return g.readMeta(m)
	case *vsockproto.Open:
		return g.open(m)
	case *vsockproto.Read:
		if m.Length > g.max {
			return nil, vsockproto.Errorf(vsockproto.CodeInvalid, "read of %d bytes exceeds your frame limit", m.Length)
		}
		p := make([]byte, m.Length)
		n, err := g.sess.ReadAt(lease.ID(m.Lease), p, int64(m.Offset))
		if err != nil {
			return nil, protoErr(err)
		}
		g.sv.m.served.WithLabelValues(g.sv.exp.cfg.Name, "data").Add(float64(n))
		return &vsockproto.Data{Data: p[:n]}, nil
	case *vsockproto.Release:
		if err := g.sess.Release(lease.ID(m.Lease)); err != nil {
			return nil, protoErr(err)
		}
		return &vsockproto.Released{}, nil
	}
	return nil, vsockproto.Errorf(vsockproto.CodeNotSupported, "%v is not served by the host", req.Type())
}

func (g *guest) generation(n uint64) (*Generation, error) {
	gen := g.sv.exp.Generation(n)
	if gen == nil {
		return nil, vsockproto.Errorf(vsockproto.CodeGone, "generation %d is not kept", n)
	}
	return gen, nil
}

func (g *guest) readMeta(m *vsockproto.ReadMeta) (vsockproto.Message, error) {
	gen, err := g.generation(m.Generation)
	if err != nil {
		return nil, err
	}
	bs := uint64(gen.BlockSize)
	total := uint64(0)
	for _, r := range m.Blocks {
		total += uint64(r.Count) * bs
		if total > uint64(g.max) {
			return nil, vsockproto.Errorf(vsockproto.CodeTooBig, "%d bytes of blocks exceed your frame limit", total)
		}
		for b := r.Start; b < r.Start+uint64(r.Count); b++ {
			if !gen.Has(b) {
				return nil, vsockproto.Errorf(vsockproto.CodeInvalid, "block %d is not metadata of generation %d", b, m.Generation)
			}
		}
	}
	out := make([]byte, 0, total)
	for _, r := range m.Blocks {
		p := make([]byte, uint64(r.Count)*bs)
		if _, err := gen.ReadAt(p, int64(r.Start*bs)); err != nil {
			return nil, err
		}
		out = append(out, p...)
	}
	g.sv.m.served.WithLabelValues(g.sv.exp.cfg.Name, "meta").Add(float64(len(out)))
	return &vsockproto.Meta{Data: out}, nil
}

// open checks the guest's description of the inode against the host's own
// copy of the generation, and leases the inode as that generation has it.
func (g *guest) open(m *vsockproto.Open) (vsockproto.Message, error) {
	gen, err := g.generation(m.Generation)
	if err != nil {
		return nil, err
	}
	view, err := g.sv.view(gen)
	if err != nil {
		return nil, err
	}
	in, err := view.Inode(m.Inode)
	switch {
	case errors.Is(err, ext4ro.ErrNotExist), errors.Is(err, ext4ro.ErrInvalid):
		return nil, vsockproto.Errorf(vsockproto.CodeNotFound, "inode %d is not in use in generation %d", m.Inode, m.Generation)
	case err != nil:
		return nil, vsockproto.Errorf(vsockproto.CodeInternal, "inode %d: %v", m.Inode, err)
	case !in.IsRegular():
		return nil, vsockproto.Errorf(vsockproto.CodeNotRegular, "inode %d", m.Inode)
	case in.Generation != m.IGen || in.Size != m.Size || in.Ctime.Sec != m.Ctime.Sec || in.Ctime.Nsec != m.Ctime.Nsec:
		return nil, vsockproto.Errorf(vsockproto.CodeInvalid, "inode %d is not like that in generation %d", m.Inode, m.Generation)
	}
	layout, err := LayoutHash(view, in)
	if err != nil {
		return nil, vsockproto.Errorf(vsockproto.CodeInternal, "inode %d: %v", m.Inode, err)
	}
	if m.Layout != 0 && m.Layout != layout {
		return nil, vsockproto.Errorf(vsockproto.CodeInvalid, "inode %d's layout is not that of generation %d", m.Inode, m.Generation)
	}
	id, err := g.sess.Acquire(lease.Request{Ino: m.Inode, IGen: in.Generation, Size: in.Size,
		Ctime: unix.Timespec{Sec: in.Ctime.Sec, Nsec: int64(in.Ctime.Nsec)}, Layout: layout})
	if err != nil {
		if errors.Is(err, lease.ErrQuota) {
			g.sv.m.quota.WithLabelValues(g.sv.exp.cfg.Name, "leases").Inc()
		}
		return nil, protoErr(err)
	}
	return &vsockproto.Leased{Lease: uint64(id)}, nil
}

// LayoutHash is the protocol's layout hash of in's blocks.
func LayoutHash(f *ext4ro.FS, in *ext4ro.Inode) (uint64, error) {
	m, err := f.Map(in)
	if err != nil {
		return 0, err
	}
	return layout.Hash(m), nil
}

// view returns the host's reader of generation gen.
func (sv *served) view(gen *Generation) (*ext4ro.FS, error) {
	sv.mu.Lock()
	defer sv.mu.Unlock()
	if f := sv.views[gen.Number]; f != nil {
		return f, nil
	}
	f, err := ext4ro.Open(gen, &ext4ro.Options{CacheBytes: 4 << 20, ReadAhead: 1})
	if err != nil {
		return nil, vsockproto.Errorf(vsockproto.CodeInternal, "generation %d: %v", gen.Number, err)
	}
	sv.views[gen.Number] = f
	return f, nil
}

// protoErr maps a lease error to its protocol error: the one place the
// host turns errors into codes.
func protoErr(err error) error {
	code := vsockproto.CodeInternal
	for _, lc := range leaseCodes {
		if errors.Is(err, lc.err) {
			code = lc.code
			break
		}
	}
	return &vsockproto.Error{Code: code, Message: err.Error()}
}

var leaseCodes = []struct {
	err  error
	code vsockproto.Code
}{
	{lease.ErrStale, vsockproto.CodeStale},
	{lease.ErrBusy, vsockproto.CodeBusy},
	{lease.ErrNotFound, vsockproto.CodeNotFound},
	{lease.ErrNotRegular, vsockproto.CodeNotRegular},
	{lease.ErrQuota, vsockproto.CodeQuota},
	{lease.ErrUnknown, vsockproto.CodeBadLease},
	{lease.ErrRevoked, vsockproto.CodeRevoked},
	{lease.ErrClosed, vsockproto.CodeGone},
}

// Publish publishes a generation of the named export and announces it to
// its guests. It does not wait for their acks.
func (s *Server) Publish(name string) (*Generation, error) {
	sv := s.exports[name]
	if sv == nil {
		return nil, fmt.Errorf("no export %q", name)
	}
	gen, err := sv.exp.Publish()
	if err != nil {
		s.m.failed.WithLabelValues(name).Inc()
		return nil, err
	}
	s.m.published.WithLabelValues(name).Inc()
	s.m.freeze.WithLabelValues(name).Observe(gen.Frozen.Seconds())
	ann := &vsockproto.Announce{Generation: gen.Number, Blocks: gen.Changed, Inodes: gen.ChangedInodes}
	if gen.All {
		ann = &vsockproto.Announce{Generation: gen.Number, Flags: vsockproto.AnnounceAll}
	}
	s.mu.Lock()
	var gs []*guest
	for g := range s.conns {
		if g.sv == sv {
			gs = append(gs, g)
		}
	}
	s.mu.Unlock()
	for _, g := range gs {
		go g.announce(ann, gen.Captured, s.opt.Conn.KeepAlive)
	}
	s.retain(sv)
	return gen, nil
}

// announce tells one guest of a generation and notes which it is on.
func (g *guest) announce(ann *vsockproto.Announce, published time.Time, keepAlive time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), max(keepAlive, 10*time.Second)*3)
	defer cancel()
	reply, err := g.conn.Call(ctx, ann)
	if errors.Is(err, vsockproto.ErrTooBig) {
		reply, err = g.conn.Call(ctx, &vsockproto.Announce{Generation: ann.Generation, Flags: vsockproto.AnnounceAll})
	}
	if err != nil {
		return
	}
	g.sv.m.announceAck.WithLabelValues(g.sv.exp.cfg.Name).Observe(since(published))
	on := reply.(*vsockproto.AnnounceAck).Generation
	if on > ann.Generation {
		return // a guest that lies about its generation keeps what it was on
	}
	g.sv.mu.Lock()
	g.sv.on[g.sess.Token()] = on
	g.sv.mu.Unlock()
	// Retention runs at the next publish.
}

// retain drops the generations older than every one a session is on.
// Those between are kept too: a guest that follows at intervals may move
// to any generation announced to it before it can say so.
func (s *Server) retain(sv *served) {
	oldest := sv.exp.Current().Number
	sv.mu.Lock()
	for tok, n := range sv.on {
		if !sv.coord.HasSession(tok) {
			delete(sv.on, tok)
			continue
		}
		oldest = min(oldest, n)
	}
	for n := range sv.views {
		if n < oldest {
			delete(sv.views, n)
		}
	}
	sv.mu.Unlock()
	sv.exp.DropBefore(oldest)
}
