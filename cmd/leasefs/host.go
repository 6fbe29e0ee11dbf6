package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sync/errgroup"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
)

// listFlag collects a repeatable flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// hostOptions is what 'leasefs host' is told.
type hostOptions struct {
	exports       []exportSpec
	listen        []vsockproto.Addr
	control       vsockproto.Addr
	metrics       string // "control", or a listener for metricsListener
	autoPublish   *hostagent.AutoPublish
	stateDir      string
	logLevel      string
	ackTimeout    time.Duration
	grace, budget time.Duration
	fullEvery     int
	expedite      bool
	maxLeases     int
	maxSessions   int
	limits        hostagent.Limits
}

type exportSpec struct{ name, dev, mnt string }

// parseHost checks a host command line without acting on it.
func parseHost(args []string, stderr io.Writer) (*hostOptions, error) {
	var o hostOptions
	var exports, listens listFlag
	var control, autoPublish string
	fs := newFlagSet("host", `Usage: leasefs host --export NAME=DEVICE:MOUNTPOINT --listen ADDR --control unix:PATH [flags]

Runs the host agent in the foreground. Each export is an ext4 filesystem on
DEVICE, mounted read-write at MOUNTPOINT, that a writer on this host keeps
changing. The agent publishes numbered generations of it: the metadata as
it stood during a freeze of a few milliseconds, taken when the tree has
been quiet a moment (--auto-publish) or when 'leasefs publish' says. Guests
connect on every --listen address (vsock:PORT, hvsock:PATH:PORT for
a Firecracker VM, hvsock-dir:DIR:PORT for every VM whose socket is in
DIR while it is there, unix:PATH), read a generation's metadata from the agent and
file data from DEVICE attached to them read-only; the agent holds every
file a guest has open, so its blocks are not reused under the guest.
'leasefs publish', 'status' and 'metrics' talk to it on --control.
SIGTERM or SIGINT stops it; 'leasefs thaw' after a crash (see
docs/operations.md).

`)
	fs.Var(&exports, "export", "an export, NAME=DEVICE:MOUNTPOINT (repeatable)")
	fs.Var(&listens, "listen", "an address to serve guests on (repeatable)")
	fs.StringVar(&control, "control", "", "the control socket, unix:PATH (required)")
	fs.StringVar(&o.metrics, "metrics", "control", "where to serve Prometheus metrics: control (the control socket, 'leasefs metrics'),\na loopback HOST:PORT or unix:PATH (HTTP, /metrics)")
	fs.StringVar(&autoPublish, "auto-publish", "quiet=2s,max=30s", "publish on changes: quiet=DURATION,max=DURATION, or off (only 'leasefs publish')")
	fs.StringVar(&o.stateDir, "state-dir", "/var/lib/leasefs", "where freezes and generation numbers are recorded (not on an export)")
	fs.DurationVar(&o.ackTimeout, "ack-timeout", 5*time.Second, "how long guests have to acknowledge a lease break (at most half the kernel's lease-break-time)")
	fs.DurationVar(&o.grace, "grace", 30*time.Second, "how long a disconnected guest keeps its leases")
	fs.DurationVar(&o.budget, "freeze-budget", 2*time.Second, "the watchdog thaws a freeze that lasts longer")
	fs.IntVar(&o.fullEvery, "full-scan-every", 20, "every Nth publish scans every inode, not just those inotify named (-1: never)")
	fs.BoolVar(&o.expedite, "expedite-rcu", true, "expedite the kernel's RCU grace periods (system-wide, /sys/kernel/rcu_expedited) for the\nmoment of each freeze: FIFREEZE then takes well under 1 ms instead of tens (see docs/benchmarks.md)")
	fs.IntVar(&o.maxLeases, "max-leases-per-guest", 65536, "the leases (open files) one guest may hold, all its sessions together\n"+
		"(a guest is a VM, or a user on a shared Unix socket); the host's files are shared besides:\n"+
		"a guest may hold at most half of what the others leave")
	fs.IntVar(&o.maxSessions, "max-sessions-per-guest", 16, "the sessions one guest may have; one more ends its oldest detached one")
	fs.IntVar(&o.limits.ConnsPerGuest, "max-conns-per-guest", 8, "the connections one guest may have open")
	var perGuestMB, allMB int
	fs.IntVar(&perGuestMB, "max-inflight-mb-per-guest", 8, "the reply bytes (MiB) one guest may have in flight")
	fs.IntVar(&allMB, "max-inflight-mb", 64, "the reply bytes (MiB) all guests together may have in flight")
	fs.IntVar(&o.limits.RunningPerGuest, "max-running-per-guest", 4, "the requests of one guest worked on at once (more wait their turn)")
	fs.IntVar(&o.limits.Running, "max-running", 32, "the requests of all guests worked on at once")
	fs.IntVar(&o.limits.GenerationsBehind, "max-generations-behind", 16, "how many generations a guest may hold the export back by")
	fs.StringVar(&o.logLevel, "log-level", "info", "trace, debug, info, warn or error")
	if err := parseFlags(fs, args, stderr); err != nil {
		return nil, err
	}
	if len(exports) == 0 || len(listens) == 0 || control == "" || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "leasefs host: need --export, --listen and --control")
		fs.Usage()
		return nil, errUsage
	}
	var err error
	if o.autoPublish, err = hostagent.ParseAutoPublish(autoPublish); err != nil {
		return nil, err
	}
	if o.control, err = vsockproto.ParseAddr(control); err != nil {
		return nil, err
	}
	if o.control.Kind != vsockproto.KindUnix {
		return nil, fmt.Errorf("--control %s: must be unix:PATH", control)
	}
	for _, l := range listens {
		a, err := vsockproto.ParseAddr(l)
		if err != nil {
			return nil, err
		}
		o.listen = append(o.listen, a)
	}
	for _, spec := range exports {
		name, rest, ok1 := strings.Cut(spec, "=")
		dev, mnt, ok2 := strings.Cut(rest, ":")
		if !ok1 || !ok2 || name == "" || dev == "" || mnt == "" {
			return nil, fmt.Errorf("--export %q: want NAME=DEVICE:MOUNTPOINT, e.g. mirror=/dev/vdb:/srv/mirror", spec)
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
	for name, v := range map[string]int{"--max-leases-per-guest": o.maxLeases, "--max-sessions-per-guest": o.maxSessions,
		"--max-conns-per-guest": o.limits.ConnsPerGuest, "--max-inflight-mb-per-guest": perGuestMB, "--max-inflight-mb": allMB,
		"--max-running-per-guest": o.limits.RunningPerGuest, "--max-running": o.limits.Running,
		"--max-generations-behind": o.limits.GenerationsBehind} {
		if v <= 0 {
			return nil, fmt.Errorf("%s %d: must be positive", name, v)
		}
	}
	o.limits.BytesPerGuest, o.limits.Bytes = int64(perGuestMB)<<20, int64(allMB)<<20
	if err := o.limits.Validate(); err != nil {
		return nil, err
	}
	return &o, nil
}

func runHost(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseHost(args, stderr)
	if err != nil {
		return err
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "leasefs-host", Output: stderr, Level: hclog.LevelFromString(o.logLevel)})
	// Everything that can be refused is refused before anything is
	// frozen: the state directory and its lock, every address, then each
	// export and its lock.
	for _, sp := range o.exports {
		if sameFS(o.stateDir, sp.mnt) {
			return fmt.Errorf("--state-dir %s is on the export at %s itself; the agent would wait on its own freeze: choose a directory on another filesystem", o.stateDir, sp.mnt)
		}
	}
	if err := os.MkdirAll(o.stateDir, 0o700); err != nil {
		return err
	}
	lock, err := hostagent.LockStateDir(o.stateDir)
	if err != nil {
		return err
	}
	defer lock.Close()
	ls, err := listenAll(o, log)
	if err != nil {
		return err
	}
	defer ls.close()

	var exps []*hostagent.Export
	defer func() {
		for _, e := range exps {
			e.Close()
		}
	}()
	for _, sp := range o.exports {
		wd, err := startWatchdog(sp.mnt)
		if err != nil {
			return err
		}
		defer wd.Close()
		e, err := hostagent.OpenExport(hostagent.ExportConfig{Name: sp.name, Device: sp.dev, Mount: sp.mnt, StateDir: o.stateDir,
			FreezeBudget: o.budget, Watchdog: wd, Logger: log, Watch: true, FullScanEvery: o.fullEvery, ExpediteRCU: o.expedite,
			AutoPublish: o.autoPublish,
			Progress:    progressTo(stderr, "export "+sp.name+": reading the inode tables")})
		if err != nil {
			return err
		}
		exps = append(exps, e)
	}
	srv, err := hostagent.NewServer(exps, hostagent.ServerOptions{
		Lease:  lease.Config{AckTimeout: o.ackTimeout, Grace: o.grace, MaxPerGuest: o.maxLeases, MaxSessionsPerGuest: o.maxSessions},
		Limits: o.limits,
		Logger: log,
	})
	if err != nil {
		return err
	}
	defer srv.Close()
	for _, e := range exps {
		g, err := srv.Publish(e.Name())
		if err != nil {
			return fmt.Errorf("export %s: the first generation: %w", e.Name(), err)
		}
		fmt.Fprintf(stdout, "export %s: generation %d (freeze %.1f ms, %d metadata blocks)\n", e.Name(), g.Number, float64(g.Frozen.Microseconds())/1000, g.Blocks())
	}
	grp, ctx := errgroup.WithContext(ctx)
	for _, l := range ls.guests {
		grp.Go(func() error { return srv.Serve(ctx, l) })
		log.Info("listening", "addr", l.Addr().String())
	}
	for _, a := range ls.vmDirs {
		grp.Go(func() error {
			return srv.ServeVMDir(ctx, a.Path, a.Port, vsockproto.ListenOptions{
				Stale: func(path string) { log.Warn("replaced a stale socket nobody served", "path", path) }})
		})
	}
	grp.Go(func() error { return srv.ServeControl(ctx, ls.control) })
	if ls.metrics != nil {
		grp.Go(func() error { return serveMetrics(ctx, ls.metrics, srv.Gatherer(), log) })
	}
	if o.autoPublish != nil {
		for _, e := range exps {
			grp.Go(func() error { return srv.AutoPublish(ctx, e.Name()) })
		}
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	grp.Go(func() error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-hup:
				log.Info("SIGHUP: nothing to reload (the configuration is the command line); restart to change it")
			}
		}
	})
	fmt.Fprintln(stdout, "ready")
	notifyReady()
	return grp.Wait()
}

// listeners are the host agent's sockets, bound before anything is
// frozen so that a bad or taken address costs no freeze.
type listeners struct {
	guests  []*vsockproto.Listener
	vmDirs  []vsockproto.Addr // hvsock-dir: served as their VMs come and go
	control *vsockproto.Listener
	metrics net.Listener // nil: metrics through the control socket
}

func listenAll(o *hostOptions, log hclog.Logger) (_ *listeners, err error) {
	ls := &listeners{}
	defer func() {
		if err != nil {
			ls.close()
		}
	}()
	stale := func(path string) { log.Warn("replaced a stale socket nobody served", "path", path) }
	for _, a := range o.listen {
		if a.Kind == vsockproto.KindVMDir {
			if st, err := os.Stat(a.Path); err != nil || !st.IsDir() {
				return nil, fmt.Errorf("--listen %s: want a directory of VM sockets: %v", a, orNotDir(err))
			}
			ls.vmDirs = append(ls.vmDirs, a)
			continue
		}
		l, err := vsockproto.Listen(a, vsockproto.ListenOptions{Stale: stale})
		if err != nil {
			return nil, fmt.Errorf("--listen %s: %w", a, err)
		}
		ls.guests = append(ls.guests, l)
	}
	if ls.control, err = vsockproto.Listen(o.control, vsockproto.ListenOptions{Mode: 0o600, Stale: stale}); err != nil {
		return nil, fmt.Errorf("--control %s: %w", o.control, err)
	}
	if o.metrics != "control" {
		if ls.metrics, err = metricsListener(o.metrics); err != nil {
			return nil, err
		}
	}
	return ls, nil
}

func orNotDir(err error) error {
	if err == nil {
		return errors.New("not a directory")
	}
	return err
}

func (ls *listeners) close() {
	for _, l := range ls.guests {
		l.Close()
	}
	if ls.control != nil {
		ls.control.Close()
	}
	if ls.metrics != nil {
		ls.metrics.Close()
	}
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
