package main

import (
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
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sync/errgroup"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/hostagent/agent"
	"github.com/leasefs/leasefs/hostagent/upgrade"
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

// hostUsage is 'leasefs host -h's text before the flags.
const hostUsage = `Usage: leasefs host [--config FILE] [--export NAME=DEVICE:MOUNTPOINT --listen ADDR] [flags]

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
` + defaultHostConfig + ` if it exists): each flag by its name, and each
export as a table, [export.NAME] with device and mount. Exports and
listen addresses from the file and the command line are served together;
any other setting is given in one place or the other, and in both is an
error. 'leasefs check-config' checks the file and says what a
reload would change; 'leasefs reload' (or SIGHUP) re-reads it:
exports and listen addresses are added and removed without touching the
others; a file with any error is refused whole and the running settings
kept.
SIGTERM or SIGINT stops the agent; 'leasefs thaw' after a crash (see
docs/operations.md).

`

// newHostFlagSet is the flag set of 'leasefs host', or of a command that
// reads the same settings (check-config), named name with usage.
func newHostFlagSet(o *hostOptions, v *hostVals, name, usage string) *flag.FlagSet {
	fs := newFlagSet(name, usage)
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
	return parseHostAs("host", hostUsage, args, stderr)
}

// parseHostAs is parseHost for command name, whose usage it is.
func parseHostAs(name, usage string, args []string, stderr io.Writer) (*hostOptions, error) {
	// The command line alone first: where the file is, and which flags
	// it sets (they win over the file's).
	probe := &hostOptions{}
	pfs := newHostFlagSet(probe, &hostVals{}, name, usage)
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
	fs := newHostFlagSet(o, v, name, usage)
	if err := parseFlags(fs, append(fileArgs, args...), stderr); err != nil {
		return nil, err
	}
	if o.keep.files < 0 {
		return nil, fmt.Errorf("--keep-files %d: must be 0 or more", o.keep.files)
	}
	if len(v.exports) == 0 || len(v.listens) == 0 || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "leasefs "+name+": need --export and --listen (on the command line or in "+probe.config+")")
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
	text, err := hostagent.ReadTrusted(path, maxSettings)
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

// hostSpellings are the host agent's requests as 'leasefs host' took
// them before they were commands of their own (reload, check-config,
// upgrade, check-upgrade): the first argument only.
var hostSpellings = map[string]func(context.Context, []string, io.Writer, io.Writer) error{
	"--reload": runReload, "--check-config": runCheckConfig, "--upgrade": runUpgrade, "--check-upgrade": runCheckUpgrade,
}

func runHost(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && hostSpellings[args[0]] != nil {
		return hostSpellings[args[0]](ctx, args[1:], stdout, stderr)
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
	if err := checkStateDir(o); err != nil {
		return err
	}
	var ml net.Listener
	if o.metrics != "control" {
		if ml, err = metricsListener(o.metrics); err != nil {
			return err
		}
		defer ml.Close()
	}
	grp, ctx := errgroup.WithContext(ctx)
	a, err := agent.New(ctx, o.settings(), agent.Options{
		Logger: log, Version: versionString(), Binary: self, Argv: os.Args, Args: args,
		Load:     func(config string) (*agent.Settings, error) { return reloadHost(args, config, o) },
		Watchdog: startWatchdog,
		Notify:   notifySystemd,
		Starting: extendStartup,
		Out:      stdout,
		Progress: func(name string) func(done, total int64) {
			return progressTo(stderr, "export "+name+": reading the inode tables")
		},
		Signals: map[os.Signal]chan<- os.Signal{syscall.SIGHUP: hup, syscall.SIGUSR2: usr2},
	})
	if err != nil {
		return withFlagNames(err)
	}
	defer a.Close()
	if ml != nil {
		grp.Go(func() error { return serveMetrics(ctx, ml, a.Server().Gatherer(), log) })
	}
	grp.Go(func() error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-usr2:
				log.Info("SIGUSR2: upgrading in place")
				if exec, err := a.Upgrade(); err != nil {
					log.Error("upgrade refused", "error", err)
				} else {
					exec()
				}
			case <-hup:
				log.Info("SIGHUP: reading the settings again", "config", o.config)
				_, _ = a.Reload(false, "")
			}
		}
	})
	fmt.Fprintln(stdout, "ready")
	grp.Go(a.Run)
	return grp.Wait()
}

// settings are the agent's settings o gives.
func (o *hostOptions) settings() *agent.Settings {
	s := &agent.Settings{Listen: o.listen, StateDir: o.stateDir, Control: o.control, FDStore: o.fdStore,
		AckTimeout: o.ackTimeout, Grace: o.grace, MaxLeasesPerGuest: o.maxLeases, MaxSessionsPerGuest: o.maxSessions,
		Limits: o.limits, AutoPublish: o.autoPublish, FreezeBudget: o.budget, FullScanEvery: o.fullEvery, ExpediteRCU: o.expedite,
		Keep: agent.Keep{Files: o.keep.files, Replaced: o.keep.replaced, ReplacedBytes: int64(o.keep.replacedMB) << 20, Generations: o.keep.generations}}
	for _, sp := range o.exports {
		s.Exports = append(s.Exports, agent.Export{Name: sp.name, Device: sp.dev, Mount: sp.mnt})
	}
	return s
}

// fixedFlags names the flags of each setting fixed while the agent runs
// (agent.FixedError's fields); metrics and log-level are the command's.
var fixedFlags = map[string]string{
	"StateDir": "state-dir", "Control": "control", "FDStore": "fd-store", "AckTimeout": "ack-timeout", "Grace": "grace",
	"MaxLeasesPerGuest": "max-leases-per-guest", "MaxSessionsPerGuest": "max-sessions-per-guest",
	"Limits":      "max-conns-per-guest, max-inflight-mb(-per-guest), max-running(-per-guest), max-generations-behind",
	"AutoPublish": "auto-publish", "FreezeBudget": "freeze-budget", "FullScanEvery": "full-scan-every", "ExpediteRCU": "expedite-rcu",
	"Keep": "keep-files, keep-replaced-files, keep-replaced-mb, keep-generations",
}

// reloadHost reads the command line args again, with its settings file
// or, for a dry run, config: agent.Options.Load. A setting fixed while
// the agent runs that differs from running's refuses it, by its flag.
func reloadHost(args []string, config string, running *hostOptions) (*agent.Settings, error) {
	if config != "" {
		args = append(slices.Clone(args), "--config", config)
	}
	var msg strings.Builder // what the command would print: the first line says why
	o, err := parseHost(args, &msg)
	if errors.Is(err, errUsage) {
		why, _, _ := strings.Cut(msg.String(), "\n")
		return nil, errors.New(why)
	}
	if err != nil {
		return nil, err
	}
	var diff []string
	if o.metrics != running.metrics {
		diff = append(diff, "metrics")
	}
	if o.logLevel != running.logLevel {
		diff = append(diff, "log-level")
	}
	for _, f := range agent.FixedChanges(running.settings(), o.settings()) {
		diff = append(diff, fixedFlags[f])
	}
	if len(diff) > 0 {
		return nil, fmt.Errorf("%s changed, which needs a restart", strings.Join(diff, ", "))
	}
	return o.settings(), nil
}

// withFlagNames says which flag an agent's error is about.
func withFlagNames(err error) error {
	var le *agent.ListenError
	var ce *agent.ControlError
	var se *agent.StateDirError
	switch {
	case errors.As(err, &le), errors.As(err, &ce):
		return fmt.Errorf("--%w", err) // --listen ADDR: why
	case errors.As(err, &se):
		return fmt.Errorf("--state-dir %s: %s", se.Dir, se.Why())
	case errors.Is(err, upgrade.ErrNoNotifySocket):
		return fmt.Errorf("--fd-store: %w", err)
	}
	return err
}

// notifySystemd tells systemd what the agent does (agent.Options.Notify).
func notifySystemd(ev agent.Event, status string) {
	switch ev {
	case agent.Ready:
		notifyReady(status)
	case agent.Reloading:
		notifyReloading(status)
	case agent.Stopping:
		notifyStopping(status)
	default:
		notify("STATUS=" + status)
	}
}

// maxSettings bounds a settings file.
const maxSettings = 1 << 20

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
func checkStateDir(o *hostOptions) error { return withFlagNames(agent.CheckStateDir(o.settings())) }

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
