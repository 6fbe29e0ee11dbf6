package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/internal/hosttest"
	"github.com/leasefs/leasefs/internal/testenv"
	"github.com/leasefs/leasefs/vsockproto"
)

// The hostile-guest soak: a real host agent (the binary, built without
// the race detector, so its memory is what users get) runs in a memory
// cgroup with a small fd limit, and one guest (a VM on its own hybrid
// vsock socket) attacks it, attack after attack, while an honest guest
// (a real mount, data through the host) opens and reads all along. The
// agent must survive every attack with its memory and descriptors
// bounded, and the honest guest must keep working with its latency
// bounded. Every figure goes to the test's output.
func TestHostileGuest(t *testing.T) {
	testenv.RequireLoop(t)
	testenv.RequireFUSE(t)
	testenv.RequireTool(t, "prlimit")
	cg := newMemCgroup(t, 256<<20)

	mnt, dev := hostExport(t)
	const files = 500
	for i := range files {
		if err := os.WriteFile(filepath.Join(mnt, fmt.Sprintf("f%03d", i)), bytes.Repeat([]byte{byte(i)}, 16<<10), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	big := make([]byte, 32<<20)
	for i := range big {
		big[i] = byte(i * 7 / 4096)
	}
	if err := os.WriteFile(filepath.Join(mnt, "big"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	run := t.TempDir()
	t.Setenv("LEASEFS_RUN_DIR", filepath.Join(run, "guests"))
	control := "unix:" + filepath.Join(run, "control.sock")
	honestAddr := "unix:" + filepath.Join(run, "guest.sock")
	evilVM := filepath.Join(run, "evil\xff.sock") // a name that is not UTF-8: it reaches metrics and logs
	vms := filepath.Join(run, "vms")              // a VM directory, for a VMM that starts VMs by the hundred
	if err := os.Mkdir(vms, 0o755); err != nil {
		t.Fatal(err)
	}
	evil := vsockproto.Addr{Kind: vsockproto.KindUnix, Path: evilVM + "_5000"} // the host side of its hybrid socket

	// 800 descriptors: a budget of 600 for guests' files and connections.
	// LEASEFS_HOSTILE_AGENT runs another build instead (an older one, to
	// measure what it did), given only the flags every build has.
	bin, limits := leasefsBinNoRace, []string{"--max-sessions-per-guest", "8", "--max-generations-behind", "8"}
	if other := os.Getenv("LEASEFS_HOSTILE_AGENT"); other != "" {
		bin, limits = other, nil
	}
	a := &hostProc{t: t, mnt: mnt, Agent: &hosttest.Agent{Prog: "sh", Args: append([]string{"-c", `echo $$ > "$0" && exec prlimit --nofile=800:800 "$@"`,
		cg.procs(), bin, "host", "--export", "mirror=" + dev + ":" + mnt,
		"--listen", honestAddr, "--listen", "hvsock:" + evilVM + ":5000", "--listen", "hvsock-dir:" + vms + ":5000", "--control", control,
		"--state-dir", filepath.Join(run, "state"), "--auto-publish", "off", "--ack-timeout", "2s", "--grace", "2s",
		"--max-leases-per-guest", "400"}, limits...)}}
	a.start()
	t.Cleanup(func() {
		if a.Pid() != 0 {
			a.stop(syscall.SIGTERM)
		}
		waitGone(t, mnt)
	})
	pid := agentPid(t, a)
	watch := watchProcess(pid)
	defer watch.stop()
	keptBefore := hostStatus(t, control).Exports[0].KeptFiles

	honestDir := guestMount(t, "--connect", honestAddr, "--export", "mirror", "--lease-linger", "0") // its closes free at once
	honest := startHonest(t, honestDir, big)
	defer honest.stop()

	status := func() *hostagent.ExportStatus {
		t.Helper()
		out, err := leasefs(t, "status", "--control", control, "--json")
		if err != nil {
			t.Fatalf("leasefs status: %v\n%s", err, out)
		}
		var st hostagent.Status
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		return &st.Exports[0]
	}
	phase := func(name string, d time.Duration, attack func(stop <-chan struct{})) {
		t.Helper()
		honest.setPhase(name)
		watch.setPhase(name)
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() { defer close(done); attack(stop) }()
		time.Sleep(d)
		close(stop)
		<-done
		if err := syscall.Kill(pid, 0); err != nil {
			t.Fatalf("%s: the agent is gone: %v\n%s", name, err, a.Log)
		}
	}
	g := &evilGuest{t: t, addr: evil}

	phase("baseline", 3*time.Second, func(<-chan struct{}) {})

	phase("unread flood", 5*time.Second, func(stop <-chan struct{}) {
		// Every connection it may have, 64 reads of the largest size
		// in flight on each, and never a reply read.
		for range 8 {
			nc := g.raw()
			defer nc.Close()
			id := g.rawOpen(nc, "big")
			for i := range 64 {
				nc.SetWriteDeadline(time.Now().Add(time.Second))
				nc.Write(vsockproto.AppendFrame(nil, uint64(10+i), &vsockproto.Read{Lease: id, Offset: uint64(i) << 20, Length: 1 << 20}))
			}
		}
		<-stop
	})

	phase("read flood", 5*time.Second, func(stop <-chan struct{}) {
		var wg sync.WaitGroup
		for range 8 {
			c, _ := g.conn(nil)
			defer c.Close()
			id := g.open(c, "big")
			for range 32 {
				wg.Go(func() {
					testenv.Until(stop, func(i int) bool {
						c.Call(context.Background(), &vsockproto.Read{Lease: id, Offset: uint64(i%32) << 20, Length: 1 << 20})
						return true
					})
				})
			}
		}
		wg.Wait()
	})

	phase("VM-directory flood", 3*time.Second, func(stop <-chan struct{}) {
		// 100 VMs appear at once (their VMM is root: only root may
		// write the directory), while the attacker's metrics carry
		// its name, which is not UTF-8.
		c, _ := g.conn(nil)
		defer c.Close()
		var gone []func()
		for i := range 100 {
			gone = append(gone, vmSocket(t, filepath.Join(vms, fmt.Sprintf("vm%03d.sock", i))))
		}
		defer func() { // the VMs go: so do their listeners
			for _, f := range gone {
				f()
			}
			waitFor(t, "the VMs' listeners gone", func() bool {
				left, _ := filepath.Glob(filepath.Join(vms, "*_5000"))
				return len(left) == 0
			})
		}()
		testenv.Until(stop, func(int) bool {
			out, err := leasefs(t, "metrics", "--control", control)
			if err != nil || !strings.Contains(out, "evil\uFFFD.sock") {
				t.Errorf("VM-directory flood: metrics: %v\n%s", err, out)
				return false
			}
			return true
		})
		if fds := fdCount(pid); fds >= 800 {
			t.Errorf("VM-directory flood: the agent is at its fd limit (%d)", fds)
		}
	})

	var badLeases atomic.Int64
	phase("bad-lease flood", 5*time.Second, func(stop <-chan struct{}) {
		// Requests that fail at once (leases that do not exist), as
		// fast as it can on every connection it may have: each costs
		// the agent a little, and they count against its share.
		var wg sync.WaitGroup
		for range 8 {
			c, _ := g.conn(nil)
			defer c.Close()
			for range 32 {
				wg.Go(func() {
					testenv.Until(stop, func(i int) bool {
						_, err := c.Call(context.Background(), &vsockproto.Read{Lease: rand.Uint64(), Length: 4096})
						if errors.Is(err, vsockproto.ErrBadLease) {
							badLeases.Add(1)
						}
						return true
					})
				})
			}
		}
		wg.Wait()
	})
	t.Logf("bad-lease flood: %d answers in 5 s", badLeases.Load())

	var digestWindows atomic.Int64
	phase("metadata abuse", 3*time.Second, func(stop <-chan struct{}) {
		var wg sync.WaitGroup
		c, w := g.conn(nil)
		defer c.Close()
		// The digests of the most blocks one request may ask for,
		// again and again (a guest with a device checks its reads
		// against them).
		cd, wd := g.connWith(vsockproto.FeatureReadData|vsockproto.FeatureDigests, nil)
		defer cd.Close()
		for range 64 {
			wg.Go(func() {
				testenv.Until(stop, func(int) bool {
					c.Call(context.Background(), &vsockproto.ReadMeta{Generation: w.Generation,
						Blocks: slices.Repeat([]vsockproto.BlockRange{{Start: 0, Count: 1}}, 4096)})
					c.Call(context.Background(), &vsockproto.ReadMeta{Generation: w.Generation, Blocks: []vsockproto.BlockRange{{Start: 0, Count: 1 << 30}}})
					if _, err := cd.Call(context.Background(), &vsockproto.ReadDigests{Generation: wd.Generation, Count: vsockproto.MaxDigestBlocks}); err == nil {
						digestWindows.Add(1)
					}
					return true
				})
			})
		}
		wg.Wait()
	})
	if digestWindows.Load() == 0 {
		t.Error("metadata abuse: no request for digests was answered: the flood did not reach the host's digests")
	}
	t.Logf("metadata abuse: %d windows of %d digests answered in 3 s", digestWindows.Load(), vsockproto.MaxDigestBlocks)

	var sessionLeases int
	phase("session churn", 4*time.Second, func(stop <-chan struct{}) {
		// New sessions one after another, each leasing what it can and
		// leaving, its session detached with its leases.
		testenv.Until(stop, func(i int) bool {
			c, _ := g.conn(nil)
			for _, name := range g.names()[:100] {
				g.tryOpen(c, name)
			}
			c.Close()
			if i%4 == 0 {
				sessionLeases = max(sessionLeases, status().Leases)
			}
			return true
		})
	})
	if sessionLeases > 400+honest.maxLeases() { // the honest guest's, besides
		t.Errorf("session churn: the host held %d leases; the guest's limit is 400", sessionLeases)
	}
	time.Sleep(3 * time.Second) // the detached sessions' grace

	var hogQuota int
	phase("file hog", 4*time.Second, func(stop <-chan struct{}) {
		c, _ := g.conn(nil)
		defer c.Close()
		for _, name := range g.names() {
			if err := g.tryOpen(c, name); errors.Is(err, vsockproto.ErrQuota) {
				hogQuota++
			}
		}
		// Meanwhile the honest guest opens every file there is.
		for i := range files {
			b, err := os.ReadFile(filepath.Join(honestDir, fmt.Sprintf("f%03d", i)))
			if err != nil || len(b) != 16<<10 {
				t.Errorf("file hog: the honest guest cannot read f%03d: %v", i, err)
				break
			}
		}
		<-stop
	})
	if hogQuota == 0 {
		t.Error("file hog: the hog was never refused")
	}

	var kept int
	phase("generation pinning", 4*time.Second, func(stop <-chan struct{}) {
		c, _ := g.conn(func(*vsockproto.Announce) uint64 { return 0 }) // acks "generation 0", always
		defer c.Close()
		testenv.Until(stop, func(i int) bool {
			os.WriteFile(filepath.Join(mnt, "churn"), []byte(strconv.Itoa(i)), 0o644)
			if out, err := leasefs(t, "publish", "--control", control, "mirror"); err != nil {
				t.Errorf("publish: %v\n%s", err, out)
				return false
			}
			kept = max(kept, status().Kept)
			return true
		})
	})
	if kept > 8+1 {
		t.Errorf("generation pinning: %d generations kept; a guest may hold back 8", kept)
	}

	phase("descriptor exhaustion", 4*time.Second, func(stop <-chan struct{}) {
		// The fd limit falls to a few more than the agent uses: accepts
		// fail with EMFILE while connections keep coming.
		n := fdCount(pid)
		if out, err := exec.Command("prlimit", "--pid", strconv.Itoa(pid), fmt.Sprintf("--nofile=%d:800", n+4)).CombinedOutput(); err != nil {
			t.Errorf("prlimit: %v %s", err, out)
			return
		}
		defer func() {
			if out, err := exec.Command("prlimit", "--pid", strconv.Itoa(pid), "--nofile=800:800").CombinedOutput(); err != nil {
				t.Errorf("prlimit: %v %s", err, out)
			}
		}()
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				testenv.Until(stop, func(int) bool {
					if nc, err := vsockproto.Dial(context.Background(), evil); err == nil {
						nc.Close()
					}
					return true
				})
			})
		}
		time.Sleep(time.Second)
		if out, err := leasefs(t, "status", "--control", control); err != nil {
			t.Errorf("descriptor exhaustion: the control socket does not answer: %v\n%s", err, out)
		}
		wg.Wait()
	})

	phase("forking guest", 2*time.Second, func(<-chan struct{}) {
		// Processes of one user on the shared socket are one guest: the
		// honest guest is one of its connections, so 7 more get in.
		ok := forkedConnections(t, honestAddr, 12)
		if ok != 7 {
			t.Errorf("forking guest: %d of 12 processes connected; the user may have 8 connections, one of them the honest guest's", ok)
		}
	})

	// A partial frame header is cut off at the frame timeout (10 s), not
	// the idle limit (30 s).
	nc := g.raw()
	start := time.Now()
	nc.Write([]byte{1, 2, 3})
	nc.SetReadDeadline(time.Now().Add(25 * time.Second))
	buf := make([]byte, 64)
	for {
		if _, err := nc.Read(buf); err != nil {
			break
		}
	}
	if d := time.Since(start); d > 15*time.Second {
		t.Errorf("a partial header was cut off after %v", d)
	}

	honest.stop()
	watch.stop()
	time.Sleep(3 * time.Second) // detached sessions expire
	t.Logf("cgroup: peak %d MiB (page cache included), %d OOM kills", cg.peak()>>20, cg.oomKills())
	watch.report(t)
	honest.report(t)
	if cg.oomKills() != 0 {
		t.Errorf("the agent's cgroup saw %d OOM kills", cg.oomKills())
	}
	if rss := watch.maxRSS(); rss > 160<<20 {
		t.Errorf("the agent's RSS reached %d MiB", rss>>20)
	}
	// The files the test wrote meanwhile are held too, to keep the
	// generations whole (one descriptor each): not the attacks'.
	keptSince := hostStatus(t, control).Exports[0].KeptFiles - keptBefore
	if fds := fdCount(pid); fds > watch.baselineFDs()+16+keptSince {
		t.Errorf("the agent holds %d descriptors after the attacks, %d before (and %d files kept since)", fds, watch.baselineFDs(), keptSince)
	}
	if err := honest.check(); err != nil {
		t.Error(err)
	}
	if t.Failed() {
		log := a.Log.String()
		t.Logf("the agent's log (tail):\n%s", log[max(0, len(log)-6000):])
	}
}

// phases are the soak's, in order.
var phases = []string{"baseline", "unread flood", "read flood", "VM-directory flood", "bad-lease flood", "metadata abuse", "session churn", "file hog",
	"generation pinning", "descriptor exhaustion", "forking guest"}

// evilGuest is the attacker: a VM on its own hybrid vsock socket.
type evilGuest struct {
	t     *testing.T
	addr  vsockproto.Addr
	once  sync.Once
	opens map[string]*vsockproto.Open // the generation's files, as Open asks for them
	order []string
}

// conn connects and runs the handshake; announcements are answered with
// ack's generation (nil: the one announced).
func (g *evilGuest) conn(ack func(*vsockproto.Announce) uint64) (*vsockproto.Conn, *vsockproto.Welcome) {
	return g.connWith(vsockproto.FeatureReadData, ack)
}

// connWith is conn, the guest asking for features.
func (g *evilGuest) connWith(features vsockproto.Features, ack func(*vsockproto.Announce) uint64) (*vsockproto.Conn, *vsockproto.Welcome) {
	h := func(_ context.Context, req vsockproto.Message) (vsockproto.Message, error) {
		switch m := req.(type) {
		case *vsockproto.Announce:
			n := m.Generation
			if ack != nil {
				n = ack(m)
			}
			return &vsockproto.AnnounceAck{Generation: n}, nil
		case *vsockproto.Break:
			return &vsockproto.BreakAck{}, nil
		}
		return nil, vsockproto.ErrNotSupported
	}
	for {
		c, w, err := vsockproto.DialHello(context.Background(), g.addr, vsockproto.Hello{Export: "mirror", Features: features},
			h, vsockproto.Options{MaxFrame: vsockproto.MaxFrame})
		if err == nil {
			g.learn(c, w)
			return c, w
		}
		time.Sleep(20 * time.Millisecond) // its connections are all in use: wait for one
	}
}

// learn reads the generation's root directory once, through the host.
func (g *evilGuest) learn(c *vsockproto.Conn, w *vsockproto.Welcome) {
	g.once.Do(func() {
		f, err := ext4ro.Open(&metaReader{c: c, gen: w.Generation, bs: int64(w.BlockSize)}, nil)
		if err != nil {
			g.t.Fatal(err)
		}
		root, _ := f.Inode(ext4ro.RootIno)
		g.opens = map[string]*vsockproto.Open{}
		f.ReadDir(root, 0, func(e ext4ro.DirEntry) bool {
			in, err := f.Inode(e.Ino)
			if err != nil || !in.IsRegular() {
				return true
			}
			hash, _ := hostagent.LayoutHash(f, in)
			g.opens[e.Name] = &vsockproto.Open{Generation: w.Generation, Inode: in.Ino, IGen: in.Generation, Size: in.Size,
				Ctime: vsockproto.Timespec{Sec: in.Ctime.Sec, Nsec: in.Ctime.Nsec}, Layout: hash}
			g.order = append(g.order, e.Name)
			return true
		})
		sort.Strings(g.order)
	})
}

func (g *evilGuest) names() []string { return g.order }

func (g *evilGuest) tryOpen(c *vsockproto.Conn, name string) error {
	_, err := c.Call(context.Background(), g.opens[name])
	return err
}

func (g *evilGuest) open(c *vsockproto.Conn, name string) uint64 {
	m, err := c.Call(context.Background(), g.opens[name])
	if err != nil {
		g.t.Fatalf("open %s: %v", name, err)
	}
	return m.(*vsockproto.Leased).Lease
}

// raw connects and says hello by hand, asking for the largest frames.
func (g *evilGuest) raw() net.Conn {
	if g.opens == nil {
		c, _ := g.conn(nil)
		c.Close()
	}
	nc, err := vsockproto.Dial(context.Background(), g.addr)
	if err != nil {
		g.t.Fatal(err)
	}
	nc.Write(vsockproto.AppendFrame(nil, 1, &vsockproto.Hello{Version: 1, MaxFrame: vsockproto.MaxFrame, Export: "mirror", Features: vsockproto.FeatureReadData}))
	if h, p, err := vsockproto.ReadFrame(nc, vsockproto.MaxFrame); err != nil || h.Type != vsockproto.TypeWelcome {
		m, derr := vsockproto.Decode(h.Type, p)
		g.t.Fatalf("raw hello: %v %v: %+v %v", h.Type, err, m, derr)
	}
	return nc
}

// rawOpen leases name on a raw connection.
func (g *evilGuest) rawOpen(nc net.Conn, name string) uint64 {
	for try := 0; try < 20; try++ {
		nc.Write(vsockproto.AppendFrame(nil, 2, g.opens[name]))
		for {
			h, p, err := vsockproto.ReadFrame(nc, vsockproto.MaxFrame)
			if err != nil {
				g.t.Errorf("raw open: %v", err)
				return 0
			}
			if h.ID != 2 {
				continue
			}
			m, err := vsockproto.Decode(h.Type, p)
			if l, ok := m.(*vsockproto.Leased); ok {
				return l.Lease
			}
			if e, ok := m.(*vsockproto.Error); !ok || e.Code != vsockproto.CodeRetry {
				g.t.Errorf("raw open: %v %v", m, err)
				return 0
			}
			break // its own floods hold its budget: again
		}
	}
	g.t.Errorf("raw open: never leased")
	return 0
}

// metaReader reads a generation's metadata through the host.
type metaReader struct {
	c   *vsockproto.Conn
	gen uint64
	bs  int64
}

func (r *metaReader) ReadAt(p []byte, off int64) (int, error) {
	first, last := off/r.bs, (off+int64(len(p))-1)/r.bs
	n := 0
	for b := first; b <= last; b += 64 {
		count := min(last-b+1, 64)
		m, err := r.c.Call(context.Background(), &vsockproto.ReadMeta{Generation: r.gen, Blocks: []vsockproto.BlockRange{{Start: uint64(b), Count: uint32(count)}}})
		if err != nil {
			return n, err
		}
		data := m.(*vsockproto.Meta).Data
		if b == first {
			data = data[off-first*r.bs:]
		}
		n += copy(p[n:], data)
	}
	return n, nil
}

// honestGuest opens and reads a file through its mount all along, and
// times each open and read, by phase.
type honestGuest struct {
	phased

	mu      sync.Mutex
	times   map[string][]time.Duration
	errs    []string
	longest time.Duration
}

func startHonest(t *testing.T, dir string, want []byte) *honestGuest {
	h := &honestGuest{phased: newPhased(), times: map[string][]time.Duration{}}
	go func() {
		defer close(h.done)
		rng := rand.New(rand.NewPCG(3, 4))
		buf := make([]byte, 256<<10)
		for {
			select {
			case <-h.stopc:
				return
			default:
			}
			off := rng.Int64N(int64(len(want)-len(buf))) &^ 4095
			start := time.Now()
			err := func() error {
				f, err := os.Open(filepath.Join(dir, "big"))
				if err != nil {
					return err
				}
				defer f.Close()
				if _, err := f.ReadAt(buf, off); err != nil {
					return err
				}
				if !bytes.Equal(buf, want[off:off+int64(len(buf))]) {
					return fmt.Errorf("read other bytes at %d", off)
				}
				// Not from the page cache next time.
				return unix.Fadvise(int(f.Fd()), off, int64(len(buf)), unix.FADV_DONTNEED)
			}()
			d := time.Since(start)
			h.mu.Lock()
			p := h.phase.Load().(string)
			h.times[p] = append(h.times[p], d)
			h.longest = max(h.longest, d)
			if err != nil {
				h.errs = append(h.errs, fmt.Sprintf("%s: %v", p, err))
			}
			h.mu.Unlock()
		}
	}()
	return h
}

// phased is a loop in the background that files what it finds by the
// soak's phase.
type phased struct {
	stopc chan struct{}
	done  chan struct{} // closed by the loop when it ends
	phase atomic.Value  // string
}

func newPhased() phased {
	p := phased{stopc: make(chan struct{}), done: make(chan struct{})}
	p.phase.Store("start")
	return p
}

func (p *phased) setPhase(name string) { p.phase.Store(name) }

// stop ends the loop and waits for it.
func (p *phased) stop() {
	select {
	case <-p.stopc:
	default:
		close(p.stopc)
	}
	<-p.done
}

// maxLeases bounds the leases the honest guest holds at once: one file
// open, and a few whose release is on its way.
func (h *honestGuest) maxLeases() int { return 8 }

func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

func (h *honestGuest) report(t *testing.T) {
	h.mu.Lock()
	defer h.mu.Unlock()
	base := median(h.times["baseline"])
	for _, p := range phases {
		ds := h.times[p]
		if len(ds) == 0 {
			continue
		}
		s := slices.Clone(ds)
		slices.Sort(s)
		t.Logf("honest guest, %-22s %5d opens+reads of 256 KiB: median %7.2f ms (%.1f× baseline), p99 %7.2f ms, max %7.2f ms",
			p+":", len(s), ms(median(s)), float64(median(s))/float64(max(base, 1)), ms(s[len(s)*99/100]), ms(s[len(s)-1]))
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// check fails if the honest guest failed, waited too long, or was
// slowed by a flood more than a fair share of the host explains.
func (h *honestGuest) check() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.errs) > 0 {
		return fmt.Errorf("the honest guest failed %d times: %s", len(h.errs), strings.Join(h.errs[:min(len(h.errs), 5)], "; "))
	}
	if h.longest > 5*time.Second {
		return fmt.Errorf("an honest open and read took %v", h.longest)
	}
	base := median(h.times["baseline"])
	for _, p := range []string{"unread flood", "read flood", "VM-directory flood", "metadata abuse"} {
		if m := median(h.times[p]); len(h.times[p]) < 5 || m > 25*max(base, time.Millisecond) {
			return fmt.Errorf("%s: the honest guest's median open and read took %v (%d of them), %v without it", p, m, len(h.times[p]), base)
		}
	}
	// Failing requests are cheap and rate-limited per guest: they may
	// slow the honest guest by little.
	if p, m := "bad-lease flood", median(h.times["bad-lease flood"]); len(h.times[p]) < 5 || m > 3*max(base, time.Millisecond) {
		return fmt.Errorf("%s: the honest guest's median open and read took %v (%d of them), %v without it", p, m, len(h.times[p]), base)
	}
	return nil
}

// watcher samples a process's RSS and descriptors, by phase.
type watcher struct {
	phased
	pid int

	mu     sync.Mutex
	rss    map[string]int64
	fds    map[string]int
	max    int64
	baseFD int
}

func watchProcess(pid int) *watcher {
	w := &watcher{phased: newPhased(), pid: pid, rss: map[string]int64{}, fds: map[string]int{}, baseFD: fdCount(pid)}
	go func() {
		defer close(w.done)
		for {
			select {
			case <-w.stopc:
				return
			case <-time.After(50 * time.Millisecond):
			}
			r, n := rssOf(pid), fdCount(pid)
			p := w.phase.Load().(string)
			w.mu.Lock()
			w.rss[p] = max(w.rss[p], r)
			w.fds[p] = max(w.fds[p], n)
			w.max = max(w.max, r)
			w.mu.Unlock()
		}
	}()
	return w
}

func (w *watcher) maxRSS() int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.max
}

func (w *watcher) baselineFDs() int { return w.baseFD }

func (w *watcher) report(t *testing.T) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, p := range phases {
		t.Logf("agent, %-22s max RSS %4d MiB, max %4d descriptors", p+":", w.rss[p]>>20, w.fds[p])
	}
}

func rssOf(pid int) int64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

func fdCount(pid int) int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents)
}

// agentPid is the pid of the agent a started (through sh and prlimit,
// both of which exec it).
func agentPid(t *testing.T, a *hostProc) int {
	return a.Pid()
}

// forkedConnections starts n processes that each connect to addr and
// say hello, and counts those welcomed.
func forkedConnections(t *testing.T, addr string, n int) int {
	var cmds []*exec.Cmd
	var outs []*bytes.Buffer
	for range n {
		cmd := testenv.Helper("hello", addr)
		cmd.Stderr = nil
		var out bytes.Buffer
		cmd.Stdout = &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds, outs = append(cmds, cmd), append(outs, &out)
	}
	ok := 0
	for i, cmd := range cmds {
		cmd.Wait()
		if strings.TrimSpace(outs[i].String()) == "welcome" {
			ok++
		}
	}
	return ok
}

// helloMain is a forked guest (testenv.Helper "hello" ADDR): it connects,
// says hello, prints whether it was welcomed, and holds the connection a
// moment so that its siblings find it open.
func helloMain(addr string) {
	a, err := vsockproto.ParseAddr(addr)
	if err != nil {
		os.Exit(2)
	}
	c, _, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "mirror"}, nil, vsockproto.Options{})
	if err != nil {
		fmt.Println("refused")
		return
	}
	fmt.Println("welcome")
	time.Sleep(3 * time.Second)
	c.Close()
}

// memCgroup is a memory cgroup made below this process's own, removed
// when the test ends.
type memCgroup struct {
	dir string
	v2  bool
}

func newMemCgroup(t *testing.T, limit int64) *memCgroup {
	t.Helper()
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		testenv.Unavailable(t, "no cgroups: %v", err)
	}
	var cg memCgroup
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case slices.Contains(strings.Split(parts[1], ","), "memory"):
			cg.dir = filepath.Join("/sys/fs/cgroup/memory", parts[2])
		case parts[0] == "0" && cg.dir == "":
			if c, err := os.ReadFile("/sys/fs/cgroup/cgroup.controllers"); err == nil && strings.Contains(string(c), "memory") {
				cg.dir, cg.v2 = filepath.Join("/sys/fs/cgroup", parts[2]), true
			}
		}
	}
	if cg.dir == "" {
		testenv.Unavailable(t, "no memory cgroup controller")
	}
	cg.dir = filepath.Join(cg.dir, fmt.Sprintf("leasefs-test-%d", os.Getpid()))
	if err := os.Mkdir(cg.dir, 0o755); err != nil {
		testenv.Unavailable(t, "cannot make a memory cgroup: %v", err)
	}
	t.Cleanup(func() {
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if err := os.Remove(cg.dir); err == nil || os.IsNotExist(err) {
				return
			}
		}
		t.Errorf("cannot remove cgroup %s", cg.dir)
	})
	file, value := "memory.limit_in_bytes", strconv.FormatInt(limit, 10)
	if cg.v2 {
		file = "memory.max"
	}
	if err := os.WriteFile(filepath.Join(cg.dir, file), []byte(value), 0); err != nil {
		testenv.Unavailable(t, "cannot limit a memory cgroup: %v", err)
	}
	return &cg
}

func (c *memCgroup) procs() string { return filepath.Join(c.dir, "cgroup.procs") }

func (c *memCgroup) peak() int64 {
	file := "memory.max_usage_in_bytes"
	if c.v2 {
		file = "memory.peak"
	}
	b, _ := os.ReadFile(filepath.Join(c.dir, file))
	n, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return n
}

func (c *memCgroup) oomKills() int64 {
	file := "memory.oom_control"
	if c.v2 {
		file = "memory.events"
	}
	b, _ := os.ReadFile(filepath.Join(c.dir, file))
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "oom_kill "); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n
		}
	}
	return 0
}
