package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	iofs "io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/hostagent/upgrade"
	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
)

// Options are how an agent reaches what is outside it: the log, the
// binary and command line an upgrade runs, systemd, the terminal.
type Options struct {
	Logger  hclog.Logger
	Version string
	// Binary is what an upgrade execs (the agent's own, as it was at
	// start: an upgrade replaces the file at that path), with Argv; Args
	// is the command line the binary's check reads (upgrade.Check).
	Binary     string
	Argv, Args []string
	// Load reads the settings again for a reload: the agent's own, or
	// for a dry run those of the file config if not "". A refusal is
	// said in its error.
	Load func(config string) (*Settings, error)
	// Watchdog starts the watchdog of the export mounted at mount.
	Watchdog func(mount string) (*hostagent.Watchdog, error)
	// Notify, if set, is told each change of state, with a status line.
	Notify func(Event, string)
	// Starting, if set, is called once the state directory and control
	// socket are taken, before the exports are read and published
	// (minutes, for a large one), with what the agent does then; the
	// function it returns is called when that is done.
	Starting func(status string) (done func())
	// Out, if set, is told each export's first generation, a line each;
	// Progress, if set, gives the progress callback of an export's first
	// read of its inode tables.
	Out      io.Writer
	Progress func(export string) func(done, total int64)
	// Signals are the ones the agent's caller takes (SIGHUP, SIGUSR2):
	// ignored across an upgrade's exec, taken again if it fails.
	Signals map[os.Signal]chan<- os.Signal
}

// Event is a change of the agent's state, for systemd (Options.Notify).
type Event int

const (
	Ready     Event = iota // started, or a reload or upgrade is done
	Reloading              // a reload or upgrade begins; Ready ends it
	Status                 // the status line changed
	Stopping
)

// An Agent is a running host agent: its exports and the guest listeners
// that a reload (Apply) and the control socket change, the control
// socket, and the state it leaves to the next run.
type Agent struct {
	opt   Options
	log   hclog.Logger
	srv   *hostagent.Server
	ctx   context.Context
	grp   *errgroup.Group
	lock  *os.File             // the state directory's
	ctl   *vsockproto.Listener // the control socket
	store *upgrade.FDStore     // systemd's fd store, if there is one

	mu        sync.Mutex          // one change at a time; guards what follows
	s         *Settings           // the settings applied
	listens   map[string]*running // by address
	extra     map[string]vsockproto.Addr
	exports   map[string]*runningExport
	lost      map[string]Export  // exports whose filesystem went away (watchMounts), until a reload brings them back
	inherited *upgrade.Inherited // what the run before left; the first apply takes it, and then it opens afresh
}

// running is something served until its cancel; done when it has ended.
type running struct {
	cancel context.CancelFunc
	done   chan struct{}
	l      *vsockproto.Listener // a guest listener's socket (not a VM directory's)
}

func (r *running) stop() {
	r.cancel()
	<-r.done
}

type runningExport struct {
	spec Export
	e    *hostagent.Export
	wd   *hostagent.Watchdog
	auto *running // nil when publishing only when told
}

func (r *runningExport) close() {
	if r.auto != nil {
		r.auto.stop()
	}
	r.e.Close()
	r.wd.Close()
}

// New starts an agent serving s until ctx ends: it takes over what the
// run before left (an upgrade's state, the files systemd's fd store
// kept), locks the state directory, listens on the control socket and
// every address, opens and publishes every export. If any fails, it lets
// go of everything and says why. Run serves the control socket; Close
// ends the agent.
func New(ctx context.Context, s *Settings, opt Options) (_ *Agent, err error) {
	log := opt.Logger
	if err := checkStateDir(s); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(s.StateDir, 0o700); err != nil {
		return nil, err
	}
	if err := hostagent.TrustedPath(s.StateDir, false); err != nil {
		// Whoever can write it could plant symlinks where the agent
		// writes its records.
		return nil, fmt.Errorf("state directory %s: %w: the agent keeps its freeze records and lease journals there", s.StateDir, err)
	}
	store, err := upgrade.OpenFDStore(s.FDStore, log)
	if err != nil {
		return nil, err
	}
	inherited := upgrade.Take(store, log)
	a := &Agent{opt: opt, log: log, store: store, inherited: inherited,
		listens: map[string]*running{}, extra: map[string]vsockproto.Addr{}, exports: map[string]*runningExport{}, lost: map[string]Export{}}
	a.grp, a.ctx = errgroup.WithContext(ctx)
	if a.lock, err = inherited.StateLock(s.StateDir); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			a.lock.Close()
		}
	}()
	if a.ctl, err = inherited.Control(s.Control, vsockproto.ListenOptions{Mode: 0o600, Stale: a.staleLogger()}); err != nil {
		return nil, &ControlError{s.Control, err}
	}
	defer func() {
		if err != nil {
			a.ctl.Close()
		}
	}()
	a.srv, err = hostagent.NewServer(nil, hostagent.ServerOptions{
		Lease:     lease.Config{AckTimeout: s.AckTimeout, Grace: s.Grace, MaxPerGuest: s.MaxLeasesPerGuest, MaxSessionsPerGuest: s.MaxSessionsPerGuest},
		Limits:    s.Limits,
		Logger:    log,
		Version:   opt.Version,
		Listeners: a,
		Reload:    a.Reload,
		Upgrade:   a.Upgrade,
	})
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			a.stop()
		}
	}()
	if opt.Starting != nil {
		defer opt.Starting("publishing the first generations")()
	}
	// Every address and export is checked and taken before anything is
	// frozen.
	a.mu.Lock()
	defer a.mu.Unlock()
	inherited.KeepOnly(func(name, dev, mnt string) bool { return slices.Contains(s.Exports, Export{name, dev, mnt}) })
	a.loadExtra(s.StateDir)
	err = a.apply(s)
	inherited.Rest()
	if err != nil {
		return nil, err
	}
	return a, nil
}

// A ControlError is a control socket that cannot be had.
type ControlError struct {
	Addr vsockproto.Addr
	Err  error
}

func (e *ControlError) Error() string { return fmt.Sprintf("control %s: %v", e.Addr, e.Err) }
func (e *ControlError) Unwrap() error { return e.Err }

// A ListenError is a guest address that cannot be served.
type ListenError struct {
	Addr vsockproto.Addr
	Err  error
}

func (e *ListenError) Error() string { return fmt.Sprintf("listen %s: %v", e.Addr, e.Err) }
func (e *ListenError) Unwrap() error { return e.Err }

// Server is the agent's server (for its metrics).
func (a *Agent) Server() *hostagent.Server { return a.srv }

// Run serves the control socket, watches the exports' mounts and keeps
// the status line up to date until the context New was given ends, and
// waits for everything the agent serves to end.
func (a *Agent) Run() error {
	a.grp.Go(func() error { return a.srv.ServeControl(a.ctx, a.ctl) })
	a.grp.Go(func() error { a.watchMounts(a.ctx); return nil })
	a.grp.Go(func() error { a.reportStatus(a.ctx); return nil })
	a.log.Info("ready", "exports", a.exportNames(), "listen", a.ListenAddrs())
	a.notify(Ready, a.srv.Status().Summary())
	return a.grp.Wait()
}

// Close ends the agent: its guests first, then what they were served.
// With systemd's fd store, the files they hold stay leased there for
// the next run.
func (a *Agent) Close() {
	how := "its guests' leases revoked"
	if a.store != nil {
		how = "the files its guests hold kept in systemd's fd store for the next run"
	}
	a.notify(Stopping, "stopping: "+how)
	a.log.Info("stopping", "held", how)
	a.stop()
	a.ctl.Close()
	a.lock.Close()
	a.log.Info("stopped")
}

// stop ends the server and everything started.
func (a *Agent) stop() {
	if a.store != nil {
		a.srv.Leave()
	} else {
		a.srv.Close()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range a.listens {
		r.cancel()
	}
	for _, r := range a.exports {
		r.close()
	}
}

func (a *Agent) notify(ev Event, status string) {
	if a.opt.Notify != nil {
		a.opt.Notify(ev, status)
	}
}

func (a *Agent) exportNames() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Sorted(maps.Keys(a.exports))
}

func (a *Agent) staleLogger() func(string) {
	return func(path string) { a.log.Warn("replaced a stale socket nobody served", "path", path) }
}

// checkStateDir refuses a state directory on an export.
func checkStateDir(s *Settings) error {
	for _, sp := range s.Exports {
		if sameFS(s.StateDir, sp.Mount) {
			return &StateDirError{s.StateDir, sp.Mount}
		}
	}
	return nil
}

// A StateDirError is a state directory on an export.
type StateDirError struct{ Dir, Mount string }

func (e *StateDirError) Error() string { return "state directory " + e.Dir + ": " + e.Why() }

// Why says what is wrong with the directory, without naming it.
func (e *StateDirError) Why() string {
	return "it is on the export at " + e.Mount + " itself; the agent would wait on its own freeze: choose a directory on another filesystem"
}

// CheckStateDir refuses a state directory on one of s's exports.
func CheckStateDir(s *Settings) error { return checkStateDir(s) }

// sameFS reports whether path (or, if it does not exist yet, its nearest
// existing parent) is on the filesystem mounted at mnt.
func sameFS(path, mnt string) bool {
	var a, b unix.Stat_t
	if unix.Stat(mnt, &b) != nil {
		return false
	}
	for p := filepath.Clean(path); ; p = filepath.Dir(p) {
		if unix.Stat(p, &a) == nil {
			return a.Dev == b.Dev
		}
		if p == filepath.Dir(p) {
			return false
		}
	}
}

// start runs serve in the agent's group until it ends or is stopped. A
// listener or an export's auto-publishing that fails (a VM directory
// removed, say) is logged and ends alone: it does not take the agent and
// every other guest with it.
func (a *Agent) start(serve func(context.Context) error) *running {
	ctx, cancel := context.WithCancel(a.ctx)
	r := &running{cancel: cancel, done: make(chan struct{})}
	a.grp.Go(func() error {
		defer close(r.done)
		if err := serve(ctx); err != nil && ctx.Err() == nil {
			a.log.Error("stopped serving", "error", err)
		}
		return nil
	})
	return r
}

// watchMounts checks every second, until ctx ends, that each export's
// filesystem is still mounted as it was (hostagent.Export.Mounted). One
// that went away — unmounted, even lazily; remounted read-only; its
// device gone — is lost: its publishing stops, its guests are told and
// follow the lease contract (their open files answer errors), and status,
// metrics and systemd's status say so. A reload tries it again. A check
// that cannot tell (the agent out of descriptors a moment) loses nothing.
func (a *Agent) watchMounts(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	unsure := rate.NewLimiter(rate.Every(time.Minute), 1)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		a.mu.Lock()
		for _, name := range slices.Sorted(maps.Keys(a.exports)) {
			r := a.exports[name]
			err := r.e.Mounted()
			if err == nil {
				continue
			}
			if !errors.Is(err, hostagent.ErrGone) {
				// Out of descriptors or memory for a moment: that is
				// no reason to give the export up.
				if unsure.Allow() {
					a.log.Warn("cannot check an export's mount; trying again", "export", name, "error", err)
				}
				continue
			}
			a.log.Error("export lost: its filesystem went away; no longer publishing or serving it. Mount it again and reload, or remove it from the settings",
				"export", name, "mount", r.spec.Mount, "error", err)
			if r.auto != nil {
				r.auto.stop()
				r.auto = nil
			}
			if err := a.srv.LoseExport(name, err); err != nil {
				a.log.Error("removing a lost export", "export", name, "error", err)
			}
			r.close()
			delete(a.exports, name)
			a.lost[name] = r.spec
			a.notify(Status, a.srv.Status().Summary())
		}
		a.mu.Unlock()
	}
}

// statusEvery is how often the status line is looked at again.
const statusEvery = 5 * time.Second

// reportStatus tells Notify the status line when it changes, until ctx
// ends.
func (a *Agent) reportStatus(ctx context.Context) {
	t := time.NewTicker(statusEvery)
	defer t.Stop()
	last := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if line := a.srv.Status().Summary(); line != last {
			a.notify(Status, line)
			last = line
		}
	}
}

// AddListener serves guests on addr from now on, across reloads too,
// until RemoveListener (hostagent.Listeners, for 'leasefs listen').
func (a *Agent) AddListener(s string) error {
	return a.withListener(s, func(key string, addr vsockproto.Addr) error {
		switch {
		case addr.Path != "" && !filepath.IsAbs(addr.Path):
			// The agent's working directory is not the caller's.
			return fmt.Errorf("%s: a socket path must be absolute", s)
		case strings.ContainsFunc(key, unicode.IsControl):
			return fmt.Errorf("%q: no control characters (a newline, say) in an address", s)
		case a.listens[key] != nil:
			return fmt.Errorf("already listening on %s", key)
		}
		serve, l, err := a.bind(addr)
		if err != nil {
			return err
		}
		a.listens[key], a.extra[key] = a.start(serve), addr
		a.listens[key].l = l
		a.saveExtra(a.s.StateDir)
		a.log.Info("listening (added through the control socket)", "addr", key)
		return nil
	})
}

// RemoveListener stops serving addr, however it was added; the guests
// connected through it stay connected. One from the settings comes back
// at the next reload.
func (a *Agent) RemoveListener(s string) error {
	return a.withListener(s, func(key string, _ vsockproto.Addr) error {
		r := a.listens[key]
		if r == nil {
			return fmt.Errorf("not listening on %s", key)
		}
		r.stop()
		delete(a.listens, key)
		if _, ok := a.extra[key]; ok {
			delete(a.extra, key)
			a.saveExtra(a.s.StateDir)
		}
		a.log.Info("stopped listening (through the control socket)", "addr", key)
		return nil
	})
}

// withListener runs fn on the parsed address s and its key, a.mu held.
func (a *Agent) withListener(s string, fn func(key string, addr vsockproto.Addr) error) error {
	addr, err := vsockproto.ParseAddr(s)
	if err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return fn(addr.String(), addr)
}

// ListenAddrs lists the addresses served.
func (a *Agent) ListenAddrs() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Sorted(maps.Keys(a.listens))
}

// bind takes addr for guests (or, for a directory of VM sockets, checks
// it) and returns how to serve it, and what to close if it is not.
func (a *Agent) bind(addr vsockproto.Addr) (func(context.Context) error, *vsockproto.Listener, error) {
	if addr.Kind == vsockproto.KindVMDir {
		if st, err := os.Stat(addr.Path); err != nil || !st.IsDir() {
			if err == nil {
				err = errors.New("not a directory")
			}
			return nil, nil, &ListenError{addr, fmt.Errorf("want a directory of VM sockets: %v", err)}
		}
		if err := hostagent.CheckVMDir(addr.Path); err != nil {
			return nil, nil, &ListenError{addr, err}
		}
		return func(ctx context.Context) error {
			return a.srv.ServeVMDir(ctx, addr.Path, addr.Port, vsockproto.ListenOptions{Stale: a.staleLogger()})
		}, nil, nil
	}
	l, err := a.inherited.Listener(addr, vsockproto.ListenOptions{Stale: a.staleLogger()})
	if err != nil {
		return nil, nil, &ListenError{addr, err}
	}
	return func(ctx context.Context) error { return a.srv.Serve(ctx, l) }, l, nil
}

// extraFile keeps, in the state directory, the listen addresses added
// through the control socket, so that upgrades and restarts serve them
// too, as they serve the settings' own.
func extraFile(stateDir string) string { return filepath.Join(stateDir, "listen.added") }

// saveExtra writes a.extra to extraFile in stateDir; a.mu held.
func (a *Agent) saveExtra(stateDir string) {
	var b strings.Builder
	for _, key := range slices.Sorted(maps.Keys(a.extra)) {
		b.WriteString(key + "\n")
	}
	if err := hostagent.WriteFileSync(extraFile(stateDir), b.String()); err != nil {
		a.log.Error("cannot record the listen addresses added through the control socket: an upgrade or restart will not serve them", "error", err)
	}
}

// loadExtra reads what saveExtra wrote (nothing if there is none).
func (a *Agent) loadExtra(stateDir string) {
	b, err := hostagent.ReadTrusted(extraFile(stateDir), 1<<20)
	if errors.Is(err, iofs.ErrNotExist) {
		return
	}
	if err != nil {
		a.log.Warn("cannot read the listen addresses added through the control socket", "error", err)
		return
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if line == "" {
			continue
		}
		addr, err := vsockproto.ParseAddr(line)
		if err != nil {
			a.log.Warn("ignoring a recorded listen address", "addr", line, "error", err)
			continue
		}
		a.extra[addr.String()] = addr
	}
}
