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
	notify   Notifier      // set by Attach, then the switcher's alone
	attached chan struct{} // closed by Attach: the switcher starts then
	kick     chan struct{} // wakes the switcher
	done     chan struct{} // closed by Close
	started  time.Time

	mu      sync.Mutex
	changed *sync.Cond // broadcast when conn, latest, cur or closed change

	// live is the session while it is up, for reads of the device
	// (holding.go); set and cleared with conn.
	live atomic.Pointer[liveSession]

	// The session (session.go), guarded by mu.
	conn *vsockproto.Conn // nil while disconnected
	lost time.Time        // when the last connection ended
	gone string           // why the host no longer serves the export, if it said so
	// downAfterWait: a wait for the host timed out since the last
	// connection (DownPolicy): requests fail at once until the next.
	downAfterWait bool
	token         vsockproto.Token
	policy        publishPolicy
	connected     time.Time
	reconnects    int
	resumes       int
	device        DeviceStatus // verify.go
	lastErr       string
	lastErrAt     time.Time

	// Switching (switcher.go), guarded by mu.
	cur         *genView                // the generation served
	views       map[*ext4ro.FS]*genView // the readers of recent generations
	latest      uint64                  // the newest generation the host announced
	latestLabel string                  // latest's label, as the host published it
	pinned      uint64                  // the generation the mount stays on (ClientConfig.Pin); 0 once it follows
	browse      map[uint64]*ext4ro.FS   // readers of kept generations, for .generations (browse.go)
	keptList    []vsockproto.KeptGeneration
	keptAt      time.Time   // when keptList was asked for
	pending     changes     // from cur to latest
	force       bool        // switch to latest whatever Follow says
	switched    time.Time   // the last switch
	timer       *time.Timer // a deferred switch (Follow.Interval)
	inval       []uint64    // nodes whose pages and attributes to drop

	// Open files (files.go), guarded by mu.
	files     map[uint64]*leasedFile // by lease id
	fenced    []FencedFile           // the latest, newest last
	idle      map[uint64]idleFile    // leases kept after their last close, by node (idle.go)
	idleTimer *time.Timer            // releases them

	closed bool // guarded by mu
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
	c := &Client{cfg: cfg, log: cfg.Logger, views: map[*ext4ro.FS]*genView{}, browse: map[uint64]*ext4ro.FS{}, files: map[uint64]*leasedFile{}, idle: map[uint64]idleFile{},
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
		if err := c.verifyDevice(f); err != nil {
			c.Close()
			return nil, err
		}
	}
	c.mu.Lock()
	c.cur, c.latest, c.switched = v, w.Generation, time.Now()
	if gen != w.Generation {
		c.pending.all = true // from a pinned generation: what changed since is not known
	}
	c.checkSwitcher()
	c.mu.Unlock()
	fs := NewFileSystem(f, Config{Timeout: cfg.Timeout, Files: c, NoOpenDir: true, DirectIO: cfg.PageCache == PageCacheHost,
		Generations: c, ShowGenerations: cfg.ShowGenerations, Logger: cfg.Logger})
	fs.SetView(f, uint32(gen))
	c.mu.Lock() // an announcement may be handled meanwhile (announced reads it)
	c.fs = fs
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
	c.notify = n
	close(c.attached)
}

// Generation returns the generation served.
func (c *Client) Generation() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cur.gen
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
	conn := c.conn
	c.conn = nil
	c.live.Store(nil)
	if c.timer != nil {
		c.timer.Stop()
	}
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
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

// open opens an ext4ro reader over v and remembers which generation it
// reads, for opens of its files.
func (c *Client) open(v *genView) (*ext4ro.FS, error) {
	v.sb = make([]byte, superblockSize)
	if _, err := v.ReadAt(v.sb, superblockAt); err != nil {
		return nil, err
	}
	opts := &ext4ro.Options{}
	if c.data != nil {
		opts.Data = c.data
	}
	f, err := ext4ro.Open(v, opts)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.views[f] = v
	c.mu.Unlock()
	return f, nil
}

// viewOf returns the view a reader of c.open reads, or nil if it is too
// old to be remembered.
func (c *Client) viewOf(f *ext4ro.FS) *genView {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.views[f]
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
