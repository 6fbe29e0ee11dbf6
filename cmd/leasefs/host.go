package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	iofs "io/fs"
	"maps"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"

	"github.com/BurntSushi/toml"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sync/errgroup"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/hostagent/upgrade"
	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
)

// listFlag collects a repeatable flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// hostOptions is what 'leasefs host' is told. The fields tagged with
// their flag's name cannot change while the agent runs: a reload that
// changes one is refused (listen and export can).
type hostOptions struct {
	exports     []exportSpec
	listen      []vsockproto.Addr
	control     vsockproto.Addr        `flag:"control"`
	metrics     string                 `flag:"metrics"` // "control", or a listener for metricsListener
	autoPublish *hostagent.AutoPublish `flag:"auto-publish"`
	stateDir    string                 `flag:"state-dir"`
	logLevel    string                 `flag:"log-level"`
	ackTimeout  time.Duration          `flag:"ack-timeout"`
	grace       time.Duration          `flag:"grace"`
	budget      time.Duration          `flag:"freeze-budget"`
	fullEvery   int                    `flag:"full-scan-every"`
	expedite    bool                   `flag:"expedite-rcu"`
	fdStore     bool                   `flag:"fd-store"`
	maxLeases   int                    `flag:"max-leases-per-guest"`
	maxSessions int                    `flag:"max-sessions-per-guest"`
	keep        keepOptions            `flag:"keep-files, keep-replaced-files, keep-replaced-mb, keep-generations"`
	limits      hostagent.Limits       `flag:"max-conns-per-guest, max-inflight-mb(-per-guest), max-running(-per-guest), max-generations-behind"`
	config      string
}

type exportSpec struct{ name, dev, mnt string }

// keepOptions bound what is held to keep the guests' generations whole.
type keepOptions struct {
	files, replaced, replacedMB int
	generations                 int // --keep-generations
}

// defaultHostConfig is read when --config is not given, if it exists;
// defaultControl is every command's --control.
const (
	defaultHostConfig = "/etc/leasefs/host.toml"
	defaultControl    = "unix:/run/leasefs/control.sock"
)

// hostVals are the flags parsed into other forms by finishHost.
type hostVals struct {
	exports, listens     listFlag
	control, autoPublish string
	perGuestMB, allMB    int
}

func newHostFlagSet(o *hostOptions, v *hostVals) *flag.FlagSet {
	fs := newFlagSet("host", `Usage: leasefs host [--config FILE] [--export NAME=DEVICE:MOUNTPOINT --listen ADDR] [flags]

Runs the host agent in the foreground. Each export is an ext4 filesystem on
DEVICE, mounted read-write at MOUNTPOINT, that a writer on this host keeps
changing. The agent publishes numbered generations of it: the metadata as
it stood during a freeze of a few milliseconds, taken when the tree has
been quiet a moment (--auto-publish) or when 'leasefs publish' says. Guests
connect on every --listen address (vsock:PORT, hvsock:PATH:PORT for
a Firecracker VM, hvsock-dir:DIR:PORT for every VM whose socket is in
DIR while it is there, unix:PATH), read a generation's metadata from the
agent and file data from DEVICE attached to them read-only; the agent
holds every file a guest has open, so its blocks are not reused under
the guest. 'leasefs publish', 'status' and 'metrics' talk to it on
--control.

The settings can also come from a TOML file (--config, by default
`+defaultHostConfig+` if it exists): each flag by its name, and each
export as a table, [export.NAME] with device and mount. Exports and
listen addresses from the file and the command line are served together;
any other setting is given in one place or the other, and in both is an
error. 'leasefs host --check-config' checks the file and says what a
reload would change; 'leasefs host --reload' (or SIGHUP) re-reads it:
exports and listen addresses are added and removed without touching the
others; a file with any error is refused whole and the running settings
kept.
SIGTERM or SIGINT stops the agent; 'leasefs thaw' after a crash (see
docs/operations.md).

`)
	fs.StringVar(&o.config, "config", defaultHostConfig, "the settings file (TOML), merged with the flags")
	fs.Var(&v.exports, "export", "an export, NAME=DEVICE:MOUNTPOINT (repeatable)")
	fs.Var(&v.listens, "listen", "an address to serve guests on (repeatable)")
	fs.StringVar(&v.control, "control", defaultControl, "the control socket, unix:PATH")
	fs.StringVar(&o.metrics, "metrics", "control", "where to serve Prometheus metrics: control (the control socket, 'leasefs metrics'),\na loopback HOST:PORT or unix:PATH (HTTP, /metrics)")
	fs.StringVar(&v.autoPublish, "auto-publish", "quiet=2s,max=30s", "publish on changes: quiet=DURATION,max=DURATION, or off (only 'leasefs publish')")
	fs.StringVar(&o.stateDir, "state-dir", "/var/lib/leasefs", "where freezes and generation numbers are recorded (not on an export)")
	fs.DurationVar(&o.ackTimeout, "ack-timeout", 5*time.Second, "how long guests have to acknowledge a lease break (at most half the kernel's lease-break-time)")
	fs.DurationVar(&o.grace, "grace", 30*time.Second, "how long a disconnected guest keeps its leases")
	fs.DurationVar(&o.budget, "freeze-budget", 2*time.Second, "the watchdog thaws a freeze that lasts longer")
	fs.IntVar(&o.fullEvery, "full-scan-every", 20, "every Nth publish scans every inode, not just those inotify named (-1: never)")
	fs.BoolVar(&o.fdStore, "fd-store", false, "keep the files guests hold in systemd's file-descriptor store (FileDescriptorStoreMax=),\n"+
		"so that they and their guests' sessions outlive a crash or restart of the agent; on by itself\n"+
		"when systemd says the service has a store ($FDSTORE, systemd 254)")
	fs.BoolVar(&o.expedite, "expedite-rcu", true, "expedite the kernel's RCU grace periods (system-wide, /sys/kernel/rcu_expedited) for the\nmoment of each freeze: FIFREEZE then takes well under 1 ms instead of tens (see docs/benchmarks.md)")
	fs.IntVar(&o.maxLeases, "max-leases-per-guest", 65536, "the leases (open files) one guest may hold, all its sessions together\n"+
		"(a guest is a VM, or a user on a shared Unix socket); the host's files are shared besides:\n"+
		"a guest may hold at most half of what the others leave")
	fs.IntVar(&o.keep.files, "keep-files", 262144, "the files held per export (by descriptor, O_PATH) so that a file the writer replaces or deletes stays readable\n"+
		"in the generations guests are on (at most half the host's descriptor budget; 0: none)")
	fs.IntVar(&o.keep.replaced, "keep-replaced-files", 100000, "the replaced or deleted files an export keeps for older generations; past it, or past\n"+
		"--keep-replaced-mb, the oldest generations are dropped at the next publish and their guests move on")
	fs.IntVar(&o.keep.replacedMB, "keep-replaced-mb", 8192, "the space (MiB) of the replaced or deleted files an export keeps for older generations")
	fs.IntVar(&o.keep.generations, "keep-generations", 1, "how many of the newest generations an export keeps whole, with a guest on them or not,\n"+
		"for guests to pin (leasefs guest --generation, --label); within the budgets above")
	fs.IntVar(&o.maxSessions, "max-sessions-per-guest", 16, "the sessions one guest may have; one more ends its oldest detached one")
	fs.IntVar(&o.limits.ConnsPerGuest, "max-conns-per-guest", 8, "the connections one guest may have open")
	fs.IntVar(&v.perGuestMB, "max-inflight-mb-per-guest", 8, "the reply bytes (MiB) one guest may have in flight")
	fs.IntVar(&v.allMB, "max-inflight-mb", 64, "the reply bytes (MiB) all guests together may have in flight")
	fs.IntVar(&o.limits.RunningPerGuest, "max-running-per-guest", 4, "the requests of one guest worked on at once (more wait their turn)")
	fs.IntVar(&o.limits.Running, "max-running", 32, "the requests of all guests worked on at once")
	fs.IntVar(&o.limits.GenerationsBehind, "max-generations-behind", 16, "how many generations a guest may hold the export back by")
	fs.StringVar(&o.logLevel, "log-level", "info", "trace, debug, info, warn or error")
	return fs
}

func parseHost(args []string, stderr io.Writer) (*hostOptions, error) {
	// The command line alone first: where the file is, and which flags
	// it sets (they win over the file's).
	probe := &hostOptions{}
	pfs := newHostFlagSet(probe, &hostVals{})
	if err := parseFlags(pfs, args, stderr); err != nil {
		return nil, err
	}
	set := map[string]bool{}
	pfs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var fileArgs []string
	if probe.config != "" {
		var err error
		fileArgs, err = readHostConfig(probe.config, pfs, set)
		if errors.Is(err, iofs.ErrNotExist) && !set["config"] {
			fileArgs = nil // no file where none was asked for
		} else if err != nil {
			return nil, err
		}
	}
	o, v := &hostOptions{}, &hostVals{}
	fs := newHostFlagSet(o, v)
	if err := parseFlags(fs, append(fileArgs, args...), stderr); err != nil {
		return nil, err
	}
	if o.keep.files < 0 {
		return nil, fmt.Errorf("--keep-files %d: must be 0 or more", o.keep.files)
	}
	if len(v.exports) == 0 || len(v.listens) == 0 || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "leasefs host: need --export and --listen (on the command line or in "+probe.config+")")
		fs.Usage()
		return nil, errUsage
	}
	var err error
	if o.autoPublish, err = hostagent.ParseAutoPublish(v.autoPublish); err != nil {
		return nil, fmt.Errorf("--auto-publish %w", err)
	}
	if o.control, err = vsockproto.ParseAddr(v.control); err != nil {
		return nil, err
	}
	if o.control.Kind != vsockproto.KindUnix {
		return nil, fmt.Errorf("--control %s: must be unix:PATH", v.control)
	}
	for _, l := range v.listens {
		a, err := vsockproto.ParseAddr(l)
		if err != nil {
			return nil, err
		}
		o.listen = append(o.listen, a)
	}
	for _, spec := range v.exports {
		name, rest, ok1 := strings.Cut(spec, "=")
		dev, mnt, ok2 := strings.Cut(rest, ":")
		if !ok1 || !ok2 || name == "" || dev == "" || mnt == "" {
			return nil, fmt.Errorf("--export %q: want NAME=DEVICE:MOUNTPOINT, e.g. mirror=/dev/vdb:/srv/mirror", spec)
		}
		if !validExportName(name) {
			return nil, fmt.Errorf("--export %q: export name %q: letters, digits, '.', '_' and '-' only, at most 64, not starting with '.' (it names files in --state-dir)", spec, name)
		}
		for _, other := range o.exports {
			switch {
			case other.name == name:
				return nil, fmt.Errorf("--export %q: the name %s is given twice", spec, name)
			case filepath.Clean(other.dev) == filepath.Clean(dev), filepath.Clean(other.mnt) == filepath.Clean(mnt):
				return nil, fmt.Errorf("--export %q: %s and %s are the same filesystem", spec, other.name, name)
			}
		}
		o.exports = append(o.exports, exportSpec{name, dev, mnt})
	}
	if hclog.LevelFromString(o.logLevel) == hclog.NoLevel {
		return nil, fmt.Errorf("--log-level %q: want trace, debug, info, warn or error", o.logLevel)
	}
	for name, n := range map[string]int{"--max-leases-per-guest": o.maxLeases, "--max-sessions-per-guest": o.maxSessions,
		"--max-conns-per-guest": o.limits.ConnsPerGuest, "--max-inflight-mb-per-guest": v.perGuestMB, "--max-inflight-mb": v.allMB,
		"--max-running-per-guest": o.limits.RunningPerGuest, "--max-running": o.limits.Running,
		"--max-generations-behind": o.limits.GenerationsBehind, "--keep-replaced-files": o.keep.replaced, "--keep-replaced-mb": o.keep.replacedMB,
		"--keep-generations": o.keep.generations} {
		if n <= 0 {
			return nil, fmt.Errorf("%s %d: must be positive", name, n)
		}
	}
	o.limits.BytesPerGuest, o.limits.Bytes = int64(v.perGuestMB)<<20, int64(v.allMB)<<20
	if err := o.limits.Validate(); err != nil {
		return nil, err
	}
	return o, nil
}

// readHostConfig turns the TOML file at path into flags of fs: each key
// is a flag's name (or with underscores for dashes), each [export.NAME]
// table an --export. The rule with the command line (set: the flags it
// gives): exports and listen addresses from both are served together
// (an export's name given in both places is an error, as given twice
// anywhere); any other setting may be given in one place only, and one
// given in both is an error naming both. Any key that is no flag, or a
// value of the wrong kind, is an error.
func readHostConfig(path string, fs *flag.FlagSet, set map[string]bool) ([]string, error) {
	text, err := readTrusted(path, maxSettings)
	if err != nil {
		return nil, err
	}
	var raw map[string]any
	if _, err := toml.Decode(string(text), &raw); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	bad := func(format string, a ...any) error { return fmt.Errorf("%s: "+format, append([]any{path}, a...)...) }
	var args []string
	for _, key := range slices.Sorted(maps.Keys(raw)) {
		val := raw[key]
		if key == "export" {
			tables, ok := val.(map[string]any)
			if !ok {
				return nil, bad("export: want tables [export.NAME] with device and mount")
			}
			for _, name := range slices.Sorted(maps.Keys(tables)) {
				t, ok := tables[name].(map[string]any)
				dev, _ := t["device"].(string)
				mnt, _ := t["mount"].(string)
				if !ok || len(t) != 2 || dev == "" || mnt == "" {
					return nil, bad("[export.%s]: want exactly device and mount, as strings", name)
				}
				args = append(args, "--export", name+"="+dev+":"+mnt)
			}
			continue
		}
		f := fs.Lookup(strings.ReplaceAll(key, "_", "-"))
		if f == nil || f.Name == "config" {
			return nil, bad("%q is not a setting of leasefs host (see leasefs host -h)", key)
		}
		var vals []string
		switch x := val.(type) {
		case string:
			vals = []string{x}
		case int64:
			vals = []string{strconv.FormatInt(x, 10)}
		case bool:
			vals = []string{strconv.FormatBool(x)}
		case []any:
			if f.Name != "listen" {
				return nil, bad("%s: one value, not a list", key)
			}
			for _, e := range x {
				s, ok := e.(string)
				if !ok {
					return nil, bad("%s: a list of strings", key)
				}
				vals = append(vals, s)
			}
		default:
			return nil, bad("%s: a string, a number or true/false", key)
		}
		if set[f.Name] && f.Name != "listen" {
			return nil, bad("%s is also given on the command line (--%s): give each setting in one place", key, f.Name)
		}
		for _, v := range vals {
			args = append(args, "--"+f.Name+"="+v)
		}
	}
	return args, nil
}

func runHost(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == upgrade.CheckArg {
		return runCheckUpgrade(args[1:], stdout, stderr)
	}
	if cmd := hostRequest(args); cmd != nil {
		return cmd(ctx, args, stdout, stderr)
	}
	if isUpgrade(args) {
		return runUpgrade(ctx, args, stdout, stderr)
	}
	// SIGUSR2 and SIGHUP would end the agent until they are handled:
	// taken now, they wait until it is ready (a first scan can be long).
	usr2, hup := make(chan os.Signal, 1), make(chan os.Signal, 1)
	signal.Notify(usr2, syscall.SIGUSR2)
	defer signal.Stop(usr2)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	o, err := parseHost(args, stderr)
	if err != nil {
		return err
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "leasefs-host", Output: journalStream(stderr), Level: hclog.LevelFromString(o.logLevel)})
	log.Info("starting", "version", versionString(), "pid", os.Getpid(), "config", o.config)
	self, err := os.Executable() // now: an upgrade replaces the file at this path
	if err != nil {
		return err
	}
	store, err := upgrade.OpenFDStore(o.fdStore, log)
	if err != nil {
		return fmt.Errorf("--fd-store: %w", err)
	}
	inherited := upgrade.Take(store, log)
	if err := checkStateDir(o); err != nil {
		return err
	}
	if err := os.MkdirAll(o.stateDir, 0o700); err != nil {
		return err
	}
	if err := hostagent.TrustedPath(o.stateDir, false); err != nil {
		// Whoever can write it could plant symlinks where the agent
		// writes its records.
		return fmt.Errorf("--state-dir %s: %w: the agent keeps its freeze records and lease journals there", o.stateDir, err)
	}
	lock, err := inherited.StateLock(o.stateDir)
	if err != nil {
		return err
	}
	defer lock.Close()
	ctl, err := inherited.Control(o.control, vsockproto.ListenOptions{Mode: 0o600, Stale: staleLogger(log)})
	if err != nil {
		return fmt.Errorf("--control %s: %w", o.control, err)
	}
	defer ctl.Close()
	var ml net.Listener
	if o.metrics != "control" {
		if ml, err = metricsListener(o.metrics); err != nil {
			return err
		}
		defer ml.Close()
	}
	grp, ctx := errgroup.WithContext(ctx)
	a := &hostAgent{args: args, stdout: stdout, stderr: stderr, log: log, ctx: ctx, grp: grp,
		self: self, lock: lock, ctl: ctl, inherited: inherited, store: store, hup: hup, usr2: usr2,
		listens: map[string]*running{}, extra: map[string]vsockproto.Addr{}, exports: map[string]*runningExport{},
		lost: map[string]exportSpec{}, stateDir: o.stateDir}
	srv, err := hostagent.NewServer(nil, hostagent.ServerOptions{
		Lease:     lease.Config{AckTimeout: o.ackTimeout, Grace: o.grace, MaxPerGuest: o.maxLeases, MaxSessionsPerGuest: o.maxSessions},
		Limits:    o.limits,
		Logger:    log,
		Version:   versionString(),
		Listeners: a,
		Reload:    a.reloadRequest,
		Upgrade:   a.upgrade,
	})
	if err != nil {
		return err
	}
	a.srv = srv
	defer func() {
		// The guests first, then what they were served. With an fd
		// store, the held files stay leased there for the next run.
		how := "its guests' leases revoked"
		if store != nil {
			how = "the files its guests hold kept in systemd's fd store for the next run"
		}
		notifyStopping("stopping: " + how)
		log.Info("stopping", "held", how)
		if store != nil {
			srv.Leave()
		} else {
			srv.Close()
		}
		a.stopAll()
		log.Info("stopped")
	}()
	// Every address and export is checked and taken before anything is
	// frozen.
	stopExtending := extendStartup("publishing the first generations")
	a.mu.Lock()
	inherited.KeepOnly(func(name, dev, mnt string) bool { return slices.Contains(o.exports, exportSpec{name, dev, mnt}) })
	a.loadExtra()
	err = a.apply(o)
	inherited.Rest()
	a.mu.Unlock()
	stopExtending()
	if err != nil {
		return err
	}
	grp.Go(func() error { return srv.ServeControl(ctx, ctl) })
	if ml != nil {
		grp.Go(func() error { return serveMetrics(ctx, ml, srv.Gatherer(), log) })
	}
	grp.Go(func() error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-usr2:
				log.Info("SIGUSR2: upgrading in place")
				if exec, err := a.upgrade(); err != nil {
					log.Error("upgrade refused", "error", err)
				} else {
					exec()
				}
			case <-hup:
				log.Info("SIGHUP: reading the settings again", "config", o.config)
				_, _ = a.reloadRequest(false, "")
			}
		}
	})
	grp.Go(func() error { a.watchMounts(ctx); return nil })
	grp.Go(func() error { a.reportStatus(ctx); return nil })
	fmt.Fprintln(stdout, "ready")
	log.Info("ready", "exports", slices.Sorted(maps.Keys(a.exports)), "listen", slices.Sorted(maps.Keys(a.listens)))
	notifyReady(statusLine(srv.Status()))
	return grp.Wait()
}

// hostRequest returns what runs 'leasefs host --check-config' or
// 'leasefs host --reload' when args asks for one of them.
func hostRequest(args []string) func(context.Context, []string, io.Writer, io.Writer) error {
	for _, a := range args {
		switch a {
		case "--check-config", "-check-config":
			return runCheckConfig
		case "--reload", "-reload":
			return runReload
		case "--":
			return nil
		}
	}
	return nil
}

// maxSettings bounds a settings file.
const maxSettings = 1 << 20

// readTrusted reads a file the agent acts on as root, as sshd and systemd
// read theirs: a regular file (never a FIFO, a device or a directory;
// opened without blocking and without following a symlink at its end),
// owned by root or the agent's user, writable by its owner only, of at
// most max bytes. What fails is an error naming the path and the rule.
func readTrusted(path string, max int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_NOFOLLOW|syscall.O_NOCTTY, 0)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return nil, fmt.Errorf("%s is a symlink: name the file itself", path)
		}
		return nil, err
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return nil, &iofs.PathError{Op: "fstat", Path: path, Err: err}
	}
	switch {
	case st.Mode&syscall.S_IFMT != syscall.S_IFREG:
		return nil, fmt.Errorf("%s is not a regular file (mode %#o)", path, st.Mode)
	case st.Uid != 0 && st.Uid != uint32(os.Geteuid()):
		return nil, fmt.Errorf("%s is owned by uid %d, not by root or the agent's user: whoever owns it could make the agent do anything", path, st.Uid)
	case st.Mode&0o022 != 0:
		return nil, fmt.Errorf("%s (mode %#o) is writable by group or others: make it writable by its owner only (chmod go-w)", path, st.Mode&0o7777)
	case st.Size > max:
		return nil, fmt.Errorf("%s is %d bytes, more than the %d a settings file may have", path, st.Size, max)
	}
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s grew past %d bytes while it was read", path, max)
	}
	return b, nil
}

// validExportName: an export's name names its files in the state
// directory and its held files in systemd's fd store.
func validExportName(name string) bool {
	if name == "" || len(name) > 64 || name[0] == '.' {
		return false
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

// checkStateDir refuses a state directory on an export.
func checkStateDir(o *hostOptions) error {
	for _, sp := range o.exports {
		if sameFS(o.stateDir, sp.mnt) {
			return fmt.Errorf("--state-dir %s is on the export at %s itself; the agent would wait on its own freeze: choose a directory on another filesystem", o.stateDir, sp.mnt)
		}
	}
	return nil
}

func staleLogger(log hclog.Logger) func(string) {
	return func(path string) { log.Warn("replaced a stale socket nobody served", "path", path) }
}

// hostAgent is a running host agent's exports and guest listeners, which
// a reload (SIGHUP) and 'leasefs listen' (the control socket) change.
type hostAgent struct {
	args           []string // the command line, read again with the file at each reload
	stdout, stderr io.Writer
	log            hclog.Logger
	srv            *hostagent.Server
	ctx            context.Context
	grp            *errgroup.Group
	self           string               // the binary an upgrade execs
	lock           *os.File             // the state directory's
	ctl            *vsockproto.Listener // the control socket
	store          *upgrade.FDStore     // systemd's fd store, if the unit has one
	hup, usr2      chan os.Signal       // SIGHUP's and SIGUSR2's, set up again if an upgrade fails

	mu        sync.Mutex                 // one change at a time; guards what follows
	o         *hostOptions               // the settings applied
	listens   map[string]*running        // by address
	extra     map[string]vsockproto.Addr // added through the control socket: kept across reloads, upgrades and restarts (extraFile)
	stateDir  string
	exports   map[string]*runningExport
	lost      map[string]exportSpec // exports whose filesystem went away (watchMounts), until a reload brings them back
	inherited *upgrade.Inherited    // what the run before left (an upgrade's state, the fd store's files); the first apply takes it, and then it opens afresh
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
	spec exportSpec
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

// apply makes the agent serve o's exports on o's addresses. It takes the
// new addresses and opens the new exports first, and if any fails, gives
// back what it took and changes nothing; then it serves the new,
// publishes the new exports' first generations, and stops what o no
// longer has.
func (a *hostAgent) apply(o *hostOptions) (err error) {
	if err := checkStateDir(o); err != nil {
		return err
	}
	want := maps.Clone(a.extra)
	fromSettings := map[string]bool{}
	for _, l := range o.listen {
		want[l.String()] = l
		fromSettings[l.String()] = true
	}
	type bound struct {
		serve func(context.Context) error
		l     *vsockproto.Listener
	}
	newListens := map[string]bound{}
	var taken []io.Closer
	opened := map[string]*runningExport{}
	defer func() {
		if err != nil {
			for _, c := range taken {
				c.Close()
			}
			for _, r := range opened {
				r.close()
			}
		}
	}()
	for key, addr := range want {
		if a.listens[key] != nil {
			continue
		}
		serve, l, err := a.bind(addr)
		if err != nil && !fromSettings[key] {
			// One added through the control socket, no longer to be
			// had (its directory went, say): it goes.
			a.log.Warn("a listen address added through the control socket cannot be taken again; dropping it", "addr", key, "error", err)
			delete(a.extra, key)
			a.saveExtra()
			continue
		}
		if err != nil {
			return err
		}
		if l != nil {
			taken = append(taken, l)
		}
		newListens[key] = bound{serve, l}
	}
	keep := map[string]bool{}
	for _, sp := range o.exports {
		if r := a.exports[sp.name]; r != nil && r.spec == sp {
			keep[sp.name] = true
			continue
		}
		if lost, ok := a.lost[sp.name]; ok && lost == sp {
			if err := hostagent.CheckExport(sp.dev, sp.mnt); err != nil {
				// Still gone: it stays lost, and the rest applies.
				a.log.Warn("a lost export is still not mounted; not served", "export", sp.name, "error", err)
				continue
			}
		}
		wd, err := startWatchdog(sp.mnt)
		if err != nil {
			return err
		}
		ec := hostagent.ExportConfig{Name: sp.name, Device: sp.dev, Mount: sp.mnt, StateDir: o.stateDir,
			FreezeBudget: o.budget, Watchdog: wd, Logger: a.log, Watch: true, FullScanEvery: o.fullEvery, ExpediteRCU: o.expedite,
			AutoPublish: o.autoPublish,
			KeepFiles:   cmp.Or(o.keep.files, -1), KeepReplaced: o.keep.replaced, KeepBytes: int64(o.keep.replacedMB) << 20,
			KeepGenerations: o.keep.generations,
			Progress:        progressTo(a.stderr, "export "+sp.name+": reading the inode tables")}
		a.inherited.Export(&ec)
		e, err := hostagent.OpenExport(ec)
		if err != nil {
			wd.Close()
			return err
		}
		opened[sp.name] = &runningExport{spec: sp, e: e, wd: wd}
	}

	// Committed: nothing below refuses the change.
	first := a.o == nil
	a.o = o
	for key, r := range a.listens {
		if _, ok := want[key]; !ok {
			r.stop()
			delete(a.listens, key)
			a.log.Info("stopped listening", "addr", key)
		}
	}
	for name := range a.lost {
		if !slices.ContainsFunc(o.exports, func(sp exportSpec) bool { return sp.name == name }) || opened[name] != nil {
			delete(a.lost, name)
			_ = a.srv.RemoveExport(name) // out of status
		}
	}
	for name, r := range a.exports {
		if !keep[name] {
			if err := a.srv.RemoveExport(name); err != nil {
				a.log.Error("removing an export", "export", name, "error", err)
			}
			r.close()
			delete(a.exports, name)
			a.log.Info("export removed", "export", name)
		}
	}
	for _, sp := range o.exports { // in the order given
		r := opened[sp.name]
		if r == nil {
			continue
		}
		delete(opened, sp.name)
		if err := a.addExport(r); err != nil {
			if first {
				return err
			}
			a.log.Error("an export could not be added", "export", sp.name, "error", err)
		}
	}
	for key, b := range newListens {
		a.listens[key] = a.start(b.serve)
		a.listens[key].l = b.l
		a.log.Info("listening", "addr", key)
	}
	return nil
}

// bind takes addr for guests (or, for a directory of VM sockets, checks
// it) and returns how to serve it, and what to close if it is not.
func (a *hostAgent) bind(addr vsockproto.Addr) (func(context.Context) error, *vsockproto.Listener, error) {
	if addr.Kind == vsockproto.KindVMDir {
		if st, err := os.Stat(addr.Path); err != nil || !st.IsDir() {
			return nil, nil, fmt.Errorf("--listen %s: want a directory of VM sockets: %v", addr, orNotDir(err))
		}
		if err := hostagent.CheckVMDir(addr.Path); err != nil {
			return nil, nil, fmt.Errorf("--listen %s: %w", addr, err)
		}
		return func(ctx context.Context) error {
			return a.srv.ServeVMDir(ctx, addr.Path, addr.Port, vsockproto.ListenOptions{Stale: staleLogger(a.log)})
		}, nil, nil
	}
	opt := vsockproto.ListenOptions{Stale: staleLogger(a.log)}
	l, err := a.inherited.Listener(addr, opt)
	if err != nil {
		return nil, nil, fmt.Errorf("--listen %s: %w", addr, err)
	}
	return func(ctx context.Context) error { return a.srv.Serve(ctx, l) }, l, nil
}

// AddListener serves guests on addr from now on, across reloads too,
// until RemoveListener (hostagent.Listeners, for 'leasefs listen').
func (a *hostAgent) AddListener(s string) error {
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
		a.saveExtra()
		a.log.Info("listening (added through the control socket)", "addr", key)
		return nil
	})
}

// RemoveListener stops serving addr, however it was added; the guests
// connected through it stay connected. One from the settings comes back
// at the next reload.
func (a *hostAgent) RemoveListener(s string) error {
	return a.withListener(s, func(key string, _ vsockproto.Addr) error {
		r := a.listens[key]
		if r == nil {
			return fmt.Errorf("not listening on %s", key)
		}
		r.stop()
		delete(a.listens, key)
		if _, ok := a.extra[key]; ok {
			delete(a.extra, key)
			a.saveExtra()
		}
		a.log.Info("stopped listening (through the control socket)", "addr", key)
		return nil
	})
}

// extraFile keeps, in the state directory, the listen addresses added
// through the control socket, so that upgrades and restarts serve them
// too, as they serve the settings' own.
func (a *hostAgent) extraFile() string { return filepath.Join(a.stateDir, "listen.added") }

// saveExtra writes a.extra to extraFile; a.mu held.
func (a *hostAgent) saveExtra() {
	var b strings.Builder
	for _, key := range slices.Sorted(maps.Keys(a.extra)) {
		b.WriteString(key + "\n")
	}
	if err := hostagent.WriteFileSync(a.extraFile(), b.String()); err != nil {
		a.log.Error("cannot record the listen addresses added through the control socket: an upgrade or restart will not serve them", "error", err)
	}
}

// loadExtra reads what saveExtra wrote (nothing if there is none).
func (a *hostAgent) loadExtra() {
	b, err := readTrusted(a.extraFile(), 1<<20)
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

// withListener runs fn on the parsed address s and its key, a.mu held.
func (a *hostAgent) withListener(s string, fn func(key string, addr vsockproto.Addr) error) error {
	addr, err := vsockproto.ParseAddr(s)
	if err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return fn(addr.String(), addr)
}

// ListenAddrs lists the addresses served.
func (a *hostAgent) ListenAddrs() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Sorted(maps.Keys(a.listens))
}

// addExport serves r and publishes its first generation.
func (a *hostAgent) addExport(r *runningExport) error {
	name := r.spec.name
	if err := a.srv.AddExport(r.e); err != nil {
		r.close()
		return err
	}
	if g := r.e.Current(); g != nil { // handed over by an upgrade
		fmt.Fprintf(a.stdout, "export %s: generation %d (taken over, %d kept)\n", name, g.Number, r.e.Kept())
		a.exports[name] = r
		a.startAuto(r)
		return nil
	}
	g, err := a.srv.Publish(name)
	if err != nil {
		_ = a.srv.RemoveExport(name)
		r.close()
		return fmt.Errorf("export %s: the first generation: %w", name, err)
	}
	fmt.Fprintf(a.stdout, "export %s: generation %d (freeze %.1f ms, %d metadata blocks)\n", name, g.Number, float64(g.Frozen.Microseconds())/1000, g.Blocks())
	a.exports[name] = r
	a.startAuto(r)
	return nil
}

// startAuto starts r's publishing on its own, if the settings say so.
func (a *hostAgent) startAuto(r *runningExport) {
	if a.o.autoPublish != nil {
		r.auto = a.start(func(ctx context.Context) error { return a.srv.AutoPublish(ctx, r.spec.name) })
	}
}

// start runs serve in the agent's group until it ends or is stopped. A
// listener or an export's auto-publishing that fails (a VM directory
// removed, say) is logged and ends alone: it does not take the agent and
// every other guest with it.
func (a *hostAgent) start(serve func(context.Context) error) *running {
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

func (a *hostAgent) stopAll() {
	for _, r := range a.listens {
		r.cancel()
	}
	for _, r := range a.exports {
		r.close()
	}
}

func orNotDir(err error) error {
	if err == nil {
		return errors.New("not a directory")
	}
	return err
}

// startWatchdog starts 'leasefs watchdog' for the export at mount, in its
// own process group, so that a Ctrl-C to the agent does not reach it.
func startWatchdog(mount string) (*hostagent.Watchdog, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, "watchdog", "--mount", mount)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return hostagent.StartWatchdog(cmd)
}

func runWatchdog(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("watchdog", flag.ContinueOnError)
	mount := fs.String("mount", "", "the export's mount point")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if *mount == "" {
		return errUsage
	}
	// Only the agent's pipe closing ends the watchdog.
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	return hostagent.WatchdogMain(os.Stdin, *mount, hclog.New(&hclog.LoggerOptions{Name: "leasefs-watchdog", Output: stderr}))
}

// sameFS reports whether path (or, if it does not exist yet, its nearest
// existing parent) is on the filesystem mounted at mnt.
func sameFS(path, mnt string) bool {
	var a, b syscall.Stat_t
	if syscall.Stat(mnt, &b) != nil {
		return false
	}
	for p := filepath.Clean(path); ; p = filepath.Dir(p) {
		if syscall.Stat(p, &a) == nil {
			return a.Dev == b.Dev
		}
		if p == filepath.Dir(p) {
			return false
		}
	}
}

func runThaw(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("thaw", `Usage: leasefs thaw [--state-dir DIR]

Thaws any export that a host agent froze for a publish and did not thaw:
it died mid-freeze together with its watchdog (systemd killing the whole
service, an OOM kill). It reads the freeze records in the state directory,
so it never thaws a freeze that is not leasefs's own. leasefs-host.service
runs it after every stop (ExecStopPost); by hand it is safe at any time.

`)
	stateDir := fs.String("state-dir", "/var/lib/leasefs", "the host agent's --state-dir")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return errUsage
	}
	thawed, err := hostagent.ThawRecorded(*stateDir)
	for _, m := range thawed {
		fmt.Fprintf(stdout, "thawed %s\n", m)
	}
	return err
}
