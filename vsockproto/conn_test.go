package vsockproto

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// server listens on a fresh Unix socket and runs the host side of the
// handshake on every connection; the connections arrive on the channel.
func server(t *testing.T, accept Accept, opt Options) (Addr, <-chan *Conn) {
	t.Helper()
	a, err := ParseAddr("unix:" + filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	l, err := Listen(a, ListenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	conns := make(chan *Conn, 16)
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			nc, _, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				c, _, err := Server(context.Background(), nc, accept, opt)
				if err == nil {
					t.Cleanup(func() { c.Close() })
					conns <- c
				}
			})
		}
	})
	t.Cleanup(func() { l.Close(); wg.Wait() })
	return a, conns
}

func welcome(h Handler) Accept {
	return func(*Hello) (*Welcome, Handler, error) {
		return &Welcome{BlockSize: 4096, Features: FeatureReadData | FeatureLayout}, h, nil
	}
}

func client(t *testing.T, a Addr, h Handler, opt Options) *Conn {
	t.Helper()
	c, _, err := DialHello(context.Background(), a, Hello{Export: "x", Features: FeatureReadData}, h, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// raw dials a and completes the handshake by hand, for tests that then
// misbehave.
func raw(t *testing.T, a Addr) net.Conn {
	t.Helper()
	nc, err := Dial(context.Background(), a)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	writeFrame(t, nc, 1, &Hello{Version: 1, MaxFrame: DefaultFrame, Export: "x"})
	if h, _ := readFrame(t, nc); h.Type != TypeWelcome {
		t.Fatalf("got %v, want Welcome", h.Type)
	}
	return nc
}

func writeFrame(t *testing.T, nc net.Conn, id uint64, m Message) {
	t.Helper()
	if _, err := nc.Write(AppendFrame(nil, id, m)); err != nil {
		t.Fatal(err)
	}
}

func readFrame(t *testing.T, nc net.Conn) (Header, Message) {
	t.Helper()
	_ = nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	h, p, err := ReadFrame(nc, MaxFrame)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	m, err := Decode(h.Type, p)
	if err != nil {
		t.Fatalf("decode %v: %v", h.Type, err)
	}
	return h, m
}

// expectProtocolClose reads frames until the protocol error with id 0,
// then expects the connection to end.
func expectProtocolClose(t *testing.T, nc net.Conn, want string) {
	t.Helper()
	for {
		h, m := readFrame(t, nc)
		if e, ok := m.(*Error); ok && h.ID == 0 {
			if e.Code != CodeProtocol || !strings.Contains(e.Message, want) {
				t.Fatalf("got %v, want a protocol error mentioning %q", e, want)
			}
			break
		}
	}
	_ = nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, _, err := ReadFrame(nc, MaxFrame); err == nil {
		t.Fatal("connection still open after a protocol error")
	}
}

func waitDone(t *testing.T, c *Conn, within time.Duration) error {
	t.Helper()
	select {
	case <-c.Done():
		return c.Err()
	case <-time.After(within):
		t.Fatalf("connection still up after %v", within)
		return nil
	}
}

// Many calls at once in both directions, answered out of order.
func TestCallsInAnyOrder(t *testing.T) {
	a, conns := server(t, welcome(func(ctx context.Context, req Message) (Message, error) {
		r := req.(*Read)
		time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond)
		return &Data{Data: fmt.Appendf(nil, "%d", r.Lease)}, nil
	}), Options{})
	var breaks sync.Map
	c := client(t, a, func(ctx context.Context, req Message) (Message, error) {
		breaks.Store(req.(*Break).Leases[0], true)
		return &BreakAck{}, nil
	}, Options{})
	host := <-conns
	if c.Features() != FeatureReadData || host.Features() != FeatureReadData {
		t.Fatalf("features: guest %b host %b, want only read_data", c.Features(), host.Features())
	}
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Go(func() {
			m, err := c.Call(context.Background(), &Read{Lease: uint64(i)})
			if err != nil || string(m.(*Data).Data) != fmt.Sprint(i) {
				t.Errorf("read %d: %v %v", i, m, err)
			}
		})
		wg.Go(func() {
			if _, err := host.Call(context.Background(), &Break{Leases: []uint64{uint64(i)}}); err != nil {
				t.Errorf("break %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	for i := range 200 {
		if _, ok := breaks.Load(uint64(i)); !ok {
			t.Fatalf("break %d never reached the guest", i)
		}
	}
}

func TestHandshake(t *testing.T) {
	t.Run("version", func(t *testing.T) {
		a, _ := server(t, welcome(nil), Options{})
		nc, err := Dial(context.Background(), a)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		writeFrame(t, nc, 1, &Hello{Version: 9, MaxFrame: MinFrame, Export: "x", Features: ^Features(0)})
		_, m := readFrame(t, nc)
		w := m.(*Welcome)
		if w.Version != Version || w.Features != FeatureReadData|FeatureLayout || w.MaxFrame != DefaultFrame {
			t.Fatalf("welcome %+v", w)
		}
	})
	t.Run("refused", func(t *testing.T) {
		a, _ := server(t, func(h *Hello) (*Welcome, Handler, error) {
			return nil, nil, Errorf(CodeNoExport, "no export %q", h.Export)
		}, Options{})
		_, _, err := DialHello(context.Background(), a, Hello{Export: "nope"}, nil, Options{})
		if !errors.Is(err, ErrNoExport) || !strings.Contains(err.Error(), `"nope"`) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("wrong first frame", func(t *testing.T) {
		a, _ := server(t, welcome(nil), Options{})
		nc, _ := Dial(context.Background(), a)
		defer nc.Close()
		writeFrame(t, nc, 1, &Ping{})
		expectProtocolClose(t, nc, "expected Hello")
	})
	t.Run("oversized hello", func(t *testing.T) {
		a, _ := server(t, welcome(nil), Options{})
		nc, _ := Dial(context.Background(), a)
		defer nc.Close()
		writeFrame(t, nc, 1, &Meta{Data: make([]byte, HandshakeFrame+1)})
		expectProtocolClose(t, nc, "exceeds the limit of 4096")
	})
	t.Run("silent guest", func(t *testing.T) {
		sc, _ := unixPair(t)
		start := time.Now()
		_, _, err := Server(context.Background(), sc, welcome(nil), Options{HandshakeTimeout: 100 * time.Millisecond})
		if err == nil || time.Since(start) > 3*time.Second {
			t.Fatalf("handshake with a silent guest: %v after %v", err, time.Since(start))
		}
	})
}

func TestUnknownRequestIsNotSupported(t *testing.T) {
	a, _ := server(t, welcome(nil), Options{})
	nc := raw(t, a)
	var b []byte
	b = AppendFrame(b, 7, &Ping{})
	b[4] = 0x42 // type 0x0042
	b = append(b, AppendFrame(nil, 8, &Ping{})...)
	if _, err := nc.Write(b); err != nil {
		t.Fatal(err)
	}
	h, m := readFrame(t, nc)
	if e, ok := m.(*Error); !ok || h.ID != 7 || e.Code != CodeNotSupported {
		t.Fatalf("got %v id %d, want not_supported for id 7", m, h.ID)
	}
	if h, m := readFrame(t, nc); h.ID != 8 || m.Type() != TypePong {
		t.Fatalf("after an unknown type: %v id %d, want Pong", m.Type(), h.ID)
	}
}

func TestProtocolViolationsEndTheConnection(t *testing.T) {
	slow := func(ctx context.Context, req Message) (Message, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	for _, c := range []struct {
		name string
		send func(t *testing.T, nc net.Conn)
		want string
	}{
		{"length over the limit", func(t *testing.T, nc net.Conn) {
			b := AppendFrame(nil, 2, &Ping{})
			le.PutUint32(b, DefaultFrame+1)
			nc.Write(b)
		}, "exceeds the limit"},
		{"length 2^32-1", func(t *testing.T, nc net.Conn) {
			b := AppendFrame(nil, 2, &Ping{})
			le.PutUint32(b, 1<<32-1)
			nc.Write(b)
		}, "exceeds the limit"},
		{"reserved flags", func(t *testing.T, nc net.Conn) {
			b := AppendFrame(nil, 2, &Ping{})
			b[6] = 1
			nc.Write(b)
		}, "reserved flags"},
		{"request id 0", func(t *testing.T, nc net.Conn) { writeFrame(t, nc, 0, &Ping{}) }, "id 0"},
		{"duplicate request id", func(t *testing.T, nc net.Conn) {
			writeFrame(t, nc, 5, &Release{Lease: 1})
			writeFrame(t, nc, 5, &Release{Lease: 2})
		}, "already in flight"},
		{"trailing garbage", func(t *testing.T, nc net.Conn) {
			b := AppendFrame(nil, 2, &Release{Lease: 1})
			b = append(b, 0)
			le.PutUint32(b, 9)
			nc.Write(b)
		}, "left over"},
		{"oversized batch count", func(t *testing.T, nc net.Conn) {
			b := AppendFrame(nil, 2, &ReadMeta{Generation: 1, Blocks: []BlockRange{{1, 1}}})
			le.PutUint32(b[HeaderSize+8:], 1<<30)
			nc.Write(b)
		}, "do not fit"},
	} {
		t.Run(c.name, func(t *testing.T) {
			a, conns := server(t, welcome(slow), Options{})
			nc := raw(t, a)
			host := <-conns
			c.send(t, nc)
			expectProtocolClose(t, nc, c.want)
			if err := waitDone(t, host, 5*time.Second); !errors.Is(err, ErrProtocol) {
				t.Fatalf("host side ended with %v", err)
			}
		})
	}
	t.Run("wrong reply type", func(t *testing.T) {
		a, conns := server(t, welcome(slow), Options{})
		nc := raw(t, a)
		host := <-conns
		errc := make(chan error, 1)
		go func() {
			_, err := host.Call(context.Background(), &Break{Leases: []uint64{1}})
			errc <- err
		}()
		h, _ := readFrame(t, nc)
		writeFrame(t, nc, h.ID, &Pong{})
		if err := <-errc; !errors.Is(err, ErrProtocol) {
			t.Fatalf("call got %v", err)
		}
		expectProtocolClose(t, nc, "expects BreakAck")
	})
}

// A reply nobody waits for (a late or invented ack) is counted and
// dropped; the connection goes on.
func TestUnmatchedReplyIsDropped(t *testing.T) {
	a, conns := server(t, welcome(nil), Options{})
	nc := raw(t, a)
	host := <-conns
	writeFrame(t, nc, 99, &BreakAck{})
	writeFrame(t, nc, 3, &Ping{})
	if h, m := readFrame(t, nc); h.ID != 3 || m.Type() != TypePong {
		t.Fatalf("got %v", m)
	}
	if host.Unmatched() != 1 || host.Err() != nil {
		t.Fatalf("unmatched %d, err %v", host.Unmatched(), host.Err())
	}
}

func TestHandlerPanicIsAnError(t *testing.T) {
	a, _ := server(t, welcome(func(ctx context.Context, req Message) (Message, error) {
		if req.(*Release).Lease == 1 {
			panic("boom")
		}
		return &Released{}, nil
	}), Options{})
	c := client(t, a, nil, Options{})
	if _, err := c.Call(context.Background(), &Release{Lease: 1}); !errors.Is(err, ErrInternal) {
		t.Fatalf("got %v", err)
	}
	if _, err := c.Call(context.Background(), &Release{Lease: 2}); err != nil {
		t.Fatalf("after a panic: %v", err)
	}
}

func TestInFlightQuota(t *testing.T) {
	release := make(chan struct{})
	a, _ := server(t, welcome(func(ctx context.Context, req Message) (Message, error) {
		<-release
		return &Released{}, nil
	}), Options{MaxInFlight: 2})
	c := client(t, a, nil, Options{})
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	for i := range 3 {
		wg.Go(func() {
			_, err := c.Call(context.Background(), &Release{Lease: uint64(i)})
			errs <- err
		})
		time.Sleep(20 * time.Millisecond)
	}
	if err := <-errs; !errors.Is(err, ErrQuota) {
		t.Fatalf("third request: %v", err)
	}
	close(release)
	wg.Wait()
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

func TestFrameLimitsBothWays(t *testing.T) {
	a, conns := server(t, welcome(func(ctx context.Context, req Message) (Message, error) {
		return &Data{Data: make([]byte, req.(*Read).Length)}, nil
	}), Options{})
	c := client(t, a, func(ctx context.Context, req Message) (Message, error) {
		return &AnnounceAck{}, nil
	}, Options{MaxFrame: MinFrame})
	host := <-conns
	if _, err := c.Call(context.Background(), &Read{Length: MinFrame}); err != nil {
		t.Fatalf("read of exactly the limit: %v", err)
	}
	if _, err := c.Call(context.Background(), &Read{Length: MinFrame + 1}); !errors.Is(err, ErrTooBig) {
		t.Fatalf("reply over the guest's limit: %v", err)
	}
	big := &Announce{Generation: 2, Inodes: make([]uint32, MinFrame/4)}
	if _, err := host.Call(context.Background(), big); !errors.Is(err, ErrTooBig) {
		t.Fatalf("request over the guest's limit: %v", err)
	}
	if _, err := host.Call(context.Background(), &Announce{Generation: 2}); err != nil || c.Err() != nil {
		t.Fatalf("after refusing to send: %v, %v", err, c.Err())
	}
}

// A peer that sends a frame a byte at a time, or stalls inside one, is
// cut off by the read timeouts.
func TestSlowPeersAreCutOff(t *testing.T) {
	opt := Options{KeepAlive: 50 * time.Millisecond, FrameTimeout: 100 * time.Millisecond}
	t.Run("stalled header", func(t *testing.T) {
		a, conns := server(t, welcome(nil), opt)
		nc := raw(t, a)
		host := <-conns
		nc.Write(AppendFrame(nil, 2, &Ping{})[:5])
		if err := waitDone(t, host, 5*time.Second); err == nil || !strings.Contains(err.Error(), "timeout") {
			t.Fatalf("ended with %v", err)
		}
	})
	t.Run("stalled header, long idle limit", func(t *testing.T) {
		// A header that starts is a frame: the frame timeout applies,
		// not the (much longer) idle limit.
		a, conns := server(t, welcome(nil), Options{KeepAlive: time.Hour, FrameTimeout: 100 * time.Millisecond})
		nc := raw(t, a)
		host := <-conns
		start := time.Now()
		nc.Write(AppendFrame(nil, 2, &Ping{})[:5])
		if err := waitDone(t, host, 5*time.Second); err == nil || !strings.Contains(err.Error(), "timeout") || time.Since(start) > 2*time.Second {
			t.Fatalf("ended with %v after %v", err, time.Since(start))
		}
	})
	t.Run("stalled payload", func(t *testing.T) {
		a, conns := server(t, welcome(nil), opt)
		nc := raw(t, a)
		host := <-conns
		nc.Write(AppendFrame(nil, 2, &Release{Lease: 1})[:HeaderSize+3])
		if err := waitDone(t, host, 5*time.Second); err == nil || !strings.Contains(err.Error(), "timeout") {
			t.Fatalf("ended with %v", err)
		}
	})
	t.Run("never reads replies", func(t *testing.T) {
		opt := Options{WriteTimeout: 100 * time.Millisecond}
		a, conns := server(t, welcome(func(ctx context.Context, req Message) (Message, error) {
			return &Data{Data: make([]byte, 60<<10)}, nil
		}), opt)
		nc := raw(t, a)
		host := <-conns
		for i := range 200 {
			if _, err := nc.Write(AppendFrame(nil, uint64(i+2), &Read{Length: 60 << 10})); err != nil {
				break
			}
		}
		if err := waitDone(t, host, 5*time.Second); err == nil || !strings.Contains(err.Error(), "timeout") {
			t.Fatalf("ended with %v", err)
		}
	})
}

func TestKeepAlive(t *testing.T) {
	opt := Options{KeepAlive: 30 * time.Millisecond}
	a, conns := server(t, welcome(nil), opt)
	c := client(t, a, nil, opt)
	host := <-conns
	time.Sleep(300 * time.Millisecond) // 10 keepalive intervals, idle
	if c.Err() != nil || host.Err() != nil {
		t.Fatalf("idle connection ended: guest %v, host %v", c.Err(), host.Err())
	}
	// A peer that goes silent (here: stops answering and sending) is
	// dropped after three intervals.
	raw(t, a)
	silent := <-conns
	if err := waitDone(t, silent, 5*time.Second); err == nil {
		t.Fatal("no error")
	}
}

func TestCallAfterClose(t *testing.T) {
	a, _ := server(t, welcome(nil), Options{})
	c := client(t, a, nil, Options{})
	c.Close()
	if _, err := c.Call(context.Background(), &Ping{}); !errors.Is(err, ErrClosed) {
		t.Fatalf("got %v", err)
	}
}

// A reply WithRelease is released once it is sent, and also when it
// cannot be: the peer gone, or the handler's reply replaced by an error.
func TestRepliesAreReleased(t *testing.T) {
	released := make(chan struct{}, 10)
	a, _ := server(t, welcome(func(ctx context.Context, req Message) (Message, error) {
		release := func() { released <- struct{}{} }
		r := req.(*Read)
		switch r.Offset {
		case 1: // the wrong reply type: replaced by internal
			return WithRelease(&Released{}, release), nil
		case 2: // a peer that has gone by the time it is written
			time.Sleep(200 * time.Millisecond)
		}
		return WithRelease(&Data{Data: make([]byte, r.Length)}, release), nil
	}), Options{})
	c := client(t, a, nil, Options{})
	if m, err := c.Call(context.Background(), &Read{Length: 100 << 10}); err != nil || len(m.(*Data).Data) != 100<<10 {
		t.Fatalf("bulk reply: %v", err)
	}
	if _, err := c.Call(context.Background(), &Read{Offset: 1}); !errors.Is(err, ErrInternal) {
		t.Fatalf("wrong reply: %v", err)
	}
	go c.Call(context.Background(), &Read{Offset: 2, Length: 10})
	time.Sleep(50 * time.Millisecond)
	c.Close()
	for i := range 3 {
		select {
		case <-released:
		case <-time.After(5 * time.Second):
			t.Fatalf("%d replies released, want 3", i)
		}
	}
}

// Quotas key on who a peer is, never on what it may change: the user on
// a shared Unix socket (a process that forks is the same guest), the VM
// on a per-VM socket.
func TestPeerGuest(t *testing.T) {
	for _, c := range []struct {
		p    Peer
		want string
	}{
		{Peer{Kind: KindUnix, PID: 10, UID: 1000}, "uid 1000"},
		{Peer{Kind: KindUnix, PID: 11, UID: 1000}, "uid 1000"},
		{Peer{Kind: KindUnix, PID: 11, UID: 1000, VM: "vm7"}, "vm vm7"},
		{Peer{Kind: KindHybrid, VM: "/run/fc/vm3.sock"}, "vm /run/fc/vm3.sock"},
		{Peer{Kind: KindVsock, CID: 42}, "cid 42"},
	} {
		if got := c.p.Guest(); got != c.want {
			t.Errorf("%v: %q, want %q", c.p, got, c.want)
		}
	}
	dir := t.TempDir()
	l, err := Listen(Addr{Kind: KindUnix, Path: filepath.Join(dir, "vm7.sock")}, ListenOptions{VM: "vm7"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		if nc, err := net.Dial("unix", filepath.Join(dir, "vm7.sock")); err == nil {
			defer nc.Close()
			time.Sleep(time.Second)
		}
	}()
	nc, p, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	nc.Close()
	if p.Guest() != "vm vm7" || p.UID != 0 {
		t.Fatalf("a connection on a per-VM socket is %q (%+v)", p.Guest(), p)
	}
}

// deafConn is a connection whose reads never return: its reader never
// learns of a hang-up, as a guest's has not yet when a resumed VM
// handles a request before its reader goroutine has run.
type deafConn struct {
	*net.UnixConn
	stop chan struct{}
}

func (d deafConn) Read([]byte) (int, error) { <-d.stop; return 0, net.ErrClosed }

// Alive asks the kernel: the peer's close is seen before the reader
// sees it.
func TestAliveAsksTheKernel(t *testing.T) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	mine, err := net.FileConn(os.NewFile(uintptr(fds[0]), "mine"))
	if err != nil {
		t.Fatal(err)
	}
	peer := os.NewFile(uintptr(fds[1]), "peer")
	d := deafConn{mine.(*net.UnixConn), make(chan struct{})}
	c := newConn(d, Options{}.withDefaults(), DefaultFrame, 0, nil)
	defer func() { close(d.stop); c.Close() }()
	if !c.Alive() {
		t.Fatal("a fresh connection is not alive")
	}
	peer.Close()
	if c.Alive() || c.Err() != nil {
		t.Fatalf("after the peer's close: alive %v, the reader's error %v; want not alive, and no error yet", c.Alive(), c.Err())
	}
}
