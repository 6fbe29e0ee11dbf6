package hostagent

import (
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
	Logger       hclog.Logger
}

// Export is an exported filesystem and its generations.
type Export struct {
	cfg     ExportConfig
	log     hclog.Logger
	mountFD int
	dev     *directio.File
	store   *Store

	pub      sync.Mutex // one publish at a time
	onFrozen func()     // tests: runs while frozen

	mu   sync.Mutex
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
	if cfg.Watchdog == nil {
		return nil, fmt.Errorf("export %s: no freeze watchdog", cfg.Name)
	}
	if err := checkMount(cfg.Device, cfg.Mount); err != nil {
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
	fd, err := unix.Open(cfg.Mount, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: cfg.Mount, Err: err}
	}
	e := &Export{cfg: cfg, log: cfg.Logger.Named(cfg.Name), mountFD: fd, store: NewStore(), gens: map[uint64]*Generation{}, next: 1}
	if e.dev, err = directio.Open(cfg.Device); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if b, err := os.ReadFile(e.path("generation")); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil {
			e.next = n + 1
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

func (e *Export) path(what string) string {
	return filepath.Join(e.cfg.StateDir, e.cfg.Name+"."+what)
}

// checkMount checks that device is what is mounted read-write at mount,
// and that it is ext4.
func checkMount(device, mount string) error {
	var dst unix.Stat_t
	if err := unix.Stat(device, &dst); err != nil {
		return err
	}
	if dst.Mode&unix.S_IFMT != unix.S_IFBLK {
		return fmt.Errorf("%s is not a block device", device)
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	want := fmt.Sprintf("%d:%d", unix.Major(dst.Rdev), unix.Minor(dst.Rdev))
	clean := filepath.Clean(mount)
	for _, line := range strings.Split(string(b), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 6 || len(g) < 1 || f[4] != clean {
			continue
		}
		switch {
		case f[2] != want:
			return fmt.Errorf("%s is not mounted at %s (device %s is)", device, mount, f[2])
		case g[0] != "ext4":
			return fmt.Errorf("%s is %s, not ext4", mount, g[0])
		case !strings.HasPrefix(f[5], "rw"):
			return fmt.Errorf("%s is not mounted read-write (%s)", mount, f[5])
		}
		return nil
	}
	return fmt.Errorf("nothing is mounted at %s", mount)
}

// Close releases the export (not its generations' readers).
func (e *Export) Close() error {
	e.dev.Close()
	return unix.Close(e.mountFD)
}

// Current returns the newest generation, or nil before the first.
func (e *Export) Current() *Generation {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cur
}

// Generation returns kept generation n, or nil.
func (e *Export) Generation(n uint64) *Generation {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.gens[n]
}

// Drop forgets generation n (never the current one) and frees the blocks
// no kept generation shares.
func (e *Export) Drop(n uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if g := e.gens[n]; g != nil && g != e.cur {
		delete(e.gens, n)
		g.release()
	}
}

// DropBefore drops every kept generation older than n (never the
// current one).
func (e *Export) DropBefore(n uint64) {
	e.mu.Lock()
	var old []uint64
	for k := range e.gens {
		if k < n {
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

// Store returns the export's block store.
func (e *Export) Store() *Store { return e.store }

// Publish captures a new generation: syncfs, record the freeze as ours,
// arm the watchdog, FIFREEZE, scan the device, FITHAW.
func (e *Export) Publish() (*Generation, error) {
	e.pub.Lock()
	defer e.pub.Unlock()
	if err := unix.Syncfs(e.mountFD); err != nil {
		return nil, fmt.Errorf("syncfs %s: %w", e.cfg.Mount, err)
	}
	if err := e.record(); err != nil {
		return nil, err
	}
	defer os.Remove(e.path("freezing"))
	if err := e.cfg.Watchdog.arm(e.cfg.FreezeBudget); err != nil {
		return nil, err
	}
	start := time.Now()
	if err := freezeFS(e.mountFD); err != nil {
		e.cfg.Watchdog.disarm()
		if errors.Is(err, unix.EBUSY) {
			return nil, ErrFrozenByOther
		}
		return nil, fmt.Errorf("FIFREEZE %s: %w", e.cfg.Mount, err)
	}
	prev := e.Current()
	g, scanErr := scan(e.dev, e.store, prev)
	if e.onFrozen != nil {
		e.onFrozen()
	}
	thawErr := thawFS(e.mountFD)
	frozen := time.Since(start)
	e.cfg.Watchdog.disarm()
	if thawErr != nil {
		if g != nil {
			g.release()
		}
		if errors.Is(thawErr, unix.EINVAL) {
			return nil, fmt.Errorf("%w (%v)", ErrOverrun, frozen.Round(time.Millisecond))
		}
		return nil, fmt.Errorf("FITHAW %s: %w", e.cfg.Mount, thawErr)
	}
	if scanErr != nil {
		return nil, fmt.Errorf("scanning %s: %w", e.cfg.Device, scanErr)
	}
	e.mu.Lock()
	g.Number, g.Frozen, g.Captured = e.next, frozen, time.Now()
	e.next++
	e.gens[g.Number] = g
	e.cur = g
	e.mu.Unlock()
	if err := writeFileSync(e.path("generation"), strconv.FormatUint(g.Number, 10)+"\n"); err != nil {
		e.log.Error("recording the generation number", "error", err)
	}
	e.log.Info("published", "generation", g.Number, "frozen", frozen, "blocks", g.Blocks(),
		"changed_blocks", len(g.Changed), "changed_inodes", len(g.ChangedInodes))
	return g, nil
}

// record notes, durably, that the freeze about to happen is ours.
func (e *Export) record() error {
	return writeFileSync(e.path("freezing"), e.cfg.Mount+"\n")
}

func writeFileSync(path, content string) error {
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
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
