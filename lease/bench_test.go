package lease

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
	"github.com/leasefs/leasefs/vsockproto"
)

// benchFS mounts a fresh ext4 with n empty files and returns their
// requests.
func benchFS(b *testing.B, n, sizeMB int) (string, []Request) {
	b.Helper()
	testenv.RequireLoop(b)
	img := imgtest.Mkfs(b, "ext4", "", sizeMB, "-b", "4096", "-N", strconv.Itoa(n+1000))
	dir := imgtest.KernelMount(b, img, "rw")
	reqs := make([]Request, n)
	for i := range reqs {
		p := filepath.Join(dir, "f"+strconv.Itoa(i))
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			b.Fatal(err)
		}
		reqs[i] = requestFor(b, p)
	}
	return dir, reqs
}

// serve answers Open and Release for one session over vsockproto, the
// way the host agent does.
func serve(s *Session) vsockproto.Handler {
	return func(ctx context.Context, req vsockproto.Message) (vsockproto.Message, error) {
		switch m := req.(type) {
		case *vsockproto.Open:
			id, err := s.Acquire(Request{Ino: m.Inode, IGen: m.IGen, Size: m.Size,
				Ctime: unix.Timespec{Sec: m.Ctime.Sec, Nsec: int64(m.Ctime.Nsec)}})
			if err != nil {
				return nil, vsockproto.Errorf(vsockproto.CodeStale, "%v", err)
			}
			return &vsockproto.Leased{Lease: uint64(id)}, nil
		case *vsockproto.Release:
			if err := s.Release(ID(m.Lease)); err != nil {
				return nil, vsockproto.Errorf(vsockproto.CodeBadLease, "%v", err)
			}
			return &vsockproto.Released{}, nil
		}
		return nil, vsockproto.ErrNotSupported
	}
}

// BenchmarkAcquire measures a lease acquisition (reported as p50 and
// p99 of the acquire alone; ns/op includes the release): straight into
// the coordinator, and over a Unix socket with the protocol, for a file
// nobody holds yet ("new": open by handle, F_SETLEASE, inotify, checks)
// and one another guest already holds ("shared").
func BenchmarkAcquire(b *testing.B) {
	const files = 4096
	dir, reqs := benchFS(b, files, 256)
	c := coordinator(b, dir, Config{})

	a, err := vsockproto.ParseAddr("unix:" + filepath.Join(b.TempDir(), "s"))
	if err != nil {
		b.Fatal(err)
	}
	l, err := vsockproto.Listen(a, vsockproto.ListenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			nc, _, err := l.Accept()
			if err != nil {
				return
			}
			go vsockproto.Server(context.Background(), nc, func(*vsockproto.Hello) (*vsockproto.Welcome, vsockproto.Handler, error) {
				s, err := c.NewSession("bench", "bench", func([]ID) {})
				if err != nil {
					return nil, nil, err
				}
				return &vsockproto.Welcome{BlockSize: 4096}, serve(s), nil
			}, vsockproto.Options{})
		}
	}()
	conn, _, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "bench"}, nil, vsockproto.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()

	direct := session(b, c, "direct", func([]ID) {})
	viaSocket := func(r Request) (func() error, error) {
		m, err := conn.Call(context.Background(), &vsockproto.Open{Generation: 1, Inode: r.Ino, IGen: r.IGen, Size: r.Size,
			Ctime: vsockproto.Timespec{Sec: r.Ctime.Sec, Nsec: uint32(r.Ctime.Nsec)}})
		if err != nil {
			return nil, err
		}
		id := m.(*vsockproto.Leased).Lease
		return func() error { _, err := conn.Call(context.Background(), &vsockproto.Release{Lease: id}); return err }, nil
	}
	straight := func(r Request) (func() error, error) {
		id, err := direct.Acquire(r)
		return func() error { return direct.Release(id) }, err
	}
	holder := session(b, c, "holder", func([]ID) {})
	for _, path := range []string{"direct", "socket"} {
		acquire := straight
		if path == "socket" {
			acquire = viaSocket
		}
		for _, mode := range []string{"new", "shared"} {
			b.Run(path+"/"+mode, func(b *testing.B) {
				var held []ID
				if mode == "shared" {
					for _, r := range reqs {
						held = append(held, mustAcquire(b, holder, r))
					}
				}
				lat := make([]time.Duration, 0, b.N)
				b.ResetTimer()
				for i := range b.N {
					start := time.Now()
					release, err := acquire(reqs[i%files])
					lat = append(lat, time.Since(start))
					if err != nil {
						b.Fatal(err)
					}
					if err := release(); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				for _, id := range held {
					holder.Release(id)
				}
				slices.Sort(lat)
				b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-µs")
				b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-µs")
			})
		}
	}
}

// BenchmarkMemoryPerLease holds 100,000 leases from 500 sessions and
// reports the agent's memory per lease: resident set and Go heap, and
// the kernel's slab (fds, leases, inotify marks) as /proc/meminfo shows
// it, which other activity on the machine disturbs. The leases are on as
// many files as the fd limit allows (100,000 where it is high enough);
// "one-file-each" holds one lease per file on that many files, the
// dearest case per lease.
func BenchmarkMemoryPerLease(b *testing.B) {
	const leases, guests = 100_000, 500
	var rl unix.Rlimit
	unix.Getrlimit(unix.RLIMIT_NOFILE, &rl)
	old := rl
	rl.Cur = min(rl.Max, leases+2048)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		b.Fatal(err)
	}
	defer unix.Setrlimit(unix.RLIMIT_NOFILE, &old)
	files := min(leases, int(rl.Cur)-1024)
	dir, reqs := benchFS(b, files, 1024)
	c := coordinator(b, dir, Config{})
	b.Logf("fd limit %d: %d files", rl.Cur, files)
	for _, n := range []int{leases, files} {
		name := "100k-leases-on-" + strconv.Itoa(files) + "-files"
		if n == files {
			name = "one-file-each-" + strconv.Itoa(files)
		}
		b.Run(name, func(b *testing.B) {
			for range b.N {
				var ss []*Session
				for i := range guests {
					ss = append(ss, session(b, c, "g"+strconv.Itoa(i), func([]ID) {}))
				}
				rss0, heap0, slab0 := memNow()
				for i := range n {
					mustAcquire(b, ss[i%guests], reqs[i%files])
				}
				rss1, heap1, slab1 := memNow()
				if st := c.Stats(); st.Leases != n || st.Files != files {
					b.Fatalf("stats %+v", st)
				}
				b.ReportMetric(float64(rss1-rss0)/float64(n), "rss-B/lease")
				b.ReportMetric(float64(heap1-heap0)/float64(n), "heap-B/lease")
				b.ReportMetric(float64(slab1-slab0)/float64(n), "kernel-slab-B/lease")
				for _, s := range ss {
					s.Close()
				}
				for c.held.Load() != 0 {
					time.Sleep(10 * time.Millisecond)
				}
			}
		})
	}
}

func memNow() (rss, heap, slab int64) {
	debug.FreeOSMemory() // so that the resident set shows what is in use
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	if b, err := os.ReadFile("/proc/self/statm"); err == nil {
		f := strings.Fields(string(b))
		pages, _ := strconv.ParseInt(f[1], 10, 64)
		rss = pages * int64(os.Getpagesize())
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "Slab:" {
				kb, _ := strconv.ParseInt(f[1], 10, 64)
				slab = kb << 10
			}
		}
	}
	return rss, int64(ms.HeapInuse), slab
}

// BenchmarkJournal measures what the lease journal adds to a lease
// acquired and released (of a file nobody else holds: the journal writes
// its file, grant, drop and release lines), with and without it.
func BenchmarkJournal(b *testing.B) {
	const files = 4096
	dir, reqs := benchFS(b, files, 256)
	for _, on := range []bool{false, true} {
		name := "off"
		cfg := Config{}
		if on {
			name, cfg.Journal = "on", filepath.Join(b.TempDir(), "bench.leases")
		}
		b.Run(name, func(b *testing.B) {
			c := coordinator(b, dir, cfg)
			s := session(b, c, "g", func([]ID) {})
			i := 0
			for b.Loop() {
				id := mustAcquire(b, s, reqs[i%files])
				if err := s.Release(id); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}

// BenchmarkTakeOver measures a successor taking over files held by
// leases (an upgrade's exec, played in one process): per file, the
// checks against the journal, the lease taken again, the inotify watch.
func BenchmarkTakeOver(b *testing.B) {
	const files = 8000 // held twice at the handover: within a limit of 20,000 fds
	dir, reqs := benchFS(b, files, 512)
	journal := filepath.Join(b.TempDir(), "bench.leases")
	c, err := New(Config{Root: dir, Journal: journal, MaxFiles: 2 * files})
	if err != nil {
		b.Fatal(err)
	}
	s := session(b, c, "g", func([]ID) {})
	for _, r := range reqs {
		mustAcquire(b, s, r)
	}
	for b.Loop() {
		fds, release := c.Handover()
		held := map[uint32]int{}
		for ino, fd := range fds {
			d, err := unix.Dup(fd)
			if err != nil {
				b.Fatal(err)
			}
			held[ino] = d
		}
		release()
		c.Leave()
		if c, err = New(Config{Root: dir, Journal: journal, Held: held, Successor: true, MaxFiles: 2 * files}); err != nil {
			b.Fatal(err)
		}
		if st := c.Stats(); st.Files != files || st.Leases != files {
			b.Fatalf("took over %+v", st)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*files), "ns/file")
	c.Close()
}
