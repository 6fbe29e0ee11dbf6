package hostagent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/internal/testenv"
	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
)

// serve runs a Server for e on a Unix socket and returns its address.
func serve(t testing.TB, e *Export, opt ServerOptions) (*Server, vsockproto.Addr) {
	t.Helper()
	s, err := NewServer([]*Export{e}, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	a, _ := vsockproto.ParseAddr("unix:" + filepath.Join(t.TempDir(), "s"))
	l, err := vsockproto.Listen(a, vsockproto.ListenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go s.Serve(ctx, l)
	return s, a
}

// publishedFile is an export holding file f, published once.
func publishedFile(t testing.TB) (export, *Export, *Generation) {
	t.Helper()
	x := newExport(t, 64)
	x.write(t, "f", "content")
	e := x.open(t, 5*time.Second)
	g, err := e.Publish()
	if err != nil {
		t.Fatal(err)
	}
	return x, e, g
}

// One peer may hold MaxConnsPerPeer connections; more are refused, and
// the others go on.
func TestConnectionsPerPeerAreCapped(t *testing.T) {
	x := newExport(t, 64)
	e := x.open(t, 5*time.Second)
	if _, err := e.Publish(); err != nil {
		t.Fatal(err)
	}
	_, a := serve(t, e, ServerOptions{Limits: Limits{ConnsPerGuest: 3}, Lease: lease.Config{AckTimeout: time.Second}})
	var conns []*vsockproto.Conn
	for range 3 {
		c, _, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test"}, nil, vsockproto.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	if _, _, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test"}, nil, vsockproto.Options{}); err == nil {
		t.Fatal("a fourth connection from the same peer was served")
	}
	for i, c := range conns {
		if _, err := c.Call(context.Background(), &vsockproto.Ping{}); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
	}
	// One goes: room for another.
	conns[0].Close()
	time.Sleep(100 * time.Millisecond)
	c, _, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test"}, nil, vsockproto.Options{})
	if err != nil {
		t.Fatalf("after one closed: %v", err)
	}
	c.Close()
}

// The host checks what a guest claims: an Open that misdescribes the
// inode, a metadata read of a block that is not metadata, an export or a
// generation that does not exist.
func TestServerChecksGuests(t *testing.T) {
	x, e, g := publishedFile(t)
	_, a := serve(t, e, ServerOptions{Lease: lease.Config{AckTimeout: time.Second}})
	if _, _, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "nope"}, nil, vsockproto.Options{}); !errors.Is(err, vsockproto.ErrNoExport) {
		t.Fatalf("unknown export: %v", err)
	}
	c, w, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test"}, nil, vsockproto.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if w.Generation != g.Number {
		t.Fatalf("welcome at generation %d, want %d", w.Generation, g.Number)
	}
	ino := inodeOf(t, filepath.Join(x.mnt, "f"))
	for _, c2 := range []struct {
		name string
		m    vsockproto.Message
		want error
	}{
		{"gone generation", &vsockproto.ReadMeta{Generation: g.Number + 5, Blocks: []vsockproto.BlockRange{{Start: 0, Count: 1}}}, vsockproto.ErrGone},
		{"not metadata", &vsockproto.ReadMeta{Generation: g.Number, Blocks: []vsockproto.BlockRange{{Start: 10000, Count: 1}}}, vsockproto.ErrInvalid},
		{"too many blocks", &vsockproto.ReadMeta{Generation: g.Number, Blocks: []vsockproto.BlockRange{{Start: 0, Count: 1 << 20}}}, vsockproto.ErrInvalid},
		{"a block twice", &vsockproto.ReadMeta{Generation: g.Number, Blocks: []vsockproto.BlockRange{{Start: 0, Count: 2}, {Start: 1, Count: 1}}}, vsockproto.ErrInvalid},
		{"block 0 4,096 times", &vsockproto.ReadMeta{Generation: g.Number, Blocks: slices.Repeat([]vsockproto.BlockRange{{Start: 0, Count: 1}}, 4096)}, vsockproto.ErrInvalid},
		{"the journal inode", &vsockproto.Open{Generation: g.Number, Inode: 8}, vsockproto.ErrNotFound},
		{"a read over the reply limit", &vsockproto.Read{Lease: 12345, Length: 2 << 20}, vsockproto.ErrInvalid},
		{"wrong size", &vsockproto.Open{Generation: g.Number, Inode: ino, Size: 99}, vsockproto.ErrInvalid},
		{"no such inode", &vsockproto.Open{Generation: g.Number, Inode: 5000}, vsockproto.ErrNotFound},
		{"a directory", &vsockproto.Open{Generation: g.Number, Inode: 2}, vsockproto.ErrNotRegular},
		{"forged lease", &vsockproto.Read{Lease: 12345, Length: 10}, vsockproto.ErrBadLease},
		{"forged release", &vsockproto.Release{Lease: 12345}, vsockproto.ErrBadLease},
	} {
		if _, err := c.Call(context.Background(), c2.m); !errors.Is(err, c2.want) {
			t.Errorf("%s: %v, want %v", c2.name, err, c2.want)
		}
	}
	if _, err := c.Call(context.Background(), &vsockproto.ReadMeta{Generation: g.Number, Blocks: []vsockproto.BlockRange{{Start: 0, Count: 1}}}); err != nil {
		t.Fatalf("the superblock: %v", err)
	}
	// A real lease: reads at and far past the end are empty.
	in := inodeOf(t, filepath.Join(x.mnt, "f"))
	var st syscall.Stat_t
	syscall.Stat(filepath.Join(x.mnt, "f"), &st)
	view, _ := g.FS()
	fin, err := view.Inode(in)
	if err != nil {
		t.Fatal(err)
	}
	reply, err := c.Call(context.Background(), &vsockproto.Open{Generation: g.Number, Inode: in, IGen: fin.Generation, Size: fin.Size,
		Ctime: vsockproto.Timespec{Sec: fin.Ctime.Sec, Nsec: fin.Ctime.Nsec}})
	if err != nil {
		t.Fatal(err)
	}
	id := reply.(*vsockproto.Leased).Lease
	for _, off := range []uint64{uint64(st.Size), vsockproto.MaxOffset} {
		m, err := c.Call(context.Background(), &vsockproto.Read{Lease: id, Offset: off, Length: 10})
		if err != nil || len(m.(*vsockproto.Data).Data) != 0 {
			t.Fatalf("a read at %d: %v, want nothing", off, err)
		}
	}
	// A guest whose frames are small gets too_big for more blocks than fit.
	small, _, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test"}, nil, vsockproto.Options{MaxFrame: vsockproto.MinFrame})
	if err != nil {
		t.Fatal(err)
	}
	defer small.Close()
	if _, err := small.Call(context.Background(), &vsockproto.ReadMeta{Generation: g.Number, Blocks: []vsockproto.BlockRange{{Start: 0, Count: 17}}}); !errors.Is(err, vsockproto.ErrTooBig) {
		t.Fatalf("17 blocks to a guest of 64 KiB frames: %v", err)
	}
}

// Changes publish by themselves: after a quiet period, or at the latest
// after the maximum delay while changes keep coming.
func TestAutoPublish(t *testing.T) {
	x := newExport(t, 64)
	e := x.openWith(t, ExportConfig{Watch: true, AutoPublish: &AutoPublish{Quiet: 200 * time.Millisecond, Max: 600 * time.Millisecond}})
	g0, err := e.Publish()
	if err != nil {
		t.Fatal(err)
	}
	s, _ := serve(t, e, ServerOptions{Lease: lease.Config{AckTimeout: time.Second}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go s.AutoPublish(ctx, "test")
	time.Sleep(400 * time.Millisecond)
	if e.Current() != g0 {
		t.Fatal("published with nothing changed")
	}
	x.write(t, "a", "1")
	waitGen := func(after uint64, within time.Duration) uint64 {
		deadline := time.Now().Add(within)
		for time.Now().Before(deadline) {
			if n := e.Current().Number; n > after {
				return n
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatalf("no generation after %d within %v", after, within)
		return 0
	}
	waitGen(g0.Number, 3*time.Second)
	// Writes every 50 ms never leave 200 ms of quiet: the maximum delay
	// publishes all the same.
	stop := time.Now().Add(1500 * time.Millisecond)
	start := e.Current().Number
	for i := 0; time.Now().Before(stop); i++ {
		x.write(t, "b", strconv.Itoa(i))
		time.Sleep(50 * time.Millisecond)
	}
	if e.Current().Number == start {
		t.Fatal("continuous changes were never published")
	}
}

// A generation is kept while a guest is on it (with those after it), and
// dropped after.
func TestGenerationsKeptWhileGuestsAreOnThem(t *testing.T) {
	x := newExport(t, 64)
	e := x.open(t, 5*time.Second)
	g1, err := e.Publish()
	if err != nil {
		t.Fatal(err)
	}
	s, a := serve(t, e, ServerOptions{Lease: lease.Config{AckTimeout: time.Second}})
	var mu sync.Mutex
	stay := g1.Number // the generation the guest says it is on
	acked := make(chan uint64, 16)
	c, _, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test"},
		func(ctx context.Context, req vsockproto.Message) (vsockproto.Message, error) {
			mu.Lock()
			defer mu.Unlock()
			acked <- req.(*vsockproto.Announce).Generation
			return &vsockproto.AnnounceAck{Generation: stay}, nil
		}, vsockproto.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	publish := func() uint64 {
		x.write(t, "f", time.Now().String())
		g, err := s.Publish("test")
		if err != nil {
			t.Fatal(err)
		}
		if got := <-acked; got != g.Number {
			t.Fatalf("announced %d, published %d", got, g.Number)
		}
		time.Sleep(20 * time.Millisecond) // the ack is recorded after the reply
		return g.Number
	}
	publish()
	n3 := publish()
	if e.Generation(g1.Number) == nil {
		t.Fatal("the generation the guest is on was dropped")
	}
	mu.Lock()
	stay = n3 + 1 // moves on with the next announcement
	mu.Unlock()
	publish()
	publish()
	if e.Generation(g1.Number) != nil || e.Generation(n3) != nil {
		t.Fatal("generations nobody is on any more were kept")
	}
}

// A guest that never acknowledges a break holds a host writer for the
// ack deadline and no longer; its lease is revoked.
func TestGuestThatNeverAcks(t *testing.T) {
	x, e, g := publishedFile(t)
	const deadline = time.Second
	_, a := serve(t, e, ServerOptions{Lease: lease.Config{AckTimeout: deadline}})
	broke := make(chan struct{}, 1)
	c, _, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test", Features: vsockproto.FeatureReadData},
		func(ctx context.Context, req vsockproto.Message) (vsockproto.Message, error) {
			if _, ok := req.(*vsockproto.Break); ok {
				broke <- struct{}{}
				<-ctx.Done() // never answers
			}
			return &vsockproto.AnnounceAck{}, nil
		}, vsockproto.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	view, err := ext4ro.Open(g, nil)
	if err != nil {
		t.Fatal(err)
	}
	in, err := view.Inode(inodeOf(t, filepath.Join(x.mnt, "f")))
	if err != nil {
		t.Fatal(err)
	}
	reply, err := c.Call(context.Background(), &vsockproto.Open{Generation: g.Number, Inode: in.Ino, IGen: in.Generation, Size: in.Size,
		Ctime: vsockproto.Timespec{Sec: in.Ctime.Sec, Nsec: in.Ctime.Nsec}})
	if err != nil {
		t.Fatal(err)
	}
	id := reply.(*vsockproto.Leased).Lease
	start := time.Now()
	f, err := os.OpenFile(filepath.Join(x.mnt, "f"), os.O_WRONLY, 0) // blocks on the lease
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	waited := time.Since(start)
	select {
	case <-broke:
	default:
		t.Fatal("the guest was never sent the break")
	}
	if waited < deadline-100*time.Millisecond || waited > deadline+time.Second {
		t.Fatalf("the writer waited %v; the deadline is %v", waited, deadline)
	}
	if _, err := c.Call(context.Background(), &vsockproto.Read{Lease: id, Length: 4}); !errors.Is(err, vsockproto.ErrRevoked) {
		t.Fatalf("read through the unacknowledged lease: %v, want revoked", err)
	}
}

// Generations dropped while guests read them: every answer is the
// blocks or gone, never internal, and (under the race detector) no read
// races the drop.
func TestDroppedGenerationsRaceNoRead(t *testing.T) {
	x, e, g := publishedFile(t)
	s, a := serve(t, e, ServerOptions{Lease: lease.Config{AckTimeout: time.Second}, Limits: Limits{GenerationsBehind: 2}})
	c, _, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test"}, func(_ context.Context, req vsockproto.Message) (vsockproto.Message, error) {
		return &vsockproto.AnnounceAck{Generation: req.(*vsockproto.Announce).Generation}, nil
	}, vsockproto.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var newest atomic.Uint64
	newest.Store(g.Number)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var served, gone atomic.Int64
	for range 8 {
		wg.Go(func() {
			testenv.Until(stop, func(int) bool {
				n := newest.Load() - uint64(rand.IntN(4))
				_, err := c.Call(context.Background(), &vsockproto.ReadMeta{Generation: n, Blocks: []vsockproto.BlockRange{{Start: 0, Count: 1}}})
				switch {
				case err == nil:
					served.Add(1)
				case errors.Is(err, vsockproto.ErrGone):
					gone.Add(1)
				default:
					t.Errorf("generation %d: %v", n, err)
					return false
				}
				return true
			})
		})
	}
	// Status meanwhile, as a scrape or 'leasefs status' would: it reads
	// generations being dropped.
	wg.Go(func() {
		testenv.Until(stop, func(int) bool {
			_ = s.Status()
			return true
		})
	})
	for i := range 60 {
		x.write(t, "churn", strconv.Itoa(i))
		gen, err := s.Publish("test")
		if err != nil {
			t.Fatal(err)
		}
		newest.Store(gen.Number)
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("%d reads served, %d gone", served.Load(), gone.Load())
	if served.Load() == 0 || gone.Load() == 0 {
		t.Fatal("the reads did not meet the drops")
	}
	if k := e.Kept(); k > 4 {
		t.Fatalf("%d generations kept; the guest is on the newest and may hold back 2", k)
	}
}

// Status reads the current generation without a reference (it only
// counts), so the generation may be dropped under it: what it reads
// must outlive the drop (a data race under -race before, and a count of
// 0 after).
func TestStatusOfAGenerationBeingDropped(t *testing.T) {
	x, e, g := publishedFile(t)
	want := g.Blocks()
	read := make(chan int)
	go func() {
		time.Sleep(200 * time.Millisecond) // after the drop, with nothing ordering the two
		read <- g.Blocks()
	}()
	x.write(t, "f", "more")
	if _, err := e.Publish(); err != nil {
		t.Fatal(err)
	}
	e.Drop(g.Number)
	if got := <-read; got != want || want == 0 {
		t.Fatalf("a dropped generation counts %d blocks; it had %d", got, want)
	}
}

// A session that resumes naming a generation older than the one it
// acknowledged (still kept: another guest is on it) does not go back to
// it: it is told to move to the current one, as acknowledgements that go
// back are ignored — else it could pin old generations.
func TestResumedSessionNeverGoesBack(t *testing.T) {
	x, e, g1 := publishedFile(t)
	s, a := serve(t, e, ServerOptions{Lease: lease.Config{AckTimeout: time.Second}, Limits: Limits{GenerationsBehind: 8}})
	ackWith := func(gen func(*vsockproto.Announce) uint64) vsockproto.Handler {
		return func(_ context.Context, req vsockproto.Message) (vsockproto.Message, error) {
			return &vsockproto.AnnounceAck{Generation: gen(req.(*vsockproto.Announce))}, nil
		}
	}
	pin, _, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test", Generation: g1.Number},
		ackWith(func(*vsockproto.Announce) uint64 { return g1.Number }), vsockproto.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer pin.Close()
	c, w, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test", Features: vsockproto.FeatureResume},
		ackWith(func(m *vsockproto.Announce) uint64 { return m.Generation }), vsockproto.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var cur uint64
	for i := range 3 {
		x.write(t, "churn", strconv.Itoa(i))
		g, err := s.Publish("test")
		if err != nil {
			t.Fatal(err)
		}
		cur = g.Number
	}
	onCurrent := func() bool {
		for _, gs := range s.Status().Exports[0].Guests {
			if gs.Generation == cur {
				return true
			}
		}
		return false
	}
	for deadline := time.Now().Add(5 * time.Second); !onCurrent(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the guest never acknowledged the current generation")
		}
	}
	c.Close()
	if !e.Has(g1.Number) {
		t.Fatal("the first generation is not kept, though a guest is on it")
	}
	c2, w2, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test", Token: w.Token, Features: vsockproto.FeatureResume, Generation: g1.Number},
		ackWith(func(m *vsockproto.Announce) uint64 { return m.Generation }), vsockproto.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if !w2.Resumed || w2.Kept || w2.Generation != cur {
		t.Fatalf("resumed naming generation %d after acknowledging %d: resumed %v, kept %v, generation %d", g1.Number, cur, w2.Resumed, w2.Kept, w2.Generation)
	}
}

// A guest that never answers announcements costs one waiting call,
// however often the host publishes: they do not pile up.
func TestAnnouncementsToASilentGuestDoNotPileUp(t *testing.T) {
	x, e, _ := publishedFile(t)
	s, a := serve(t, e, ServerOptions{Lease: lease.Config{AckTimeout: time.Second}})
	var got atomic.Int64
	c, _, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test"}, func(ctx context.Context, _ vsockproto.Message) (vsockproto.Message, error) {
		got.Add(1)
		<-ctx.Done() // never answers
		return nil, ctx.Err()
	}, vsockproto.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	before := runtime.NumGoroutine()
	for i := range 100 {
		x.write(t, "churn", strconv.Itoa(i))
		if _, err := s.Publish("test"); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond)
	if n := runtime.NumGoroutine() - before; n > 20 {
		t.Fatalf("%d goroutines more after 100 publishes to a guest that never answers", n)
	}
	if n := got.Load(); n != 1 {
		t.Fatalf("the guest got %d announcements while it had not answered the first", n)
	}
}

// ReadDigests names each metadata block of a window by the SHA-256 of
// what ReadMeta serves for it, and no other block; only to a guest that
// asked for the feature, and only for kept generations.
func TestDigests(t *testing.T) {
	_, e, g := publishedFile(t)
	_, a := serve(t, e, ServerOptions{Lease: lease.Config{AckTimeout: time.Second}})
	plain, _, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test"}, nil, vsockproto.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if _, err := plain.Call(context.Background(), &vsockproto.ReadDigests{Generation: g.Number, Count: 8}); !errors.Is(err, vsockproto.ErrNotSupported) {
		t.Errorf("digests without the feature: %v", err)
	}
	c, w, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test", Features: vsockproto.FeatureDigests}, nil, vsockproto.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !w.Features.Has(vsockproto.FeatureDigests) {
		t.Fatal("the host does not offer digests")
	}
	if _, err := c.Call(context.Background(), &vsockproto.ReadDigests{Generation: g.Number + 5, Count: 8}); !errors.Is(err, vsockproto.ErrGone) {
		t.Errorf("digests of a generation not kept: %v", err)
	}
	const n = vsockproto.MaxDigestBlocks
	reply, err := c.Call(context.Background(), &vsockproto.ReadDigests{Generation: g.Number, Count: n})
	if err != nil {
		t.Fatal(err)
	}
	d := reply.(*vsockproto.Digests)
	if len(d.Present) != n/8 {
		t.Fatalf("a bitmap of %d bytes for %d blocks", len(d.Present), n)
	}
	k, meta := 0, 0
	for b := range uint64(n) {
		has := d.Present[b/8]&(1<<(b%8)) != 0
		if has != g.Has(b) {
			t.Fatalf("block %d: present %v, metadata %v", b, has, g.Has(b))
		}
		if !has {
			continue
		}
		m, err := c.Call(context.Background(), &vsockproto.ReadMeta{Generation: g.Number, Blocks: []vsockproto.BlockRange{{Start: b, Count: 1}}})
		if err != nil {
			t.Fatal(err)
		}
		if sum := sha256.Sum256(m.(*vsockproto.Meta).Data); !bytes.Equal(sum[:], d.Sums[k*vsockproto.DigestSize:(k+1)*vsockproto.DigestSize]) {
			t.Errorf("block %d: the digest is not the SHA-256 of the block served", b)
		}
		k++
		meta++
	}
	if meta < 3 {
		t.Errorf("only %d metadata blocks among the first %d", meta, n)
	}
}
