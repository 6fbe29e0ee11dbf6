package guestagent

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/hashicorp/go-hclog"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/internal/directio"
	"github.com/leasefs/leasefs/vsockproto"
)

// Follow says when a guest moves to a newer generation.
type Follow struct {
	Manual   bool          // only when told (Client.Refresh), or when an open needs it
	Interval time.Duration // at most once per Interval; 0 with !Manual: always
}

// ParseFollow parses "always", "interval=DURATION" or "manual".
func ParseFollow(s string) (Follow, error) {
	switch {
	case s == "always":
		return Follow{}, nil
	case s == "manual":
		return Follow{Manual: true}, nil
	case strings.HasPrefix(s, "interval="):
		d, err := time.ParseDuration(strings.TrimPrefix(s, "interval="))
		if err != nil || d <= 0 {
			return Follow{}, fmt.Errorf("%q: want a positive duration", s)
		}
		return Follow{Interval: d}, nil
	}
	return Follow{}, fmt.Errorf("%q: want always, interval=DURATION or manual", s)
}

func (f Follow) String() string {
	switch {
	case f.Manual:
		return "manual"
	case f.Interval > 0:
		return "interval=" + f.Interval.String()
	}
	return "always"
}

// PageCache is where a guest's file data is cached.
type PageCache string

// The page cache modes.
const (
	PageCacheGuest PageCache = "guest"
	PageCacheHost  PageCache = "host"
)

// ParsePageCache parses "guest" or "host".
func ParsePageCache(s string) (PageCache, error) {
	switch p := PageCache(s); p {
	case PageCacheGuest, PageCacheHost:
		return p, nil
	}
	return "", fmt.Errorf("%q: want guest or host", s)
}

// DefaultCacheBytes bounds the metadata cache unless told otherwise:
// enough for a cold walk of a large tree, small enough for a small VM.
const DefaultCacheBytes = 8 << 20

// ClientConfig configures a Client.
type ClientConfig struct {
	Addr   vsockproto.Addr
	Export string
	// Device is the shared read-only device (or image) file data is read
	// from, with O_DIRECT; without it data comes over the connection.
	// It is verified to hold the export's filesystem (verify.go).
	Device string
	Follow Follow
	// Pin, or PinLabel when Pin is 0, is a generation the host keeps
	// (host --keep-generations) to stay on instead of following: by
	// number, or the newest published with that label. The mount fails
	// if the host does not keep it; once mounted, the guest moves on only
	// when the host drops it (it says so first: Unpin).
	Pin      uint64
	PinLabel string
	// ShowGenerations lists .generations in the root directory (it is
	// there, but hidden, otherwise).
	ShowGenerations bool
	// OpenWait bounds how long an open of a file that changed on the
	// host waits for a generation that has the change, when the host
	// publishes on its own (0: the longest the host says a publish can
	// take, plus 5 s). When the host publishes only when told, such an
	// open fails at once.
	OpenWait time.Duration
	// Timeout is the FUSE entry and attribute timeout (1 h).
	Timeout time.Duration
	// Linger is how long a file's lease is kept after its last close,
	// for the next open of it (30 s if 0; negative: not kept).
	Linger time.Duration
	// CacheBytes bounds the metadata cache (DefaultCacheBytes).
	CacheBytes int64
	// PageCache says where file data is cached: PageCacheGuest (the
	// default) in this kernel's page cache, like any file's; PageCacheHost
	// nowhere here (FUSE direct I/O), the device being read so that only
	// the host caches it — with O_DIRECT on a block device (the VMM's
	// cache of the drive on the host), through the file's own page cache
	// on an image file (the host's, when the guest runs on the host).
	PageCache PageCache
	// Down says how long requests wait for a host that is down
	// (DefaultDown).
	Down   DownPolicy
	Conn   vsockproto.Options
	Logger hclog.Logger
}

// Notifier is what the client tells the kernel through: *fuse.Server.
type Notifier interface {
	InodeNotify(node uint64, off int64, length int64) fuse.Status
	EntryNotify(parent uint64, name string) fuse.Status
}

// Client is a guest's connection to its host and the generation view it
// serves through a FileSystem. See the package documentation for the
// model and the lock order.
type Client struct {
	cfg      ClientConfig
	log      hclog.Logger
	dev      *directio.File // nil: data over the connection
	meta     *os.File       // the device through this machine's page cache, for metadata (digests.go)
	devMeta  atomic.Bool    // metadata is read from the device: it verified
	devData  atomic.Bool    // file data is read from the device: it verified, or is not checked yet (deviceOK)
	data     io.ReaderAt    // what file data is read from: dev, or the image file through its page cache
	fs       *FileSystem
	cache    *metaCache
	m        *clientMetrics
	fetching *inFlight     // metadata blocks being fetched
	kernel   *kernel       // set by Attach, then the switcher's alone (kernel.go)
	attached chan struct{} // closed by Attach: the switcher starts then
	kick     chan struct{} // wakes the switcher
	done     chan struct{} // closed by Close
	started  time.Time

	// mu guards the session, the switching state and the open files,
	// and the fields below it. They are one lock's because a reconnect
	// changes the three at once: a session the host did not resume takes
	// every lease with it, and a host that lost the generation served
	// every view. Each is a type of its own, whose methods are called
	// with mu held.
	mu      sync.Mutex
	changed *sync.Cond // broadcast when the session, latest, cur or closed change

	// live is the session while it is up, for reads of the device
	// (holding.go); set and cleared with sess.conn.
	live atomic.Pointer[liveSession]

	sess      session      // the connection and what the host said (session.go)
	sw        switching    // the generations served, announced and browsed (switcher.go)
	files     openFiles    // the leases held, idle and fenced (files.go, idle.go)
	device    DeviceStatus // verify.go
	lastErr   string
	lastErrAt time.Time
	closed    bool // guarded by mu
}

// publishPolicy is how the host said it publishes.
type publishPolicy struct {
	known      bool // the host said (FeaturePublishPolicy)
	quiet, max time.Duration
}

func (p publishPolicy) String() string {
	switch {
	case !p.known:
		return "unknown"
	case p.max == 0:
		return "explicit (leasefs publish)"
	}
	return fmt.Sprintf("auto (quiet %v, at most %v)", p.quiet, p.max)
}

// changes accumulates what announcements said changed.
type changes struct {
	all    bool
	blocks []vsockproto.BlockRange
	inodes map[uint32]struct{}
}

func (ch *changes) add(a *vsockproto.Announce) {
	if a.Flags&vsockproto.AnnounceAll != 0 {
		ch.all = true
	}
	if ch.all {
		ch.blocks, ch.inodes = nil, nil
		return
	}
	ch.blocks = append(ch.blocks, a.Blocks...)
	if ch.inodes == nil {
		ch.inodes = map[uint32]struct{}{}
	}
	for _, ino := range a.Inodes {
		ch.inodes[ino] = struct{}{}
	}
}

// NewClient connects to the host, checks the device and opens the
// current generation. The FileSystem it returns is ready to mount; call
// Attach with the mount's server, then Run.
func NewClient(ctx context.Context, cfg ClientConfig) (*Client, error) {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = time.Hour
	}
	if cfg.Linger == 0 {
		cfg.Linger = defaultLinger
	}
	if cfg.CacheBytes <= 0 {
		cfg.CacheBytes = DefaultCacheBytes
	}
	if cfg.PageCache == "" {
		cfg.PageCache = PageCacheGuest
	}
	if !cfg.Down.Hard && cfg.Down.Timeout <= 0 {
		cfg.Down = DefaultDown
	}
	c := &Client{cfg: cfg, log: cfg.Logger, sw: switching{browse: map[uint64]servedView{}}, files: newOpenFiles(),
		kick: make(chan struct{}, 1), done: make(chan struct{}), attached: make(chan struct{}), started: time.Now(), fetching: newInFlight()}
	c.changed = sync.NewCond(&c.mu)
	c.m = newClientMetrics(c)
	if cfg.Device != "" {
		d, err := openDevice(cfg.Device)
		if err != nil {
			return nil, err
		}
		c.dev, c.data = d, d
		c.device = DeviceStatus{Path: cfg.Device, State: DeviceUnchecked}
		c.devData.Store(true)
		if c.meta, err = os.Open(cfg.Device); err != nil {
			d.Close()
			return nil, &DeviceError{cfg.Device, err}
		}
		if cfg.PageCache == PageCacheHost {
			if f, err := buffered(cfg.Device); err != nil {
				d.Close()
				c.meta.Close()
				return nil, err
			} else if f != nil {
				c.data = f
			}
		}
	}
	w, err := c.dial(ctx)
	if err != nil {
		c.Close()
		return nil, err
	}
	gen, label := w.Generation, w.Label
	if cfg.Pin != 0 || cfg.PinLabel != "" {
		if gen, label, err = c.pinnedFrom(w); err != nil {
			c.Close()
			return nil, err
		}
	}
	c.cache = newMetaCache(cfg.CacheBytes, int64(w.BlockSize), gen)
	v := &genView{c: c, gen: gen, label: label, bs: int64(w.BlockSize)}
	f, err := c.open(v)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("export %s, generation %d: %w", cfg.Export, gen, err)
	}
	if c.dev != nil {
		if err := c.verifyDevice(v, f); err != nil {
			c.Close()
			return nil, err
		}
	}
	c.mu.Lock()
	c.sw.start(v, w.Generation)
	c.mu.Unlock()
	fs := NewFileSystem(f, Config{Timeout: cfg.Timeout, Files: c, NoOpenDir: true, DirectIO: cfg.PageCache == PageCacheHost,
		Generations: c, ShowGenerations: cfg.ShowGenerations, Logger: cfg.Logger})
	fs.serve(f, uint32(gen), v)
	c.mu.Lock() // an announcement may be handled meanwhile (announced reads it)
	c.fs = fs
	c.checkSwitcher()
	c.mu.Unlock()
	go c.switcher()
	return c, nil
}

// FileSystem returns the FUSE file system to mount.
func (c *Client) FileSystem() *FileSystem { return c.fs }

// Attach gives the client the mounted server, to invalidate through,
// once, before Run. The mount serves from the moment it is made, so the
// kernel may cache what a break or a switch must drop before there is
// anything to tell it through: until Attach, the switcher keeps both
// waiting (a fence stops reads at once all the same).
func (c *Client) Attach(n Notifier) {
	c.kernel = &kernel{n: n, nodes: c.fs.nodes, count: c.m.inval, log: c.log, refused: c.noteError}
	close(c.attached)
}

// Generation returns the generation served.
func (c *Client) Generation() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sw.cur.gen
}

// Close disconnects for good.
func (c *Client) Close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	close(c.done)
	c.changed.Broadcast() // no one waits for a connection or a generation any more
	conn := c.sess.conn
	c.sess.conn = nil
	c.live.Store(nil)
	c.sw.stop()
	c.files.stop()
	c.mu.Unlock()
	if conn != nil {
		conn.Close()
	}
	if c.dev != nil {
		c.dev.Close()
		c.meta.Close()
	}
	if f, ok := c.data.(*os.File); ok {
		f.Close()
	}
}

// buffered opens the device through its page cache if it is a regular
// file (an image on the machine the guest runs on, whose page cache is
// the host's); nil for a block device, which is read with O_DIRECT.
func buffered(path string) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, err
	}
	return f, nil
}

// open opens an ext4ro reader over v.
func (c *Client) open(v *genView) (*ext4ro.FS, error) {
	v.sb = make([]byte, superblockSize)
	if _, err := v.ReadAt(v.sb, superblockAt); err != nil {
		return nil, err
	}
	opts := &ext4ro.Options{}
	if c.data != nil {
		opts.Data = c.data
	}
	return ext4ro.Open(v, opts)
}

// viewOf returns the generation a reader the mount served reads (a
// recent one, or one of .generations), or nil if it is too old to be
// remembered, or its generation is gone from the host.
func (c *Client) viewOf(f *ext4ro.FS) *genView {
	gv := c.fs.views.generationOf(f)
	if gv == nil {
		c.mu.Lock()
		gv = c.sw.browsed(f)
		c.mu.Unlock()
	}
	if gv != nil && gv.dead.Load() {
		return nil
	}
	return gv
}

// waitLocked waits, with c.mu held, until done, the client closes or the
// deadline (if not zero) passes.
func (c *Client) waitLocked(done func() bool, deadline time.Time) {
	for !done() && !c.closed && (deadline.IsZero() || time.Now().Before(deadline)) {
		if deadline.IsZero() { // for ever
			c.changed.Wait()
			continue
		}
		t := time.AfterFunc(time.Until(deadline), c.changed.Broadcast)
		c.changed.Wait()
		t.Stop()
	}
}

// noteError records err as the last error, for status.
func (c *Client) noteError(err error) {
	c.mu.Lock()
	c.lastErr, c.lastErrAt = err.Error(), time.Now()
	c.mu.Unlock()
}
