package vsockproto

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// Options tune a connection. Zero fields take the defaults.
type Options struct {
	MaxFrame    uint32 // largest payload we accept (DefaultFrame)
	MaxInFlight int    // peer requests handled at once; more get quota (MaxOutstanding)
	// WaitWhenBusy: instead of answering quota to a request beyond
	// MaxInFlight, stop reading until one in flight is answered, so
	// that a peer can make this side work no faster than it answers
	// (the host; a handler must then never wait for this connection's
	// reads).
	WaitWhenBusy     bool
	KeepAlive        time.Duration // ping after this long without sending (10 s); idle limit is 3×
	WriteTimeout     time.Duration // a write must complete in this time (10 s)
	FrameTimeout     time.Duration // a payload must arrive this soon after its header (10 s)
	HandshakeTimeout time.Duration // Hello to Welcome (10 s)
	Logger           hclog.Logger
}

func (o Options) withDefaults() Options {
	if o.MaxFrame == 0 {
		o.MaxFrame = DefaultFrame
	}
	o.MaxFrame = min(max(o.MaxFrame, MinFrame), MaxFrame)
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = MaxOutstanding
	}
	if o.KeepAlive <= 0 {
		o.KeepAlive = 10 * time.Second
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 10 * time.Second
	}
	if o.FrameTimeout <= 0 {
		o.FrameTimeout = 10 * time.Second
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = 10 * time.Second
	}
	if o.Logger == nil {
		o.Logger = hclog.NewNullLogger()
	}
	return o
}

// Handler answers a peer's request. Returning an *Error sends it; any
// other error is sent as internal. ctx ends when the connection does.
// A handler that panics gets an internal error reply; the connection
// stays up. A reply that is a Releaser is released once it has been
// written, or could not be.
type Handler func(ctx context.Context, req Message) (Message, error)

// Releaser is a reply holding something (a buffer, a budget) until it
// has been sent.
type Releaser interface {
	Message
	Release()
}

// WithRelease returns reply m, with release to run once it has been
// sent (or could not be).
func WithRelease(m Message, release func()) Releaser {
	if b, ok := m.(bulkPayload); ok {
		return releasingBulk{m, b, release}
	}
	return releasing{m, release}
}

type releasing struct {
	Message
	release func()
}

func (r releasing) Release() { r.release() }

type releasingBulk struct {
	Message
	bulk    bulkPayload
	release func()
}

func (r releasingBulk) Release()        { r.release() }
func (r releasingBulk) payload() []byte { return r.bulk.payload() }

// MaxOutstanding is how many requests a side may have waiting for
// replies on one connection; Call waits for a free slot.
const MaxOutstanding = 64

// ErrClosed is returned by calls on a connection that has ended.
var ErrClosed = errors.New("vsockproto: connection closed")

type result struct {
	m   Message
	err error
}

type call struct {
	ch   chan result
	want Type  // the reply type, besides Error
	sent int64 // unix nanos, when it was sent (about)
}

// Conn is an established connection: both sides may Call at once, and
// the peer's requests go to the Handler, each in its own goroutine.
type Conn struct {
	nc       net.Conn
	raw      syscall.RawConn // nc's socket, for Alive; nil if it has none
	opt      Options
	peerMax  uint32
	features Features
	handler  Handler
	log      hclog.Logger

	ctx    context.Context // ends when the connection does
	cancel context.CancelFunc
	done   chan struct{}

	wmu  sync.Mutex // serialises frame writes; guards wbuf
	wbuf []byte

	mu       sync.Mutex
	nextID   uint64              // guarded by mu
	pending  map[uint64]call     // our requests awaiting replies; guarded by mu
	inflight map[uint64]struct{} // peer requests being handled; guarded by mu
	err      error               // why the connection ended; guarded by mu

	slots chan struct{} // one per outstanding request of ours
	freed chan struct{} // a peer request was answered (WaitWhenBusy)

	lastSend  atomic.Int64 // unix nanos of the last frame sent
	pingWait  atomic.Int64 // how long a keepalive ping may go unanswered (0: 3 × KeepAlive)
	confirmed atomic.Int64 // unix nanos: when the latest request the peer answered was sent
	unmatched atomic.Uint64
}

func newConn(nc net.Conn, opt Options, peerMax uint32, features Features, h Handler) *Conn {
	ctx, cancel := context.WithCancel(context.Background())
	c := &Conn{
		nc: nc, opt: opt, peerMax: peerMax, features: features, handler: h,
		log: opt.Logger, ctx: ctx, cancel: cancel, done: make(chan struct{}),
		slots: make(chan struct{}, MaxOutstanding), freed: make(chan struct{}, 1), nextID: 1, pending: map[uint64]call{}, inflight: map[uint64]struct{}{},
	}
	if sc, ok := nc.(syscall.Conn); ok {
		c.raw, _ = sc.SyscallConn()
	}
	c.lastSend.Store(time.Now().UnixNano())
	c.confirmed.Store(time.Now().UnixNano())
	go c.readLoop()
	go c.keepAlive()
	return c
}

// Features returns the negotiated features.
func (c *Conn) Features() Features { return c.features }

// PeerMaxFrame is the largest payload the peer accepts.
func (c *Conn) PeerMaxFrame() uint32 { return c.peerMax }

// Done is closed when the connection has ended.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err returns why the connection ended, or nil while it is up.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Alive reports whether the connection is up as far as this machine's
// kernel knows now: it has not ended, and its socket is not hung up. The
// kernel can know of a reset or a close before the reader has run: a VM
// that resumes finds what its host did meanwhile queued for it, and a
// request it handles first must not go on as if nothing had happened.
func (c *Conn) Alive() bool {
	if c.Err() != nil {
		return false
	}
	if c.raw == nil {
		return true
	}
	up := true
	_ = c.raw.Control(func(fd uintptr) {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
		if n, err := unix.Poll(p, 0); err == nil && n > 0 && p[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0 {
			up = false
		}
	})
	return up
}

// Confirmed is when the latest of our requests that the peer answered
// was sent (for a guest's connection, at first, when the Hello was): the
// peer was up, and had this connection, at least until then. Keepalive
// pings move it on while the connection is idle.
func (c *Conn) Confirmed() time.Time { return time.Unix(0, c.confirmed.Load()) }

// Unmatched counts replies that arrived for no outstanding request.
func (c *Conn) Unmatched() uint64 { return c.unmatched.Load() }

// Close ends the connection.
func (c *Conn) Close() error {
	c.fail(ErrClosed)
	<-c.done
	return nil
}

// Call sends req and waits for its reply. An Error reply is returned as
// the error (an *Error). ctx bounds only the wait: a reply that arrives
// after it ended is dropped.
func (c *Conn) Call(ctx context.Context, req Message) (Message, error) {
	select {
	case c.slots <- struct{}{}:
		defer func() { <-c.slots }()
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-c.done:
		return nil, c.Err()
	}
	ch := make(chan result, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	id := c.nextID
	c.nextID++
	c.pending[id] = call{ch, req.Type() | ReplyBit, time.Now().UnixNano()}
	c.mu.Unlock()

	if err := c.send(id, req); err != nil {
		c.forget(id)
		return nil, err
	}
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, r.err
		}
		if e, ok := r.m.(*Error); ok {
			return nil, e
		}
		return r.m, nil
	case <-ctx.Done():
		c.forget(id)
		return nil, ctx.Err()
	}
}

func (c *Conn) forget(id uint64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// send writes one frame. A frame larger than the peer accepts is not
// sent: a request fails, a reply becomes a too_big error.
func (c *Conn) send(id uint64, m Message) error {
	err := c.write(id, m)
	if err != nil && !errors.Is(err, ErrTooBig) {
		c.fail(err)
	}
	return err
}

func (c *Conn) write(id uint64, m Message) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	// Nothing after the frame that says why the connection ends (fail
	// sets err before it takes wmu to write that frame).
	if err := c.Err(); err != nil {
		return err
	}
	// A payload that is bytes (Data, Meta) is written where it is, after
	// the header, not copied into the frame buffer.
	var bulk []byte
	if b, ok := m.(bulkPayload); ok {
		bulk = b.payload()
		c.wbuf = appendHeader(c.wbuf[:0], id, m.Type(), len(bulk))
	} else {
		c.wbuf = AppendFrame(c.wbuf[:0], id, m)
	}
	if n := len(c.wbuf) - HeaderSize + len(bulk); n > int(c.peerMax) {
		tooBig := Errorf(CodeTooBig, "%v of %d bytes exceeds the peer's limit of %d", m.Type(), n, c.peerMax)
		if !m.Type().IsReply() {
			return tooBig
		}
		c.wbuf, bulk = AppendFrame(c.wbuf[:0], id, tooBig), nil
	}
	if err := c.nc.SetWriteDeadline(time.Now().Add(c.opt.WriteTimeout)); err != nil {
		return err
	}
	bufs := net.Buffers{c.wbuf}
	if len(bulk) > 0 {
		bufs = append(bufs, bulk)
	}
	if _, err := bufs.WriteTo(c.nc); err != nil {
		return fmt.Errorf("vsockproto: write %v: %w", m.Type(), err)
	}
	c.lastSend.Store(time.Now().UnixNano())
	if cap(c.wbuf) > 64<<10 {
		c.wbuf = nil // don't keep a large reply's buffer per connection
	}
	return nil
}

// fail ends the connection with err, once.
func (c *Conn) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	pending := c.pending
	c.pending = nil
	c.mu.Unlock()

	var pe *Error
	if errors.As(err, &pe) && pe.Code == CodeProtocol {
		// Tell the peer why, best effort and briefly.
		c.wmu.Lock()
		_ = c.nc.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		_, _ = c.nc.Write(AppendFrame(nil, 0, pe))
		c.wmu.Unlock()
	}
	c.cancel()
	c.nc.Close()
	for _, pc := range pending {
		pc.ch <- result{err: err}
	}
}

func (c *Conn) readLoop() {
	defer close(c.done)
	idle := 3 * c.opt.KeepAlive
	var hb [HeaderSize]byte
	for {
		// Idle until a frame starts; from its first byte, the frame
		// timeout (a peer that sends part of a header and stops is not
		// merely idle).
		_ = c.nc.SetReadDeadline(time.Now().Add(idle))
		if _, err := io.ReadFull(c.nc, hb[:1]); err != nil {
			c.fail(readErr(err))
			return
		}
		_ = c.nc.SetReadDeadline(time.Now().Add(c.opt.FrameTimeout))
		if _, err := io.ReadFull(c.nc, hb[1:]); err != nil {
			c.fail(readErr(err))
			return
		}
		h, err := ParseHeader(&hb, c.opt.MaxFrame)
		if err != nil {
			c.fail(err)
			return
		}
		p := make([]byte, h.Length)
		if _, err := io.ReadFull(c.nc, p); err != nil {
			c.fail(readErr(err))
			return
		}
		if err := c.dispatch(h, p); err != nil {
			c.fail(err)
			return
		}
	}
}

func readErr(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("%w: %v", ErrClosed, err)
	}
	return fmt.Errorf("vsockproto: read: %w", err)
}

// dispatch routes one frame; an error ends the connection.
func (c *Conn) dispatch(h Header, p []byte) error {
	if h.Type.IsReply() {
		return c.reply(h, p)
	}
	if h.ID == 0 {
		return Errorf(CodeProtocol, "%v request with id 0", h.Type)
	}
	m, err := Decode(h.Type, p)
	var pe *Error
	if errors.As(err, &pe) && pe.Code == CodeProtocol {
		return err
	}
	c.mu.Lock()
	for c.opt.WaitWhenBusy && err == nil && len(c.inflight) >= c.opt.MaxInFlight {
		c.mu.Unlock()
		select {
		case <-c.freed:
		case <-c.ctx.Done():
			return c.ctx.Err()
		}
		c.mu.Lock()
	}
	if _, dup := c.inflight[h.ID]; dup {
		c.mu.Unlock()
		return Errorf(CodeProtocol, "request id %d is already in flight", h.ID)
	}
	busy := len(c.inflight) >= c.opt.MaxInFlight
	if err == nil && !busy {
		c.inflight[h.ID] = struct{}{}
	}
	c.mu.Unlock()
	switch {
	case err != nil: // not supported: answer, keep going
		c.sendReply(h.ID, pe)
	case busy:
		c.sendReply(h.ID, Errorf(CodeQuota, "more than %d requests in flight", c.opt.MaxInFlight))
	default:
		go c.handle(h.ID, m)
	}
	return nil
}

// sendReply sends a reply; a failed write has already ended the
// connection, so there is nothing more to do about it here.
func (c *Conn) sendReply(id uint64, m Message) { _ = c.send(id, m) }

func (c *Conn) reply(h Header, p []byte) error {
	if h.Type == TypeError && h.ID == 0 {
		m, err := Decode(h.Type, p)
		if err != nil {
			return err
		}
		return fmt.Errorf("vsockproto: peer closed the connection: %w", m.(*Error))
	}
	c.mu.Lock()
	pc, ok := c.pending[h.ID]
	delete(c.pending, h.ID)
	c.mu.Unlock()
	if !ok {
		c.unmatched.Add(1)
		c.log.Trace("dropping a reply for no outstanding request", "type", h.Type, "id", h.ID)
		return nil
	}
	for { // the peer was there, as it was when the request was sent
		old := c.confirmed.Load()
		if pc.sent <= old || c.confirmed.CompareAndSwap(old, pc.sent) {
			break
		}
	}
	m, err := Decode(h.Type, p)
	if err == nil && h.Type != TypeError && h.Type != pc.want {
		err = Errorf(CodeProtocol, "%v in reply to a request that expects %v", h.Type, pc.want)
	}
	if err != nil {
		pc.ch <- result{err: err}
		return err
	}
	pc.ch <- result{m: m}
	return nil
}

func (c *Conn) handle(id uint64, req Message) {
	var resp, orig Message
	var err error
	defer func() {
		if r, ok := orig.(Releaser); ok {
			r.Release()
		}
	}()
	func() {
		defer func() {
			if r := recover(); r != nil {
				c.log.Error("request handler panicked", "type", req.Type(), "panic", r, "stack", string(debug.Stack()))
				err = Errorf(CodeInternal, "handler panicked")
			}
		}()
		switch {
		case req.Type() == TypePing:
			resp = &Pong{}
		case c.handler == nil:
			err = Errorf(CodeNotSupported, "%v is not served here", req.Type())
		default:
			resp, err = c.handler(c.ctx, req)
			orig = resp
		}
	}()
	if err != nil {
		var e *Error
		if !errors.As(err, &e) {
			e = &Error{Code: CodeInternal, Message: err.Error()}
		}
		resp = e
	} else if resp == nil || resp.Type() != req.Type()|ReplyBit {
		c.log.Error("handler returned the wrong reply", "request", req.Type(), "reply", fmt.Sprintf("%T", resp))
		resp = Errorf(CodeInternal, "no reply")
	}
	c.mu.Lock()
	delete(c.inflight, id)
	c.mu.Unlock()
	select {
	case c.freed <- struct{}{}:
	default:
	}
	c.sendReply(id, resp)
}

// SetPingTimeout bounds how long a keepalive ping may go unanswered
// before the connection is given up (3 × KeepAlive unless set): a guest
// sets it below its lease time, so that a connection that died without a
// word (a VMM's vsock backend that never passed the close on) is found
// while its session can still be resumed.
func (c *Conn) SetPingTimeout(d time.Duration) { c.pingWait.Store(int64(d)) }

func (c *Conn) keepAlive() {
	t := time.NewTicker(c.opt.KeepAlive / 2)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
		// Ping when nothing was sent for a while, and when nothing of
		// ours was answered for a while (only replies were sent): the
		// answer is what tells that the peer is there (Confirmed).
		if time.Since(time.Unix(0, c.lastSend.Load())) < c.opt.KeepAlive && time.Since(c.Confirmed()) < c.opt.KeepAlive {
			continue
		}
		wait := 3 * c.opt.KeepAlive
		if d := time.Duration(c.pingWait.Load()); d > 0 {
			wait = d
		}
		ctx, cancel := context.WithTimeout(c.ctx, wait)
		_, err := c.Call(ctx, &Ping{})
		cancel()
		if err != nil && c.ctx.Err() == nil {
			c.fail(fmt.Errorf("vsockproto: keepalive: %w", err))
			return
		}
	}
}
