package hostagent

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/internal/directio"
	"github.com/leasefs/leasefs/internal/lockrank"
	"github.com/leasefs/leasefs/internal/mountinfo"
	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
)

// ext4IocCheckpoint is EXT4_IOC_CHECKPOINT: _IOW('f', 43, __u32), and
// its flag that only checks the call (Linux 5.13 for both).
const (
	ext4IocCheckpoint        = 0x4004662B
	ext4CheckpointFlagDryRun = 0x4
)

// Errors of Publish.
var (
	// ErrFrozenByOther: someone else froze the filesystem. The agent
	// backs off and never thaws a freeze that is not its own.
	ErrFrozenByOther = errors.New("the export is frozen by someone else")
	// ErrOverrun: the freeze took longer than its budget and the
	// watchdog thawed it; what was scanned is not consistent and is
	// thrown away.
	ErrOverrun = errors.New("the freeze overran its budget and was thawed by the watchdog")
)

// ExportConfig describes one export.
type ExportConfig struct {
	Name   string
	Device string // the block device mounted read-write at Mount
	Mount  string
	// StateDir keeps the export's freeze record and generation counter.
	// It must not be on the export: the agent would wait on its own
	// freeze.
	StateDir     string
	FreezeBudget time.Duration // 2 s
	Watchdog     *Watchdog
	// Watch narrows publishes with inotify: only the inodes of changed
	// names are read again. Every FullScanEvery-th publish (20; negative:
	// never) and any after lost events is a full scan all the same.
	Watch         bool
	FullScanEvery int
	// AutoPublish, if set, is how the export publishes on its own
	// (Server.AutoPublish runs it), and what guests are told to expect;
	// nil: only when told (Server.Publish).
	AutoPublish *AutoPublish
	// OnFrozen, if set, runs during each publish's freeze, after the
	// scan: for diagnostics and tests (a copy of the frozen device).
	OnFrozen func()
	// ExpediteRCU makes the kernel's RCU grace periods expedited, system
	// wide, for the moment of each freeze (see expedite.go): FIFREEZE
	// itself then takes well under a millisecond instead of tens.
	ExpediteRCU bool
	// KeepFiles bounds the files held so that the generations guests are
	// on stay whole when the writer replaces or deletes them (see
	// keeper): 0 is 262144; negative holds none.
	KeepFiles int
	// KeepReplaced and KeepBytes bound the files the writer replaced or
	// deleted that are kept for older generations, in number and size
	// (0: no bound). Past either, the oldest generations are dropped at
	// the next publish, and their guests move on.
	KeepReplaced int
	KeepBytes    int64
	// KeepGenerations is how many of the newest generations are kept
	// whole whether or not a guest is on them, for guests to pin
	// (vsockproto.FeaturePin); within the budgets above. 0 or 1: the
	// current one.
	KeepGenerations int
	// Progress, if set, is told how far the first publish has read the
	// inode tables into the page cache, before its freeze: on a large,
	// cold filesystem that takes seconds. The freeze then reads them
	// from memory.
	Progress func(done, total int64)
	Logger   hclog.Logger
	// Inherit, if set, is the state a predecessor handed over (an
	// upgrade): the export's lock, store and kept generations, and the
	// files its guests hold.
	Inherit *ExportState
	// Keeper, if set, keeps the held files across a restart (systemd's
	// fd store); Held are those a restarted agent got back from it.
	Keeper lease.Keeper
	Held   map[uint32]int
}

// Export is an exported filesystem and its generations.
type Export struct {
	cfg     ExportConfig
	log     hclog.Logger
	mountFD int
	keep    *keeper         // the kept generations' files; nil when KeepFiles < 0
	dev0    uint64          // st_dev of the export
	mnt     mountinfo.Mount // its mount, when opened (Mounted)
	dev     *directio.File
	cached  *os.File // the device through its page cache, for inode tables
	store   *Store
	// noCheckpoint: the kernel has no EXT4_IOC_CHECKPOINT (before 5.13),
	// so the freeze writes the journal home itself.
	noCheckpoint bool
	closeOnce    sync.Once
	label        string // the last label published; guarded by pub

	pub       lockrank.Mutex[lockrank.ExportPublish] // one publish at a time
	onFrozen  func()                                 // tests: runs while frozen
	watch     *treeWatcher                           // nil without Watch
	sinceFull int                                    // publishes since the last full scan; guarded by pub
	needFull  bool                                   // the next publish must be full; guarded by pub

	mu   lockrank.Mutex[lockrank.ExportGenerations]
	gens map[uint64]*Generation // kept generations; guarded by mu
	cur  *Generation            // guarded by mu
	next uint64                 // guarded by mu
}

// OpenExport checks the export and takes over a freeze that a previous
// run of the agent recorded as its own.
func OpenExport(cfg ExportConfig) (*Export, error) {
	if cfg.FreezeBudget <= 0 {
		cfg.FreezeBudget = 2 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.FullScanEvery == 0 {
		cfg.FullScanEvery = 20
	}
	if cfg.Watchdog == nil {
		return nil, fmt.Errorf("export %s: no freeze watchdog", cfg.Name)
	}
	mnt, err := checkMount(cfg.Device, cfg.Mount)
	if err != nil {
		return nil, fmt.Errorf("export %s: %w", cfg.Name, err)
	}
	var mst, sst unix.Stat_t
	if err := unix.Stat(cfg.Mount, &mst); err != nil {
		return nil, err
	}
	if err := unix.Stat(cfg.StateDir, &sst); err != nil {
		return nil, fmt.Errorf("export %s: state directory: %w", cfg.Name, err)
	}
	if mst.Dev == sst.Dev {
		return nil, fmt.Errorf("export %s: the state directory %s is on the export itself; the agent would wait on its own freeze", cfg.Name, cfg.StateDir)
	}
	e := &Export{cfg: cfg, log: cfg.Logger.Named(cfg.Name), gens: map[uint64]*Generation{}, next: 1, dev0: mst.Dev, mnt: mnt, onFrozen: cfg.OnFrozen}
	if cfg.Inherit != nil {
		if err := e.takeOver(cfg.Inherit); err != nil {
			cfg.Inherit.CloseKept()
			unix.Close(cfg.Inherit.MountFD)
			if e.store != nil {
				e.store.Close()
			} else {
				unix.Close(cfg.Inherit.Store.FD)
			}
			return nil, fmt.Errorf("export %s: taking over from the last run: %w", cfg.Name, err)
		}
	} else if err := e.open(); err != nil {
		return nil, err
	}
	fd := e.mountFD
	if cfg.Inherit != nil {
		// The keeper's files, until the keeper takes them: closed on the
		// way out of a failure.
		defer func() {
			if e.keep == nil {
				cfg.Inherit.CloseKept()
			}
		}()
	}
	if e.dev, err = directio.Open(cfg.Device); err != nil {
		e.store.Close()
		unix.Close(fd)
		return nil, err
	}
	if e.cached, err = os.Open(cfg.Device); err != nil {
		e.store.Close()
		e.dev.Close()
		unix.Close(fd)
		return nil, err
	}
	if b, err := os.ReadFile(e.path("label")); err == nil && cfg.Inherit == nil {
		e.label = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile(e.path("generation")); err == nil && cfg.Inherit == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil {
			e.next = n + 1
		}
	}
	if cfg.Watch {
		if e.watch, err = newTreeWatcher(cfg.Mount); err != nil {
			e.store.Close()
			e.dev.Close()
			e.cached.Close()
			unix.Close(fd)
			return nil, err
		}
	}
	e.probeKernel()
	if cfg.KeepFiles >= 0 {
		e.keep = newKeeper(fd, cmp.Or(cfg.KeepFiles, 262144))
		if cfg.Inherit != nil {
			e.keep.adopt(cfg.Inherit.Kept)
			cfg.Inherit.Kept = nil
		}
		if cur := e.Current(); cur != nil { // taken over: its files, as they are now
			if err := e.keep.publish(cur, 0, true); err != nil {
				e.log.Error("keeping the generation's files", "error", err)
			}
		}
	}
	if _, err := os.Stat(e.path("freezing")); err == nil {
		// Our own freeze, left by a run that died mid-publish.
		err := thawFS(fd)
		e.log.Warn("thawed a freeze recorded by an earlier run", "thaw_error", err)
		os.Remove(e.path("freezing"))
	}
	return e, nil
}

// open opens and locks the export's root, and makes its store.
func (e *Export) open() error {
	fd, err := unix.Open(e.cfg.Mount, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: e.cfg.Mount, Err: err}
	}
	// One agent per export: the lock goes with the fd.
	if err := lockFD(fd, "export "+e.cfg.Name+" ("+e.cfg.Mount+")"); err != nil {
		unix.Close(fd)
		return err
	}
	if e.store, err = NewStore(e.cfg.StateDir); err != nil {
		unix.Close(fd)
		return fmt.Errorf("export %s: %w", e.cfg.Name, err)
	}
	e.mountFD = fd
	return nil
}

// leaseConfig is cfg completed for the export's lease coordinator: its
// root, its journal in the state directory, and what was handed over.
func (e *Export) leaseConfig(cfg lease.Config) lease.Config {
	cfg.Root = e.cfg.Mount
	cfg.Journal = e.path("leases")
	cfg.Keeper = e.cfg.Keeper
	cfg.Held = e.cfg.Held
	cfg.Successor = e.cfg.Keeper != nil
	if e.cfg.Inherit != nil {
		cfg.Held, cfg.Successor = e.cfg.Inherit.Held, true
	}
	return cfg
}

func (e *Export) path(what string) string {
	return filepath.Join(e.cfg.StateDir, e.cfg.Name+"."+what)
}

// Close releases the export; its generations can no longer be read.
func (e *Export) Close() error {
	var err error
	e.closeOnce.Do(func() {
		e.pub.Lock() // a publish in flight ends first (a freeze is never left to the watchdog)
		defer e.pub.Unlock()
		if e.watch != nil {
			e.watch.close()
		}
		if e.keep != nil {
			e.keep.close()
		}
		e.dev.Close()
		e.cached.Close()
		e.store.Close()
		err = unix.Close(e.mountFD) // and with it the export's lock
	})
	return err
}

// Current returns the newest generation, or nil before the first.
func (e *Export) Current() *Generation {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cur
}

// Generation returns kept generation n, referenced: the caller reads it
// and then releases it (Generation.Release). Nil if it is not kept.
func (e *Export) Generation(n uint64) *Generation {
	e.mu.Lock()
	defer e.mu.Unlock()
	if g := e.gens[n]; g != nil && g.acquire() {
		return g
	}
	return nil
}

// Kept is how many generations are kept.
func (e *Export) Kept() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.gens)
}

// Has reports whether generation n is kept.
func (e *Export) Has(n uint64) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.gens[n] != nil
}

// KeptList lists the generations the export keeps, oldest first.
func (e *Export) KeptList() []vsockproto.KeptGeneration {
	e.mu.Lock()
	defer e.mu.Unlock()
	var list []vsockproto.KeptGeneration
	for _, n := range slices.Sorted(maps.Keys(e.gens)) {
		g := e.gens[n]
		list = append(list, vsockproto.KeptGeneration{Number: n, Published: g.Captured, Label: g.Label})
	}
	return list
}

// labeled is the newest kept generation published with label; 0 if none.
func (e *Export) labeled(label string) uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	var n uint64
	for k, g := range e.gens {
		if g.Label == label {
			n = max(n, k)
		}
	}
	return n
}

// Drop forgets generation n (never the current one); its blocks that no
// kept generation shares are freed once no request reads it.
func (e *Export) Drop(n uint64) {
	e.mu.Lock()
	g := e.gens[n]
	if g == nil || g == e.cur {
		e.mu.Unlock()
		return
	}
	delete(e.gens, n)
	kept := slices.Sorted(maps.Keys(e.gens))
	e.mu.Unlock()
	if e.keep != nil {
		e.keep.release(kept)
	}
	g.Release() // the export's own reference
}

// DropBefore drops every kept generation older than n (never the
// current one).
func (e *Export) DropBefore(n uint64) {
	e.dropUnless(func(k uint64) bool { return k >= n })
}

// dropUnless drops every kept generation but those keep says to keep
// (and the current one).
func (e *Export) dropUnless(keep func(n uint64) bool) {
	e.mu.Lock()
	var old []uint64
	for k := range e.gens {
		if !keep(k) {
			old = append(old, k)
		}
	}
	e.mu.Unlock()
	for _, k := range old {
		e.Drop(k)
	}
}

// Name is the export's name.
func (e *Export) Name() string { return e.cfg.Name }

// Mount is where the export is mounted read-write.
func (e *Export) Mount() string { return e.cfg.Mount }

// AutoPublish is how the export publishes on its own (nil: only when told).
func (e *Export) AutoPublish() *AutoPublish { return e.cfg.AutoPublish }

// Changes receives a value after the tree changed (coalesced), nil for
// an export that is not watched (ExportConfig.Watch).
func (e *Export) Changes() <-chan struct{} {
	if e.watch == nil {
		return nil
	}
	return e.watch.kick
}

// Store returns the export's block store.
func (e *Export) Store() *Store { return e.store }

// Publish captures a new generation (capture.go). Before the freeze:
// syncfs and a journal checkpoint, the names inotify saw change resolved
// to inodes, and — for a full scan — a capture of everything made while
// writers run. Frozen: the inode-table blocks that may have changed are
// compared with the last generation's (or that capture's), and what the
// changed inodes point to is read. After the thaw: the full block map.
// The phases' times are in the generation.
func (e *Export) Publish() (*Generation, error) { return e.PublishLabeled("", false) }

// ErrLabelBackwards refuses a label that sorts before the export's last.
var ErrLabelBackwards = errors.New("the label goes backwards")

// PublishLabeled is Publish, recording label with the generation: the
// upstream revision the tree now holds (a mirror's serial, a date, a
// version). Labels are compared as versions (runs of digits by value),
// and one that sorts before the export's last label is refused unless
// force: a fleet's revision never goes back by mistake. The last label
// survives restarts (in the state directory). An empty label publishes
// a generation without one.
func (e *Export) PublishLabeled(label string, force bool) (*Generation, error) {
	return e.publish(label, force, false)
}

// PublishIfChanged is Publish, unless nothing changed since the current
// generation: then it makes none and returns nil. An automatic publish
// is one of these: a publish made meanwhile (by 'leasefs publish') may
// have taken the changes that started it.
func (e *Export) PublishIfChanged() (*Generation, error) { return e.publish("", false, true) }

func (e *Export) publish(label string, force, ifChanged bool) (*Generation, error) {
	e.pub.Lock()
	defer e.pub.Unlock()
	if checkInvariants {
		defer func() { // after the capture has let go of what it held
			if err := e.store.checkRefs(); err != nil {
				panic(fmt.Sprintf("export %s: %v", e.cfg.Name, err))
			}
		}()
	}
	if err := checkLabel(label); err != nil {
		return nil, err
	}
	if err := e.Mounted(); err != nil {
		return nil, fmt.Errorf("export %s: not publishing: %w", e.cfg.Name, err)
	}
	if label != "" && e.label != "" && !force && compareVersions(label, e.label) < 0 {
		return nil, fmt.Errorf("%w: %q sorts before the last label %q (force it to roll back)", ErrLabelBackwards, label, e.label)
	}
	var ph Phases
	p, err := e.prepare(&ph)
	if err != nil {
		return nil, err
	}
	defer p.end()
	d, err := e.captureFrozen(&ph, p)
	if err != nil {
		return nil, err
	}
	g, err := e.complete(&ph, p, d)
	if err != nil {
		return nil, err
	}
	// Any change a guest can see changes an inode (times, size, links);
	// metadata blocks alone change at every sync (the superblock's
	// counters).
	if ifChanged && !g.All && len(g.ChangedInodes) == 0 {
		e.log.Debug("no inode changed; no generation made", "changed_blocks", len(g.Changed))
		g.release() // never published: its references go now
		return nil, nil
	}
	e.makeCurrent(g, label, ph)
	return g, nil
}

// A plannedCapture is what a publish decided before the freeze.
type plannedCapture struct {
	prev *Generation
	full bool            // a full scan, against pre
	cand map[uint32]bool // a narrowed one: the inodes whose names changed
	pre  *earlyCapture
}

// end returns what a publish held: the early capture, and a full scan's
// garbage (the early capture, the walk of the tree) to the kernel, not
// kept as the heap's high-water mark.
func (p *plannedCapture) end() {
	if p.pre != nil {
		p.pre.drop()
	}
	if p.full {
		debug.FreeOSMemory()
	}
}

// prepare does what a publish can before the freeze: syncfs and the
// journal checkpoint, choosing a full or a narrowed scan, resolving the
// names changed so far (the previous generation does not change, and a
// name that changes again before the freeze makes another event, taken
// while frozen), and for a full scan the early capture while writers run.
func (e *Export) prepare(ph *Phases) (*plannedCapture, error) {
	t := time.Now()
	if err := e.checkpoint(); err != nil {
		return nil, err
	}
	ph.Sync = time.Since(t)
	p := &plannedCapture{prev: e.Current(), cand: map[uint32]bool{}}
	p.full = p.prev == nil || e.watch == nil || e.needFull ||
		(e.cfg.FullScanEvery > 0 && e.sinceFull+1 >= e.cfg.FullScanEvery)
	e.needFull = true // until this publish succeeds
	if e.watch != nil {
		names, lost := e.watch.take()
		p.full = p.full || lost
		if !p.full {
			e.resolve(p.cand, names, p.prev)
		}
	}
	// A full scan compares every inode with a capture made now; frozen,
	// it reads the inode tables again, but looks into and hashes only the
	// blocks whose fingerprint changed since.
	if p.full {
		t := time.Now()
		var err error
		if p.pre, err = e.precapture(p.prev); err != nil {
			return nil, err
		}
		ph.Pre = time.Since(t)
	}
	return p, nil
}

// captureFrozen is the freeze: the names changed since prepare resolved,
// then the capture — a delta over the previous generation, or a full
// scan against the early capture.
func (e *Export) captureFrozen(ph *Phases, p *plannedCapture) (*delta, error) {
	var d *delta
	err := e.frozen(ph, func() error {
		if e.watch != nil {
			names, lost := e.watch.take() // all queued before the freeze
			select {                      // its kick is for events just taken
			case <-e.watch.kick:
			default:
			}
			if lost && !p.full {
				return errLostEvents
			}
			if !p.full {
				t := time.Now()
				e.resolve(p.cand, names, p.prev)
				ph.Resolve = time.Since(t)
			}
		}
		t := time.Now()
		var err error
		sc := scan{dev: e.dev, tables: e.cached, store: e.store, base: p.prev, cand: p.cand}
		if p.full {
			sc.base, sc.cand, sc.sums = p.pre.g, nil, p.pre.sums
		}
		d, err = capture(sc)
		ph.Scan = time.Since(t)
		if e.onFrozen != nil {
			e.onFrozen()
		}
		return err
	})
	if errors.Is(err, errLostEvents) {
		e.log.Warn("inotify lost events during the freeze; the next publish scans everything")
		return nil, err
	}
	if err != nil {
		if d != nil {
			d.release()
		}
		return nil, err
	}
	return d, nil
}

// complete makes the full generation from the capture, after the thaw:
// the block map, what changed since the last generation, the new blocks
// written to the store; and drops the device's stale cached data before
// anyone can see it (see pagecache.go).
func (e *Export) complete(ph *Phases, p *plannedCapture, d *delta) (*Generation, error) {
	t := time.Now()
	g, err := d.generation()
	if err != nil {
		return nil, fmt.Errorf("capturing %s: %w", e.cfg.Device, err)
	}
	if p.full && p.pre != nil {
		// Captured against the early capture: what changed is what
		// differs from the last generation.
		g.All = p.prev == nil
		g.changesSince(p.prev)
		g.ChangedInodes = nil
		if !g.All {
			g.ChangedInodes = mergeInodes(p.pre.changed, d.changed)
		}
	}
	e.flush()
	ph.Merge = time.Since(t)
	e.needFull = false
	if p.full {
		e.sinceFull = 0
	} else {
		e.sinceFull++
	}
	g.Full, g.Phases = p.full, *ph
	g.Scan, g.Resolve, g.Ioctls = ph.Scan, ph.Resolve, ph.Freeze+ph.Thaw
	if err := e.dropStaleData(g); err != nil {
		e.log.Error("dropping the device's cached file data; guests reading it buffered may see stale bytes", "error", err)
	}
	return g, nil
}

// makeCurrent numbers g, makes it current, and writes its number and
// label to the state directory.
func (e *Export) makeCurrent(g *Generation, label string, ph Phases) {
	g.refs.Store(1) // the export's
	g.Label = label
	e.mu.Lock()
	var prev uint64
	if e.cur != nil {
		prev = e.cur.Number
	}
	g.Number, g.Frozen, g.Captured = e.next, ph.Frozen, time.Now()
	e.next++
	e.gens[g.Number] = g
	e.cur = g
	e.mu.Unlock()
	if e.keep != nil {
		if err := e.keep.publish(g, prev, g.All); err != nil {
			e.log.Error("keeping the generation's files: some replaced or deleted before guests leave it will answer ESTALE", "error", err)
		}
	}
	if err := WriteFileSync(e.path("generation"), strconv.FormatUint(g.Number, 10)+"\n"); err != nil {
		e.log.Error("recording the generation number", "error", err)
	}
	if label != "" {
		e.label = label
		if err := WriteFileSync(e.path("label"), label+"\n"); err != nil {
			e.log.Error("recording the label", "error", err)
		}
	}
	e.log.Info("published", "generation", g.Number, "label", label, "frozen", ph.Frozen, "full_scan", g.Full, "blocks", g.Blocks(),
		"changed_blocks", len(g.Changed), "changed_inodes", len(g.ChangedInodes),
		"sync", ph.Sync, "precapture", ph.Pre, "fifreeze", ph.Freeze, "scan", ph.Scan, "fithaw", ph.Thaw, "merge", ph.Merge)
}

// errLostEvents: inotify lost events while the export was frozen; the
// narrowed scan may miss changes, and the publish is given up.
var errLostEvents = errors.New("inotify lost events during the freeze")

// Phases are how long each step of a publish took.
type Phases struct {
	Sync    time.Duration // syncfs and the journal checkpoint, before the freeze
	Pre     time.Duration // a full scan's early capture, before the freeze
	Frozen  time.Duration // FIFREEZE to FITHAW: what writers wait
	Freeze  time.Duration // FIFREEZE itself
	Resolve time.Duration // changed names to inodes, frozen
	Scan    time.Duration // the capture, frozen
	Thaw    time.Duration // FITHAW itself
	Merge   time.Duration // the full generation made from the capture, after the thaw
}

// probeKernel finds what the kernel lacks of what a publish uses, and
// says so once: each lack only makes freezes longer.
func (e *Export) probeKernel() {
	err := unix.IoctlSetPointerInt(e.mountFD, ext4IocCheckpoint, ext4CheckpointFlagDryRun)
	if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
		e.noCheckpoint = true
		e.log.Warn("this kernel has no EXT4_IOC_CHECKPOINT (Linux 5.13): each freeze writes the journal home itself, and takes longer", "error", err)
	}
	if e.cfg.ExpediteRCU && !canExpediteRCU() {
		e.log.Warn("cannot expedite RCU grace periods (" + rcuExpeditedPath + " is not writable): FIFREEZE takes tens of milliseconds")
	}
}

// checkpoint syncs the filesystem and writes the journal home: FIFREEZE
// does both, and doing them first keeps them out of the freeze
// (EXT4_IOC_CHECKPOINT, Linux 5.13; without it the freeze takes longer).
func (e *Export) checkpoint() error {
	if err := unix.Syncfs(e.mountFD); err != nil {
		return fmt.Errorf("syncfs %s: %w", e.cfg.Mount, err)
	}
	if !e.noCheckpoint {
		_ = unix.IoctlSetPointerInt(e.mountFD, ext4IocCheckpoint, 0)
	}
	return nil
}

// frozen runs fn with the export frozen: the freeze recorded as ours,
// the watchdog armed, RCU expedited for the moment, FIFREEZE, fn,
// FITHAW, and all of that undone. A freeze the watchdog had to thaw is
// ErrOverrun, and fn's work is to be thrown away.
func (e *Export) frozen(ph *Phases, fn func() error) error {
	if err := e.record(); err != nil {
		return err
	}
	defer os.Remove(e.path("freezing"))
	if err := e.cfg.Watchdog.arm(e.cfg.FreezeBudget); err != nil {
		return err
	}
	defer e.cfg.Watchdog.disarm()
	undoRCU := func() {}
	if e.cfg.ExpediteRCU {
		undoRCU = expediteRCU()
	}
	defer undoRCU()
	start := time.Now()
	if err := freezeFS(e.mountFD); err != nil {
		if errors.Is(err, unix.EBUSY) {
			return ErrFrozenByOther
		}
		return fmt.Errorf("FIFREEZE %s: %w", e.cfg.Mount, err)
	}
	ph.Freeze = time.Since(start)
	fnErr := fn()
	t := time.Now()
	thawErr := thawFS(e.mountFD)
	ph.Thaw, ph.Frozen = time.Since(t), time.Since(start)
	switch {
	case thawErr != nil && errors.Is(thawErr, unix.EINVAL):
		return fmt.Errorf("%w (%v)", ErrOverrun, ph.Frozen.Round(time.Millisecond))
	case thawErr != nil:
		return fmt.Errorf("FITHAW %s: %w", e.cfg.Mount, thawErr)
	case fnErr != nil:
		return fmt.Errorf("scanning %s: %w", e.cfg.Device, fnErr)
	}
	return nil
}

// earlyCapture is a full capture made while writers run, the base a full
// scan compares with while frozen.
type earlyCapture struct {
	changed []uint32         // the inodes that differ from the last generation
	sums    map[uint64]int64 // the inode-table blocks' fingerprints
	g       *Generation      // over the last generation
}

// precapture reads every inode table (through the page cache, as ext4
// keeps them), then — after syncfs and a checkpoint have put every change
// made before them where O_DIRECT reads it — what the inodes that differ
// from prev point to. It is not a consistent state, and need not be: an
// inode changed after its table was read differs from it when frozen and
// is read again then; one that has not changed since had its blocks
// written home by the checkpoint before they were read.
func (e *Export) precapture(prev *Generation) (*earlyCapture, error) {
	if prev == nil {
		if err := e.warm(); err != nil {
			return nil, err
		}
	}
	d, err := capture(scan{dev: e.dev, tables: e.cached, store: e.store, base: prev, live: true, between: e.checkpoint})
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", e.cfg.Device, err)
	}
	changed, sums := d.changed, d.sums
	g, err := d.generation()
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", e.cfg.Device, err)
	}
	e.flush()
	return &earlyCapture{changed: changed, sums: sums, g: g}, nil
}

// flush writes the blocks captured to the store's file, after the thaw.
// Until it succeeds they stay in memory.
func (e *Export) flush() {
	if err := e.store.flush(); err != nil {
		e.log.Error("keeping captured blocks in memory", "error", err)
	}
}

// drop gives back the early capture's references.
func (p *earlyCapture) drop() { p.g.release() }

// mergeInodes is the union of two lists of inodes.
func mergeInodes(a, b []uint32) []uint32 {
	seen := make(map[uint32]bool, len(a)+len(b))
	var out []uint32
	for _, l := range [][]uint32{a, b} {
		for _, ino := range l {
			if !seen[ino] {
				seen[ino] = true
				out = append(out, ino)
			}
		}
	}
	return out
}

// warm drops whatever the device's page cache holds (see pagecache.go),
// then reads the inode tables in use into it, where the first scan will
// read them while frozen, telling cfg.Progress.
func (e *Export) warm() error {
	if err := unix.Fadvise(int(e.cached.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		return fmt.Errorf("dropping %s's cached pages: %w", e.cfg.Device, err)
	}
	fs, err := ext4ro.Open(e.cached, &ext4ro.Options{CacheBytes: 1 << 20, ReadAhead: 1, AllowDirtyJournal: true})
	if err != nil {
		return fmt.Errorf("reading %s: %w", e.cfg.Device, err)
	}
	bs := int64(fs.BlockSize())
	type run struct{ start, n int64 }
	var runs []run
	var total, done int64
	sb := fs.Superblock()
	for grp := range sb.GroupCount() {
		start, used, err := fs.InodeTable(grp)
		if err != nil {
			return fmt.Errorf("reading %s: %w", e.cfg.Device, err)
		}
		runs = append(runs, run{int64(start) * bs, int64(used) * bs})
		total += int64(used) * bs
	}
	progress := e.cfg.Progress
	if progress == nil {
		progress = func(int64, int64) {}
	}
	buf := make([]byte, 1<<20)
	for _, r := range runs {
		for off := int64(0); off < r.n; {
			p := buf[:min(int64(len(buf)), r.n-off)]
			if _, err := e.cached.ReadAt(p, r.start+off); err != nil {
				return fmt.Errorf("reading %s's inode tables: %w", e.cfg.Device, err)
			}
			off += int64(len(p))
			done += int64(len(p))
			progress(done, total)
		}
	}
	progress(total, total)
	return nil
}

// record notes, durably, that the freeze about to happen is ours.
func (e *Export) record() error {
	return WriteFileSync(e.path("freezing"), e.cfg.Mount+"\n")
}

// WriteFileSync replaces path with content, durably (the file and its
// directory synced), never following a symlink where the new file is
// made.
func WriteFileSync(path, content string) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.WriteString(content)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		if d, derr := os.Open(filepath.Dir(path)); derr == nil {
			err = d.Sync()
			d.Close()
		}
	}
	return err
}

// resolve adds to cand the inodes that changed names may concern: the
// inode each names now and named in the previous generation, and their
// directories.
func (e *Export) resolve(cand map[uint32]bool, names []string, prev *Generation) {
	if len(names) == 0 {
		return
	}
	pv, err := prev.FS() // the current generation: never dropped while current
	if err != nil {
		e.needFull = true
		return
	}
	dirs := map[string]uint32{".": ext4ro.RootIno}
	var lookup func(rel string) (uint32, bool)
	lookup = func(rel string) (uint32, bool) {
		if ino, ok := dirs[rel]; ok {
			return ino, ino != 0
		}
		parent, ok := lookup(filepath.Dir(rel))
		var ino uint32
		if ok {
			if d, err := pv.Inode(parent); err == nil {
				if ent, err := pv.Lookup(d, filepath.Base(rel)); err == nil {
					ino = ent.Ino
				}
			}
		}
		dirs[rel] = ino
		return ino, ino != 0
	}
	root := filepath.Clean(e.cfg.Mount)
	for _, p := range names {
		for _, q := range []string{p, filepath.Dir(p)} {
			var st unix.Stat_t
			if unix.Lstat(q, &st) == nil && st.Dev == e.dev0 {
				cand[uint32(st.Ino)] = true
			}
			if rel, err := filepath.Rel(root, q); err == nil && !strings.HasPrefix(rel, "..") {
				if ino, ok := lookup(rel); ok {
					cand[ino] = true
				}
			}
		}
	}
}
