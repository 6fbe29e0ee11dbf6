package guestagent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/internal/directio"
	"github.com/leasefs/leasefs/internal/hosttest"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
	"github.com/leasefs/leasefs/vsockproto"
)

// TestMain doubles as the in-process host's helper processes
// (hosttest.Roles): its freeze's watchdog, and a writer on the host.
func TestMain(m *testing.M) {
	testenv.RunHelper(hosttest.Roles)
	os.Exit(m.Run())
}

// host is a host agent in this process (hosttest.InProcess).
type host = hosttest.InProcess

func startHost(t testing.TB, ackTimeout time.Duration) *host {
	t.Helper()
	return hosttest.StartInProcess(t, &host{AckTimeout: ackTimeout})
}

func startHostGrace(t testing.TB, ackTimeout, grace time.Duration) *host {
	t.Helper()
	return hosttest.StartInProcess(t, &host{AckTimeout: ackTimeout, Grace: grace})
}

// testLogger logs to the test's output when run with -v.
func testLogger(t testing.TB) hclog.Logger {
	if !testing.Verbose() {
		return hclog.NewNullLogger()
	}
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Debug, Output: os.Stderr})
}

// guestMount is a guest agent in this process with its FUSE mount.
type guestMount struct {
	c    *Client
	dir  string
	stop func() // unmounts and disconnects; also run when the test ends
}

func startGuest(t testing.TB, h *host, device string) *guestMount {
	t.Helper()
	return startGuestFollowing(t, h, device, Follow{})
}

func startGuestFollowing(t testing.TB, h *host, device string, follow Follow) *guestMount {
	t.Helper()
	return startGuestWith(t, h, ClientConfig{Device: device, Follow: follow, OpenWait: 3 * time.Second})
}

// startGuestWith starts a guest of h configured by cfg (its address and
// export are h's; its logger, if unset, the test's).
func startGuestWith(t testing.TB, h *host, cfg ClientConfig) *guestMount {
	t.Helper()
	return startGuestNotifying(t, h, cfg, nil)
}

// startGuestNotifying is startGuestWith whose client tells the kernel
// through wrap(the mount), when wrap is set.
func startGuestNotifying(t testing.TB, h *host, cfg ClientConfig, wrap func(Notifier) Notifier) *guestMount {
	t.Helper()
	g, srv, attach := mountGuest(t, h, cfg)
	var n Notifier = srv
	if wrap != nil {
		n = wrap(n)
	}
	attach(n)
	return g
}

// mountGuest mounts a guest of h configured by cfg, and returns it with
// its FUSE server and what attaches the client to it (through n) and
// runs it. The mount serves at once; the test attaches when it will.
func mountGuest(t testing.TB, h *host, cfg ClientConfig) (g *guestMount, srv *fuse.Server, attach func(n Notifier)) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cfg.Addr, cfg.Export = h.Addr, "test"
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	c, err := NewClient(ctx, cfg)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	dir := t.TempDir()
	if srv, err = Mount(c.FileSystem(), dir, MountConfig{FsName: "guest"}); err != nil {
		cancel()
		c.Close()
		t.Fatal(err)
	}
	var running sync.WaitGroup
	var once sync.Once
	stop := func() {
		once.Do(func() {
			srv.Unmount()
			cancel()
			running.Wait()
			c.Close() // for a client never run; a second Close does nothing
		})
	}
	t.Cleanup(stop)
	attach = func(n Notifier) {
		c.Attach(n)
		running.Go(func() { c.Run(ctx) })
	}
	return &guestMount{c: c, dir: dir, stop: stop}, srv, attach
}

// openInGuests opens name in each guest; the files close when t ends.
func openInGuests(t *testing.T, guests []*guestMount, name string) []*os.File {
	t.Helper()
	var fs []*os.File
	for _, g := range guests {
		f, err := os.Open(filepath.Join(g.dir, name))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		fs = append(fs, f)
	}
	return fs
}

func (g *guestMount) waitFor(t *testing.T, gen uint64) {
	t.Helper()
	for i := 0; i < 500 && g.c.Generation() < gen; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if got := g.c.Generation(); got < gen {
		t.Fatalf("guest on generation %d, want %d", got, gen)
	}
}

func (g *guestMount) read(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(g.dir, name))
	if err != nil {
		t.Fatalf("guest read %s: %v", name, err)
	}
	return string(b)
}

// Two guests, one reading data from the shared device and one over the
// connection, follow the host's generations: replaced, new and removed
// files show exactly at the generation that has them, through the
// kernel's caches.
func TestGuestsFollowGenerations(t *testing.T) {
	h := startHost(t, 3*time.Second)
	h.Write(t, "stay", "unchanged")
	h.Write(t, "swap", "version 1")
	h.Write(t, "gone", "doomed")
	os.Mkdir(filepath.Join(h.Mnt, "dir"), 0o755)
	g1 := h.Publish(t)
	guests := []*guestMount{startGuest(t, h, h.Img), startGuest(t, h, "")}
	for _, g := range guests {
		if g.read(t, "swap") != "version 1" || g.read(t, "stay") != "unchanged" {
			t.Fatal("first generation not served")
		}
		// Cache a miss, a listing and attributes in the kernel.
		if _, err := os.Stat(filepath.Join(g.dir, "new")); !os.IsNotExist(err) {
			t.Fatalf("new before it exists: %v", err)
		}
		os.ReadDir(filepath.Join(g.dir, "dir"))
	}

	h.Replace(t, "swap", "version 2, longer")
	h.Write(t, "new", "fresh")
	h.Write(t, "dir/inner", "in dir")
	os.Remove(filepath.Join(h.Mnt, "gone"))
	// Not yet published: the guests still see generation 1.
	for _, g := range guests {
		if _, err := os.Stat(filepath.Join(g.dir, "new")); !os.IsNotExist(err) || g.read(t, "stay") != "unchanged" {
			t.Fatalf("a guest saw an unpublished change: %v", err)
		}
	}
	g2 := h.Publish(t)
	if g2 != g1+1 {
		t.Fatalf("generation %d after %d", g2, g1)
	}
	for i, g := range guests {
		g.waitFor(t, g2)
		if got := g.read(t, "swap"); got != "version 2, longer" {
			t.Fatalf("guest %d: swap = %q", i, got)
		}
		if got := g.read(t, "new"); got != "fresh" {
			t.Fatalf("guest %d: new = %q", i, got)
		}
		if _, err := os.Stat(filepath.Join(g.dir, "gone")); !os.IsNotExist(err) {
			t.Fatalf("guest %d: removed file: %v", i, err)
		}
		names, _ := os.ReadDir(filepath.Join(g.dir, "dir"))
		if len(names) != 1 || names[0].Name() != "inner" {
			t.Fatalf("guest %d: dir lists %v", i, names)
		}
		if g.read(t, "stay") != "unchanged" {
			t.Fatal("unchanged file changed")
		}
	}
}

// A file open in a guest keeps its bytes when the host deletes it and
// fills the filesystem with other data.
func TestOpenFileSurvivesDeletion(t *testing.T) {
	h := startHost(t, 3*time.Second)
	want := bytes.Repeat([]byte("original bytes "), 200000) // 3 MB
	if err := os.WriteFile(filepath.Join(h.Mnt, "big"), want, 0o644); err != nil {
		t.Fatal(err)
	}
	h.Publish(t)
	guests := []*guestMount{startGuest(t, h, h.Img), startGuest(t, h, "")}
	fs := openInGuests(t, guests, "big")
	os.Remove(filepath.Join(h.Mnt, "big"))
	junk := bytes.Repeat([]byte{0xEE}, 1<<20)
	for i := 0; ; i++ {
		if err := os.WriteFile(filepath.Join(h.Mnt, fmt.Sprint("junk", i)), junk, 0o644); err != nil {
			break
		}
	}
	syscall.Sync()
	gen := h.Publish(t)
	for i, g := range guests {
		g.waitFor(t, gen)
		got := make([]byte, len(want)+10)
		n, err := fs[i].ReadAt(got, 0)
		if !bytes.Equal(got[:n], want) {
			t.Fatalf("guest %d read %d bytes (%v), equal %v", i, n, err, bytes.Equal(got[:n], want))
		}
		if _, err := os.Stat(filepath.Join(g.dir, "big")); !os.IsNotExist(err) {
			t.Fatalf("guest %d still sees the name: %v", i, err)
		}
	}
}

// An in-place host writer waits until both guests have acknowledged;
// their open files are then stale, and after the next generation they
// read the new content.
func TestInPlaceWriterWaitsForGuests(t *testing.T) {
	h := startHost(t, 20*time.Second)
	h.Write(t, "f", "old content")
	h.Publish(t)
	guests := []*guestMount{startGuest(t, h, h.Img), startGuest(t, h, "")}
	fs := openInGuests(t, guests, "f")
	start := time.Now()
	h.WriteInPlace(t, "f", "new content")
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("the writer waited %v: the guests did not acknowledge", d)
	}
	for i, f := range fs {
		if _, err := f.ReadAt(make([]byte, 4), 0); !errors.Is(err, syscall.ESTALE) {
			t.Fatalf("guest %d: read after the break: %v, want ESTALE", i, err)
		}
	}
	gen := h.Publish(t)
	for i, g := range guests {
		g.waitFor(t, gen)
		if got := g.read(t, "f"); got != "new content" {
			t.Fatalf("guest %d: %q", i, got)
		}
	}
}

// A break whose invalidation the kernel refuses is reported: the kernel
// may go on serving the pages it cached of the fenced file.
func TestRefusedInvalidationIsReported(t *testing.T) {
	h := startHost(t, 20*time.Second)
	h.Write(t, "f", "old content")
	h.Publish(t)
	g := startGuestNotifying(t, h, ClientConfig{Device: h.Img}, func(n Notifier) Notifier { return refusing{n} })
	f := openInGuests(t, []*guestMount{g}, "f")[0]
	if _, err := f.ReadAt(make([]byte, 4), 0); err != nil {
		t.Fatal(err)
	}
	h.WriteInPlace(t, "f", "new content")
	for i := 0; !strings.Contains(g.c.Status().LastError, "invalidation of inode"); i++ {
		if i == 500 {
			t.Fatalf("no error reported; last: %q", g.c.Status().LastError)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A break that comes between the mount and Attach (the mount serves,
// and the kernel caches, from the moment it is made) is not lost: the
// file's cached pages are dropped once the client can tell the kernel.
func TestBreakBeforeAttachIsNotLost(t *testing.T) {
	h := startHost(t, 20*time.Second)
	h.Write(t, "f", "old content")
	h.Publish(t)
	g, srv, attach := mountGuest(t, h, ClientConfig{Device: h.Img})
	f := openInGuests(t, []*guestMount{g}, "f")[0]
	if _, err := f.ReadAt(make([]byte, 4), 0); err != nil {
		t.Fatal(err)
	}
	h.WriteInPlace(t, "f", "new content")
	attach(srv)
	var rerr error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if _, rerr = f.ReadAt(make([]byte, 4), 0); errors.Is(rerr, syscall.ESTALE) {
			return
		}
	}
	t.Fatalf("the broken file still reads from the kernel's cache (%v): its invalidation was lost", rerr)
}

// refusing is a Notifier whose kernel refuses inode invalidations.
type refusing struct{ Notifier }

func (refusing) InodeNotify(uint64, int64, int64) fuse.Status { return fuse.EIO }

// A file rewritten in place on the host but not yet published cannot be
// read at the guest's generation (its blocks hold other bytes). When the
// host publishes on its own, an open waits for the generation that has
// the change and reads what that has. (A file replaced by a rename is
// another matter: its old inode, held, reads as the generation has it.)
func TestOpenOfReplacedFileWaitsForNextGeneration(t *testing.T) {
	// Quiet long enough that the writer (another process, which waits
	// for the lease break) is done well before the publish.
	h := &host{Auto: &hostagent.AutoPublish{Quiet: 2 * time.Second, Max: 4 * time.Second}}
	h = hosttest.StartInProcess(t, h)
	h.Write(t, "f", "before")
	h.Publish(t)
	g := startGuestWith(t, h, ClientConfig{Device: h.Img}) // OpenWait from the host's policy
	if g.read(t, "f") != "before" {
		t.Fatal("first generation")
	}
	gen := g.c.Generation()
	h.WriteInPlace(t, "f", "after")
	start := time.Now()
	got := g.read(t, "f")
	if got != "after" || time.Since(start) < 200*time.Millisecond || g.c.Generation() == gen {
		t.Fatalf("read %q after %v, on generation %d", got, time.Since(start), g.c.Generation())
	}
}

// When the host publishes only when told, an open of a file that changed
// since the guest's generation fails at once with ESTALE, and one log
// line names the path, the generation and why.
func TestOpenOfChangedFileFailsAtOnceWithExplicitPublishing(t *testing.T) {
	h := startHost(t, 3*time.Second)
	h.Write(t, "f", "before")
	gen := h.Publish(t)
	var log testenv.SyncBuffer
	g := startGuestWith(t, h, ClientConfig{Device: h.Img, OpenWait: time.Minute,
		Logger: hclog.New(&hclog.LoggerOptions{Output: &log, Level: hclog.Info})})
	if g.read(t, "f") != "before" {
		t.Fatal("first generation")
	}
	h.WriteInPlace(t, "f", "after")
	start := time.Now()
	_, err := os.ReadFile(filepath.Join(g.dir, "f"))
	if !errors.Is(err, syscall.ESTALE) || time.Since(start) > time.Second {
		t.Fatalf("open after %v: %v, want ESTALE at once", time.Since(start), err)
	}
	line := log.String()
	for _, want := range []string{"open refused", "path=/f", fmt.Sprintf("at generation %d", gen), "publishes only when told"} {
		if !strings.Contains(line, want) {
			t.Fatalf("the log does not say %q:\n%s", want, line)
		}
	}
	h.Publish(t)
	g.waitFor(t, gen+1)
	if got := g.read(t, "f"); got != "after" {
		t.Fatalf("after the publish: %q", got)
	}
}

// The host agent restarts: guests reconnect and go on with the new
// agent's generations; files they had open under the old agent's leases
// are ESTALE (their blocks may have been freed), never different bytes.
func TestHostRestart(t *testing.T) {
	h := startHost(t, 3*time.Second)
	h.Write(t, "a", "one")
	h.Write(t, "b", "two")
	h.Publish(t)
	g := startGuest(t, h, h.Img)
	f, err := os.Open(filepath.Join(g.dir, "a"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(make([]byte, 3), 0); err != nil {
		t.Fatal(err)
	}
	h.Shutdown()
	h.Write(t, "c", "three")
	h.Serve(t, false)
	gen := h.Publish(t)
	g.waitFor(t, gen)
	if _, err := f.ReadAt(make([]byte, 3), 0); !errors.Is(err, syscall.ESTALE) {
		t.Fatalf("a file open across the restart: %v, want ESTALE", err)
	}
	if g.read(t, "b") != "two" || g.read(t, "c") != "three" || g.read(t, "a") != "one" {
		t.Fatal("the guest does not read the new agent's generation")
	}
}

// --follow manual stays on its generation until told; interval moves at
// most once per interval, to the newest.
func TestFollowPolicies(t *testing.T) {
	h := startHost(t, 3*time.Second)
	h.Write(t, "v", "1")
	g1 := h.Publish(t)
	manual := startGuestFollowing(t, h, h.Img, Follow{Manual: true})
	interval := startGuestFollowing(t, h, h.Img, Follow{Interval: 700 * time.Millisecond})
	always := startGuest(t, h, h.Img)
	h.Write(t, "w", "new")
	g2 := h.Publish(t)
	always.waitFor(t, g2)
	time.Sleep(100 * time.Millisecond)
	if manual.c.Generation() != g1 {
		t.Fatalf("manual guest moved to %d", manual.c.Generation())
	}
	if _, err := os.Stat(filepath.Join(manual.dir, "w")); !os.IsNotExist(err) {
		t.Fatalf("manual guest sees the new file: %v", err)
	}
	h.Write(t, "x", "newer")
	g3 := h.Publish(t)
	interval.waitFor(t, g3) // within its interval, straight to the newest
	manual.c.Refresh()
	if manual.c.Generation() != g3 || manual.read(t, "x") != "newer" {
		t.Fatalf("after Refresh the manual guest is on %d", manual.c.Generation())
	}
}

// A guest that goes away without releasing its leases loses them after
// the grace period.
func TestVanishedGuestLeasesExpire(t *testing.T) {
	h := startHostGrace(t, 3*time.Second, 300*time.Millisecond)
	h.Write(t, "f", "held")
	h.Publish(t)
	g := startGuest(t, h, "")
	openInGuests(t, []*guestMount{g}, "f")
	leases := func() int { return h.Srv.Status().Exports[0].Leases }
	if leases() != 1 {
		t.Fatalf("%d leases held", leases())
	}
	g.c.Close() // gone, without a word
	for i := 0; i < 300 && leases() != 0; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if n := leases(); n != 0 {
		t.Fatalf("%d leases left after the grace period", n)
	}
}

// copyAtFreeze has each publish from now on copy the device while it is
// frozen, to a file whose name it sets *snap to.
func copyAtFreeze(t *testing.T, h *host, snap *string) {
	h.OnFrozen = func() {
		*snap = filepath.Join(t.TempDir(), "frozen.img")
		dev, err := directio.Open(h.Dev)
		if err != nil {
			t.Error(err)
			return
		}
		defer dev.Close()
		f, err := os.Create(*snap)
		if err != nil {
			t.Error(err)
			return
		}
		defer f.Close()
		if _, err := io.Copy(f, io.NewSectionReader(dev, 0, dev.Size())); err != nil {
			t.Error(err)
		}
	}
}

// For several generations, what a guest shows equals the kernel's
// read-only mount of a copy of the device taken during that
// generation's freeze: names, attributes, xattrs, bytes.
func TestGuestViewEqualsFrozenCopy(t *testing.T) {
	h := startHost(t, 3*time.Second)
	imgtest.Populate(t, h.Mnt, imgtest.TreeSpec{Seed: 21, BlockSize: 4096, ManyEntries: 800, NanoTimes: true})
	var snap string
	copyAtFreeze(t, h, &snap)
	gen := h.Publish(t)
	// The third reads through a metadata cache of 16 blocks: most of what
	// it reads, it has to fetch again.
	guests := []*guestMount{startGuest(t, h, h.Img), startGuest(t, h, ""), startGuestWith(t, h, ClientConfig{Device: h.Img, CacheBytes: 1})}
	for round := range 3 {
		if round > 0 {
			h.Write(t, fmt.Sprint("round", round), strings.Repeat("r", 5000*round))
			os.Remove(filepath.Join(h.Mnt, "many", fmt.Sprint("entry-", round)))
			os.Mkdir(filepath.Join(h.Mnt, fmt.Sprint("dir", round)), 0o750)
			syscall.Setxattr(filepath.Join(h.Mnt, fmt.Sprint("round", round)), "user.round", []byte{byte(round)}, 0)
			gen = h.Publish(t)
		}
		kernel := imgtest.KernelMount(t, snap, "ro,noload")
		want := imgtest.Snapshot(t, kernel)
		for i, g := range guests {
			g.waitFor(t, gen)
			t.Run(fmt.Sprintf("generation %d guest %d", gen, i), func(t *testing.T) {
				imgtest.Compare(t, want, imgtest.Snapshot(t, g.dir))
				imgtest.CompareReads(t, kernel, g.dir, want, gen)
			})
		}
		imgtest.Unmount(t, kernel)
	}
}

// A dropped connection is re-established and the session resumed: files
// open across the reconnect keep their leases and keep reading.
func TestReconnectResumesSession(t *testing.T) {
	h := startHost(t, 3*time.Second)
	h.Write(t, "f", "still here")
	h.Publish(t)
	g := startGuest(t, h, "")
	f := openInGuests(t, []*guestMount{g}, "f")[0]
	g.c.mu.Lock()
	conn := g.c.sess.conn
	g.c.mu.Unlock()
	conn.Close() // as if the transport reset
	for i := 0; i < 500; i++ {
		g.c.mu.Lock()
		again := g.c.sess.conn != nil && g.c.sess.conn != conn
		g.c.mu.Unlock()
		if again {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	buf := make([]byte, 10)
	if n, err := f.ReadAt(buf, 0); n != 10 || string(buf) != "still here" {
		t.Fatalf("after the reconnect: %q, %v", buf[:n], err)
	}
	if n := h.Srv.Status().Exports[0].Leases; n != 1 {
		t.Fatalf("%d leases on the host, want the resumed one", n)
	}
}

// A guest that stops reading its connection delays neither a publish nor
// the other guests, also once its socket is full: each publish here lists
// 2,000 new inodes, so the announcements to it soon fill its buffers.
func TestStuckGuestDelaysNoOne(t *testing.T) {
	h := startHost(t, 3*time.Second)
	h.Write(t, "a", "1")
	h.Publish(t)
	stuck, err := vsockproto.Dial(context.Background(), h.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Close()
	stuck.Write(vsockproto.AppendFrame(nil, 1, &vsockproto.Hello{Version: 1, MaxFrame: vsockproto.MaxFrame, Export: "test"}))
	// ... and never reads again, not even the Welcome.
	g := startGuest(t, h, "")
	for round := range 40 {
		dir := filepath.Join(h.Mnt, fmt.Sprint("d", round))
		os.Mkdir(dir, 0o755)
		for i := range 2000 {
			os.WriteFile(filepath.Join(dir, fmt.Sprint(i)), nil, 0o644)
		}
		start := time.Now()
		gen := h.Publish(t)
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("publish %d took %v", gen, d)
		}
		g.waitFor(t, gen)
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("generation %d reached the guest after %v", gen, d)
		}
	}
}

// A listing in progress when the guest moves to a generation that changes
// the directory goes on in the generation it began in: every name of
// that generation once, none of the new one's (the guest opens no
// directories, so the listing's cookies carry its generation).
func TestListingStaysInItsGeneration(t *testing.T) {
	h := startHost(t, 3*time.Second)
	dir := filepath.Join(h.Mnt, "many")
	os.Mkdir(dir, 0o755)
	want := map[string]bool{}
	for i := range 3000 {
		name := fmt.Sprintf("old-%04d-%s", i, strings.Repeat("x", i%40))
		os.WriteFile(filepath.Join(dir, name), nil, 0o644)
		want[name] = true
	}
	gen := h.Publish(t)
	g := startGuest(t, h, "")
	fd, err := syscall.Open(filepath.Join(g.dir, "many"), syscall.O_RDONLY|syscall.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	seen := map[string]int{}
	buf := make([]byte, 2048)
	read := func() int {
		n, err := syscall.Getdents(fd, buf)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		_, _, names = syscall.ParseDirent(buf[:n], -1, names)
		for _, name := range names {
			seen[name]++
		}
		return n
	}
	read()
	// The host removes half of them and adds as many; the guest moves.
	for i := range 1500 {
		os.Remove(filepath.Join(dir, fmt.Sprintf("old-%04d-%s", 2*i, strings.Repeat("x", (2*i)%40))))
		os.WriteFile(filepath.Join(dir, fmt.Sprint("new-", i)), nil, 0o644)
	}
	g.waitFor(t, h.Publish(t))
	if g.c.Generation() <= gen {
		t.Fatal("the guest did not move")
	}
	t0 := time.Now()
	calls := 0
	for read() > 0 {
		calls++
	}
	t.Logf("rest of the listing: %d getdents in %v", calls, time.Since(t0))
	for name, n := range seen {
		if n > 1 {
			t.Errorf("%s listed %d times", name, n)
		}
		if !want[name] {
			t.Errorf("%s listed: not in the generation the listing began in", name)
		}
	}
	if len(seen) != len(want) {
		t.Errorf("%d names listed, the generation the listing began in has %d", len(seen), len(want))
	}
	// A new listing shows the new generation.
	t0 = time.Now()
	names, _ := os.ReadDir(filepath.Join(g.dir, "many"))
	t.Logf("a new listing: %v", time.Since(t0))
	if len(names) != 3000 || !strings.HasPrefix(names[len(names)-1].Name(), "old-") && !strings.HasPrefix(names[0].Name(), "new-") {
		t.Fatalf("a new listing has %d names", len(names))
	}
}

// A listing begun in one generation goes on after the host dropped that
// generation (the guest moved on twice): in the current view, from the
// same position, every name the directory still has seen once — not
// ESTALE.
func TestListingGoesOnAfterItsGenerationIsGone(t *testing.T) {
	h := startHost(t, 3*time.Second)
	if err := os.Mkdir(filepath.Join(h.Mnt, "d"), 0o755); err != nil {
		t.Fatal(err)
	}
	const n = 300
	for i := range n {
		h.Write(t, fmt.Sprintf("d/f%03d", i), "x")
	}
	gen := h.Publish(t)
	g := startGuest(t, h, "")
	g.waitFor(t, gen)
	f, err := os.Open(filepath.Join(g.dir, "d"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	seen := map[string]int{}
	getdents := func() int {
		t.Helper()
		buf := make([]byte, 1024) // a few entries at a time
		m, err := unix.Getdents(int(f.Fd()), buf)
		if err != nil {
			t.Fatalf("getdents: %v", err)
		}
		_, _, names := unix.ParseDirent(buf[:m], -1, nil)
		for _, name := range names {
			seen[name]++
		}
		return m
	}
	getdents()
	for i := range 3 { // the host drops the generation the listing began in
		h.Write(t, fmt.Sprintf("d/new%d", i), "x")
		g.waitFor(t, h.Publish(t))
	}
	for getdents() > 0 {
	}
	for i := range n {
		if name := fmt.Sprintf("f%03d", i); seen[name] != 1 {
			t.Fatalf("%s listed %d times", name, seen[name])
		}
	}
}

// Metadata read from the device is the generation's or none: the host
// adds to the tree after the publish, and a guest that mounts
// then reads through the same device exactly the frozen tree. It read
// most blocks from the device and checked them; those the writes changed
// did not check and came from the host.
func TestMetadataFromTheDeviceIsChecked(t *testing.T) {
	h := startHost(t, 3*time.Second)
	imgtest.Populate(t, h.Mnt, imgtest.TreeSpec{Seed: 5, BlockSize: 4096, ManyEntries: 600, NanoTimes: true})
	var snap string
	copyAtFreeze(t, h, &snap)
	gen := h.Publish(t)
	h.OnFrozen = nil
	// Not published: on the device only. (New names only: a file the
	// generation has that changed could not be opened, by the lease
	// contract, and the comparison reads every file.)
	for i := range 600 {
		if err := os.WriteFile(filepath.Join(h.Mnt, "many", fmt.Sprint("later-with-a-longer-name-", i)), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 50 {
		os.Mkdir(filepath.Join(h.Mnt, fmt.Sprint("new-", i)), 0o755)
	}
	if err := exec.Command("sync", "-f", h.Mnt).Run(); err != nil {
		t.Fatal(err)
	}
	g := startGuest(t, h, h.Img)
	g.waitFor(t, gen)
	kernel := imgtest.KernelMount(t, snap, "ro,noload")
	want := imgtest.Snapshot(t, kernel)
	imgtest.Compare(t, want, imgtest.Snapshot(t, g.dir))
	imgtest.CompareReads(t, kernel, g.dir, want, gen)
	st := g.c.Status().Cache
	t.Logf("from the device %d blocks, unchecked %d, windows of digests %d", st.FromDevice, st.Unchecked, st.DigestWindows)
	if st.FromDevice == 0 || st.Unchecked == 0 {
		t.Errorf("blocks read from the device %d, of which did not check %d: want both", st.FromDevice, st.Unchecked)
	}
}
