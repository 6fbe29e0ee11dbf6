package guestagent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/internal/directio"
	"github.com/leasefs/leasefs/layout"
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
			return Follow{}, fmt.Errorf("--follow %q: want a positive duration", s)
		}
		return Follow{Interval: d}, nil
	}
	return Follow{}, fmt.Errorf("--follow %q: want always, interval=DURATION or manual", s)
}

// ClientConfig configures a Client.
type ClientConfig struct {
	Addr   vsockproto.Addr
	Export string
	// Device is the shared read-only device (or image) file data is read
	// from, with O_DIRECT; without it data comes over the connection.
	Device   string
	Follow   Follow
	BusyWait time.Duration // how long an open waits for a busy file (10 s)
	Timeout  time.Duration // FUSE entry and attribute timeout (1 h)
	Conn     vsockproto.Options
	Logger   hclog.Logger
}

// Notifier is what the client tells the kernel through: *fuse.Server.
type Notifier interface {
	InodeNotify(node uint64, off int64, length int64) fuse.Status
	EntryNotify(parent uint64, name string) fuse.Status
}

// Client is a guest's connection to its host and the generation view it
// serves through a FileSystem. See the package documentation.
type Client struct {
	cfg    ClientConfig
	log    hclog.Logger
	dev    *directio.File // nil: data over the connection
	fs     *FileSystem
	notify Notifier
	m      *clientMetrics

	mu       sync.Mutex
	changed  *sync.Cond              // broadcast when conn, latest or cur change
	conn     *vsockproto.Conn        // nil while disconnected; guarded by mu
	token    vsockproto.Token        // guarded by mu
	cur      *genView                // the generation served; guarded by mu
	views    map[*ext4ro.FS]*genView // guarded by mu
	latest   uint64                  // newest generation announced; guarded by mu
	pending  changes                 // from cur to latest; guarded by mu
	switched time.Time               // last switch; guarded by mu
	timer    *time.Timer             // a deferred switch (interval); guarded by mu
	files    map[uint64]*leasedFile  // open files by lease id; guarded by mu
	switchMu sync.Mutex              // one switch at a time
	closed   bool                    // guarded by mu
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

// NewClient connects to the host and opens the current generation. The
// FileSystem it returns is ready to mount; call Attach with the mount's
// server, then Run.
func NewClient(ctx context.Context, cfg ClientConfig) (*Client, error) {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.BusyWait <= 0 {
		cfg.BusyWait = 10 * time.Second
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = time.Hour
	}
	c := &Client{cfg: cfg, log: cfg.Logger, views: map[*ext4ro.FS]*genView{}, files: map[uint64]*leasedFile{}}
	c.changed = sync.NewCond(&c.mu)
	c.m = newClientMetrics(c)
	if cfg.Device != "" {
		d, err := directio.Open(cfg.Device)
		if err != nil {
			return nil, err
		}
		c.dev = d
	}
	w, err := c.dial(ctx)
	if err != nil {
		c.Close()
		return nil, err
	}
	v := &genView{c: c, gen: w.Generation, bs: int64(w.BlockSize), blocks: map[uint64][]byte{}}
	f, err := c.open(v)
	if err != nil {
		c.Close()
		return nil, err
	}
	c.cur, c.latest, c.switched = v, w.Generation, time.Now()
	c.fs = NewFileSystem(f, Config{Timeout: cfg.Timeout, Files: c, Logger: cfg.Logger})
	return c, nil
}

// FileSystem returns the FUSE file system to mount.
func (c *Client) FileSystem() *FileSystem { return c.fs }

// Attach gives the client the mounted server, to invalidate through.
func (c *Client) Attach(n Notifier) { c.notify = n }

// Generation returns the generation served.
func (c *Client) Generation() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cur.gen
}

// Close disconnects for good.
func (c *Client) Close() {
	c.mu.Lock()
	c.closed = true
	c.changed.Broadcast() // no one waits for a connection or a generation any more
	conn := c.conn
	if c.timer != nil {
		c.timer.Stop()
	}
	c.mu.Unlock()
	if conn != nil {
		conn.Close()
	}
	if c.dev != nil {
		c.dev.Close()
	}
}

func (c *Client) features() vsockproto.Features {
	f := vsockproto.FeatureLayout | vsockproto.FeatureResume
	if c.dev == nil {
		f |= vsockproto.FeatureReadData
	}
	return f
}

// dial connects and runs the handshake, resuming the session if the
// host still has it.
func (c *Client) dial(ctx context.Context) (*vsockproto.Welcome, error) {
	c.mu.Lock()
	hello := vsockproto.Hello{Export: c.cfg.Export, Token: c.token, Features: c.features()}
	if c.cur != nil {
		hello.Generation = c.cur.gen
	}
	c.mu.Unlock()
	conn, w, err := vsockproto.DialHello(ctx, c.cfg.Addr, hello, c.handle, c.cfg.Conn)
	if err != nil {
		return nil, fmt.Errorf("connecting to %v: %w", c.cfg.Addr, err)
	}
	if c.dev == nil && !conn.Features().Has(vsockproto.FeatureReadData) {
		conn.Close()
		return nil, fmt.Errorf("the host does not serve file data, and no --device was given")
	}
	c.mu.Lock()
	c.conn, c.token = conn, w.Token
	if !w.Resumed {
		// Leases of an earlier session are gone: the host may have
		// freed what those files were.
		for id, lf := range c.files {
			lf.fence()
			delete(c.files, id)
		}
	}
	if c.cur != nil && w.Generation != c.cur.gen {
		c.latest = max(c.latest, w.Generation)
		c.pending.all = true // what changed meanwhile is not known
	}
	c.changed.Broadcast()
	c.mu.Unlock()
	return w, nil
}

// Run keeps the connection up, reconnecting with backoff, until ctx ends.
func (c *Client) Run(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for {
		c.mu.Lock()
		conn := c.conn
		c.mu.Unlock()
		if conn != nil {
			select {
			case <-ctx.Done():
				c.Close()
				return nil
			case <-conn.Done():
			}
			c.log.Warn("lost the host", "error", conn.Err())
			c.mu.Lock()
			if c.conn == conn {
				c.conn = nil
			}
			closed := c.closed
			c.mu.Unlock()
			if closed {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			c.Close()
			return nil
		case <-time.After(backoff):
		}
		if _, err := c.dial(ctx); err != nil {
			backoff = min(backoff*2, 5*time.Second)
			c.log.Debug("reconnecting", "error", err)
			continue
		}
		backoff = 100 * time.Millisecond
		c.m.reconnects.Inc()
		c.log.Info("reconnected to the host")
		c.follow()
	}
}

// call sends a request, waiting up to 10 s for a connection.
func (c *Client) call(m vsockproto.Message) (vsockproto.Message, error) {
	c.mu.Lock()
	c.waitLocked(func() bool { return c.conn != nil }, time.Now().Add(10*time.Second))
	conn := c.conn
	c.mu.Unlock()
	if conn == nil {
		return nil, fmt.Errorf("not connected to the host: %w", io.ErrUnexpectedEOF)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return conn.Call(ctx, m)
}

// handle answers the host's requests.
func (c *Client) handle(ctx context.Context, req vsockproto.Message) (vsockproto.Message, error) {
	switch m := req.(type) {
	case *vsockproto.Announce:
		c.mu.Lock()
		if m.Generation > c.latest {
			if m.Generation > c.latest+1 {
				c.pending.all = true // missed some
			}
			c.pending.add(m)
			c.latest = m.Generation
			c.changed.Broadcast()
		}
		c.mu.Unlock()
		c.follow()
		return &vsockproto.AnnounceAck{Generation: c.Generation()}, nil
	case *vsockproto.Break:
		for _, id := range m.Leases {
			c.mu.Lock()
			lf := c.files[id]
			delete(c.files, id)
			c.mu.Unlock()
			if lf != nil {
				c.m.breaks.Inc()
				lf.fence() // waits for reads in flight
				c.inval(lf.node)
			}
		}
		return &vsockproto.BreakAck{}, nil
	}
	return nil, vsockproto.Errorf(vsockproto.CodeNotSupported, "%v is not served by a guest", req.Type())
}

// follow moves to the newest generation as the policy says.
func (c *Client) follow() {
	c.mu.Lock()
	if c.cur == nil || c.latest <= c.cur.gen || c.cfg.Follow.Manual {
		c.mu.Unlock()
		return
	}
	wait := c.cfg.Follow.Interval - time.Since(c.switched)
	if wait > 0 {
		if c.timer == nil {
			c.timer = time.AfterFunc(wait, func() {
				c.mu.Lock()
				c.timer = nil
				c.mu.Unlock()
				c.Refresh()
			})
		}
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	c.Refresh()
}

// Refresh moves to the newest generation announced, if it is newer.
func (c *Client) Refresh() {
	c.switchMu.Lock()
	defer c.switchMu.Unlock()
	c.mu.Lock()
	old, target, ch := c.cur, c.latest, c.pending
	if target <= old.gen || c.closed {
		c.mu.Unlock()
		return
	}
	c.pending = changes{}
	c.mu.Unlock()

	nv := old.next(target, &ch)
	f, err := c.open(nv)
	if err != nil {
		c.log.Error("cannot read the new generation; staying", "generation", target, "error", err)
		c.mu.Lock()
		c.pending = changes{all: true}
		c.mu.Unlock()
		return
	}
	oldFS := c.fs.SetView(f)
	c.invalidate(oldFS, f, &ch)
	// Only now is the switch done: what the kernel cached of the old
	// view is gone.
	c.mu.Lock()
	c.cur, c.switched = nv, time.Now()
	c.m.switches.Inc()
	for v, gv := range c.views { // keep the readers of recent generations only
		if gv.gen+8 < nv.gen {
			delete(c.views, v)
		}
	}
	c.changed.Broadcast()
	c.mu.Unlock()
	c.log.Debug("switched generation", "from", old.gen, "to", target)
}

func (c *Client) open(v *genView) (*ext4ro.FS, error) {
	opts := &ext4ro.Options{CacheBytes: 4 << 20}
	if c.dev != nil {
		opts.Data = c.dev
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

// invalidate tells the kernel what changed between two views: changed
// inodes' attributes and pages, and the names that went, came or now
// name another inode in changed directories. It runs outside any FUSE
// request and holds none of our locks.
func (c *Client) invalidate(oldFS, newFS *ext4ro.FS, ch *changes) {
	if c.notify == nil {
		return
	}
	var inos []uint32
	if ch.all {
		for _, id := range c.fs.Known() {
			if ino, _, _ := splitNodeID(id); ino != 0 {
				inos = append(inos, ino)
			}
		}
		inos = append(inos, ext4ro.RootIno)
	} else {
		for ino := range ch.inodes {
			inos = append(inos, ino)
		}
	}
	for _, ino := range inos {
		// The kernel knows the inode as the old view had it.
		oldIn, oerr := oldFS.Inode(ino)
		if oerr != nil {
			continue // new: nothing of it is cached (its name is, below)
		}
		id := NodeID(oldIn)
		if !c.fs.IsKnown(id) && ino != ext4ro.RootIno {
			continue
		}
		c.inodeNotify(id)
		newIn, nerr := newFS.Inode(ino)
		if !oldIn.IsDir() && (nerr != nil || !newIn.IsDir()) {
			continue
		}
		before, after := listing(oldFS, oldIn, nil), listing(newFS, newIn, nerr)
		for name, child := range before {
			if after[name] != child {
				c.entryNotify(id, name)
			}
		}
		for name := range after {
			if _, ok := before[name]; !ok {
				c.entryNotify(id, name) // a cached miss
			}
		}
	}
}

func (c *Client) inodeNotify(id uint64) {
	c.m.inval.WithLabelValues("inode").Inc()
	c.notify.InodeNotify(id, 0, 0)
}

func (c *Client) entryNotify(parent uint64, name string) {
	c.m.inval.WithLabelValues("entry").Inc()
	c.notify.EntryNotify(parent, name)
}

// listing maps a directory's names to inodes (none if it is gone).
func listing(f *ext4ro.FS, dir *ext4ro.Inode, err error) map[string]uint32 {
	m := map[string]uint32{}
	if err != nil || !dir.IsDir() {
		return m
	}
	_ = f.ReadDir(dir, 0, func(e ext4ro.DirEntry) bool {
		if e.Name != "." && e.Name != ".." {
			m[e.Name] = e.Ino
		}
		return true
	})
	return m
}

// inval drops the kernel's attributes and pages of node id. ENOENT
// (nothing cached) is success.
func (c *Client) inval(id uint64) {
	if c.notify != nil {
		c.inodeNotify(id)
	}
}

// Open leases a regular file for a FUSE open (Files).
func (c *Client) Open(v *ext4ro.FS, in *ext4ro.Inode) (OpenFile, error) {
	deadline := time.Now().Add(c.cfg.BusyWait)
	for {
		c.mu.Lock()
		gv := c.views[v]
		c.mu.Unlock()
		if gv == nil {
			return nil, ErrStale
		}
		var file *ext4ro.File
		var layout uint64
		if c.dev != nil {
			var err error
			if file, err = v.OpenFile(in); err != nil {
				return nil, err
			}
			layout = layoutHash(file.Extents())
		}
		reply, err := c.call(&vsockproto.Open{Generation: gv.gen, Inode: in.Ino, IGen: in.Generation, Size: in.Size,
			Ctime: vsockproto.Timespec{Sec: in.Ctime.Sec, Nsec: in.Ctime.Nsec}, Layout: layout})
		if err == nil {
			lf := &leasedFile{c: c, id: reply.(*vsockproto.Leased).Lease, node: NodeID(in), file: file}
			switch {
			case file == nil:
				lf.data = c.m.data.WithLabelValues("host")
			case file.Inline():
				lf.data = c.m.data.WithLabelValues("inline")
			default:
				lf.data = c.m.data.WithLabelValues("device")
			}
			c.mu.Lock()
			c.files[lf.id] = lf
			c.mu.Unlock()
			return lf, nil
		}
		c.log.Debug("open refused", "inode", in.Ino, "generation", gv.gen, "error", err)
		switch {
		case errors.Is(err, vsockproto.ErrStale), errors.Is(err, vsockproto.ErrGone),
			errors.Is(err, vsockproto.ErrBusy), errors.Is(err, vsockproto.ErrNotFound):
			// The file changed or went on the host after our generation,
			// or a writer has it: move to a newer generation (waiting for
			// one, within BusyWait) and find the same inode there.
			if !c.waitNewer(gv.gen, deadline) {
				if errors.Is(err, vsockproto.ErrBusy) {
					c.m.openRefusals.WithLabelValues("busy").Inc()
					return nil, ErrBusy
				}
				c.m.openRefusals.WithLabelValues("stale").Inc()
				return nil, ErrStale
			}
			c.Refresh()
			v = c.fs.View()
			nin, ierr := v.Inode(in.Ino)
			if ierr != nil || !nin.IsRegular() || nin.Generation != in.Generation {
				return nil, ErrStale
			}
			in = nin
		case errors.Is(err, vsockproto.ErrNotRegular):
			return nil, ErrStale
		default:
			return nil, err
		}
	}
}

// waitNewer waits until a generation newer than gen is announced.
func (c *Client) waitNewer(gen uint64, deadline time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.waitLocked(func() bool { return c.latest > gen }, deadline)
	return c.latest > gen
}

// waitLocked waits, with c.mu held, until done, the client closes or the
// deadline passes.
func (c *Client) waitLocked(done func() bool, deadline time.Time) {
	for !done() && !c.closed && time.Now().Before(deadline) {
		t := time.AfterFunc(time.Until(deadline), c.changed.Broadcast)
		c.changed.Wait()
		t.Stop()
	}
}

func layoutHash(m []ext4ro.Extent) uint64 {
	return layout.Hash(m)
}

// leasedFile is a file open under a lease.
type leasedFile struct {
	c    *Client
	id   uint64
	node uint64       // the FUSE node id, for invalidation
	file *ext4ro.File // nil: data over the connection
	data prometheus.Counter

	mu     sync.RWMutex // held for reading by reads in flight
	fenced bool         // guarded by mu: broken, revoked or lost
}

// fence stops all reads, after those in flight.
func (lf *leasedFile) fence() {
	lf.mu.Lock()
	lf.fenced = true
	lf.mu.Unlock()
}

func (lf *leasedFile) ReadAt(p []byte, off int64) (int, error) {
	lf.mu.RLock()
	defer lf.mu.RUnlock()
	if lf.fenced {
		return 0, ErrStale
	}
	if lf.file != nil {
		n, err := lf.file.ReadAt(p, off)
		lf.data.Add(float64(n))
		return n, err
	}
	n := 0
	for n < len(p) {
		want := min(len(p)-n, 1<<20)
		reply, err := lf.c.call(&vsockproto.Read{Lease: lf.id, Offset: uint64(off) + uint64(n), Length: uint32(want)})
		if err != nil {
			if errors.Is(err, vsockproto.ErrRevoked) || errors.Is(err, vsockproto.ErrBadLease) {
				return n, ErrStale
			}
			return n, err
		}
		d := reply.(*vsockproto.Data).Data
		n += copy(p[n:], d)
		lf.data.Add(float64(len(d)))
		if len(d) < want {
			return n, io.EOF
		}
	}
	return n, nil
}

func (lf *leasedFile) Close() error {
	c := lf.c
	c.mu.Lock()
	_, held := c.files[lf.id]
	delete(c.files, lf.id)
	c.mu.Unlock()
	if !held {
		return nil // broken, revoked or lost: nothing to release
	}
	_, err := c.call(&vsockproto.Release{Lease: lf.id})
	return err
}

// genView is a generation's metadata as the guest reads it: blocks from
// its cache, or fetched from the host and cached.
type genView struct {
	c   *Client
	gen uint64
	bs  int64

	mu     sync.Mutex
	blocks map[uint64][]byte // guarded by mu
}

// next is the view of generation gen: this one's cache less what changed.
func (v *genView) next(gen uint64, ch *changes) *genView {
	n := &genView{c: v.c, gen: gen, bs: v.bs, blocks: map[uint64][]byte{}}
	if ch.all {
		return n
	}
	gone := map[uint64]bool{}
	for _, r := range ch.blocks {
		for b := r.Start; b < r.Start+uint64(r.Count); b++ {
			gone[b] = true
		}
	}
	v.mu.Lock()
	for b, d := range v.blocks {
		if !gone[b] {
			n.blocks[b] = d
		}
	}
	v.mu.Unlock()
	return n
}

// ReadAt reads metadata, fetching the missing blocks in one request.
func (v *genView) ReadAt(p []byte, off int64) (int, error) {
	first, last := uint64(off/v.bs), uint64((off+int64(len(p))-1)/v.bs)
	v.mu.Lock()
	var missing []uint64
	for b := first; b <= last; b++ {
		if _, ok := v.blocks[b]; !ok {
			missing = append(missing, b)
		}
	}
	v.mu.Unlock()
	v.c.m.cacheHits.Add(float64(last - first + 1 - uint64(len(missing))))
	v.c.m.cacheMisses.Add(float64(len(missing)))
	if len(missing) > 0 {
		v.c.m.metaFetches.Inc()
		reply, err := v.c.call(&vsockproto.ReadMeta{Generation: v.gen, Blocks: vsockproto.Ranges(missing)})
		if err != nil {
			if errors.Is(err, vsockproto.ErrGone) {
				go v.c.goneGeneration()
			}
			return 0, fmt.Errorf("generation %d: %w", v.gen, err)
		}
		data := reply.(*vsockproto.Meta).Data
		if len(data) != len(missing)*int(v.bs) {
			return 0, fmt.Errorf("generation %d: the host sent %d bytes for %d blocks", v.gen, len(data), len(missing))
		}
		v.c.m.metaBytes.Add(float64(len(data)))
		v.mu.Lock()
		for i, b := range missing {
			v.blocks[b] = data[int64(i)*v.bs : int64(i+1)*v.bs : int64(i+1)*v.bs]
		}
		v.mu.Unlock()
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		n += copy(p[n:], v.blocks[uint64(pos/v.bs)][pos%v.bs:])
	}
	return n, nil
}

// goneGeneration: the host no longer keeps the generation served. Its
// current one comes with the Welcome of a new connection (the session,
// and its leases, resume).
func (c *Client) goneGeneration() {
	c.mu.Lock()
	conn := c.conn
	c.mu.Unlock()
	if conn != nil {
		conn.Close()
	}
}
