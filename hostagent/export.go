package hostagent

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/directio"
	"github.com/leasefs/leasefs/internal/lockrank"
	"github.com/leasefs/leasefs/internal/mountinfo"
	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
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

// Export is an exported filesystem and its generations. Its lifecycle
// (export.go) is what it opens, takes over (handover.go) and closes;
// its kept generations are a registry (registry.go); its publish
// pipeline (publishing.go) keeps its own state, guarded by pub.
type Export struct {
	cfg       ExportConfig
	log       hclog.Logger
	mountFD   int
	keep      *keeper         // the kept generations' files; nil when KeepFiles < 0
	dev0      uint64          // st_dev of the export
	mnt       mountinfo.Mount // its mount, when opened (Mounted)
	dev       *directio.File
	cached    *os.File     // the device through its page cache, for inode tables
	store     *Store       // the generations' blocks
	fr        *freezer     // freeze.go
	watch     *treeWatcher // nil without Watch (watch.go)
	closeOnce sync.Once

	gens *registry // the kept generations

	pub lockrank.Mutex[lockrank.ExportPublish] // one publish at a time
	pl  pipelineState                          // guarded by pub
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
	e := &Export{cfg: cfg, log: cfg.Logger.Named(cfg.Name), gens: newRegistry(), dev0: mst.Dev, mnt: mnt, pl: pipelineState{onFrozen: cfg.OnFrozen}}
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
		e.pl.label = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile(e.path("generation")); err == nil && cfg.Inherit == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil {
			e.gens.setNext(n + 1)
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
	e.fr = newFreezer(fd, cfg, e.path("freezing"), e.log)
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
	e.fr.thawLeftover()
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
func (e *Export) Current() *Generation { return e.gens.current() }

// Generation returns kept generation n, referenced: the caller reads it
// and then releases it (Generation.Release). Nil if it is not kept.
func (e *Export) Generation(n uint64) *Generation { return e.gens.acquire(n) }

// Kept is how many generations are kept.
func (e *Export) Kept() int { return e.gens.count() }

// Has reports whether generation n is kept.
func (e *Export) Has(n uint64) bool { return e.gens.has(n) }

// KeptList lists the generations the export keeps, oldest first.
func (e *Export) KeptList() []vsockproto.KeptGeneration { return e.gens.list() }

// labeled is the newest kept generation published with label; 0 if none.
func (e *Export) labeled(label string) uint64 { return e.gens.labeled(label) }

// Drop forgets generation n (never the current one); its blocks that no
// kept generation shares are freed once no request reads it.
func (e *Export) Drop(n uint64) {
	g, kept := e.gens.remove(n)
	if g == nil {
		return
	}
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
	for _, k := range e.gens.numbersBut(keep) {
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
