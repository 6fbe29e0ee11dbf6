package hostagent

import (
	"errors"
	"fmt"
	"runtime/debug"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/ext4ro"
)

// The publish pipeline of an export: prepare, captureFrozen, complete,
// makeCurrent (doc.go). export.go has the export's lifecycle, registry.go
// its kept generations, freeze.go the freeze itself, capture.go the
// scan.

// pipelineState is what the publish pipeline keeps from one publish to
// the next (Export.pl, guarded by Export.pub).
type pipelineState struct {
	label     string // the last label published
	sinceFull int    // publishes since the last full scan
	needFull  bool   // the next publish must be full
	onFrozen  func() // runs while frozen (ExportConfig.OnFrozen)
}

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
	if label != "" && e.pl.label != "" && !force && compareVersions(label, e.pl.label) < 0 {
		return nil, fmt.Errorf("%w: %q sorts before the last label %q (force it to roll back)", ErrLabelBackwards, label, e.pl.label)
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
	if err := e.fr.checkpoint(); err != nil {
		return nil, err
	}
	ph.Sync = time.Since(t)
	p := &plannedCapture{prev: e.Current(), cand: map[uint32]bool{}}
	p.full = p.prev == nil || e.watch == nil || e.pl.needFull ||
		(e.cfg.FullScanEvery > 0 && e.pl.sinceFull+1 >= e.cfg.FullScanEvery)
	e.pl.needFull = true // until this publish succeeds
	if e.watch != nil {
		names, lost := e.watch.take()
		p.full = p.full || lost
		if !p.full && e.resolveNames(p, names) != nil {
			p.full = true // what the names were cannot be known
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

// resolveNames adds to p's candidates the inodes that the names that
// changed may concern (resolve, watch.go), in the current generation.
func (e *Export) resolveNames(p *plannedCapture, names []string) error {
	if len(names) == 0 {
		return nil
	}
	pv, err := p.prev.FS() // the current generation's: never dropped while current
	if err != nil {
		return err
	}
	resolve(p.cand, names, pv, e.cfg.Mount, e.dev0)
	return nil
}

// captureFrozen is the freeze: the names changed since prepare resolved,
// then the capture — a delta over the previous generation, or a full
// scan against the early capture.
func (e *Export) captureFrozen(ph *Phases, p *plannedCapture) (*delta, error) {
	var d *delta
	err := e.fr.frozen(ph, func() error {
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
				if err := e.resolveNames(p, names); err != nil {
					return fmt.Errorf("resolving the names that changed: %w", err)
				}
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
		if e.pl.onFrozen != nil {
			e.pl.onFrozen()
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
	e.pl.needFull = false
	if p.full {
		e.pl.sinceFull = 0
	} else {
		e.pl.sinceFull++
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
	prev := e.gens.add(g, ph.Frozen)
	if e.keep != nil {
		if err := e.keep.publish(g, prev, g.All); err != nil {
			e.log.Error("keeping the generation's files: some replaced or deleted before guests leave it will answer ESTALE", "error", err)
		}
	}
	if err := WriteFileSync(e.path("generation"), strconv.FormatUint(g.Number, 10)+"\n"); err != nil {
		e.log.Error("recording the generation number", "error", err)
	}
	if label != "" {
		e.pl.label = label
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
	d, err := capture(scan{dev: e.dev, tables: e.cached, store: e.store, base: prev, live: true, between: e.fr.checkpoint})
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
