package main

import (
	"context"
	"flag"
	"fmt"
	"io"
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

func runHost(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var exports, listens listFlag
	var control, autoPublish, stateDir, logLevel string
	var ackTimeout, grace, budget time.Duration
	var fullEvery int
	var expedite bool
	fs := flag.NewFlagSet("host", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: leasefs host --export NAME=DEVICE:MOUNTPOINT [--export …] --listen ADDR [--listen …] --control unix:PATH [flags]

Runs the host agent in the foreground: it publishes generations of each
export (an ext4 on DEVICE, mounted read-write at MOUNTPOINT) and serves
them to guests on every --listen address (vsock:PORT, hvsock:PATH:PORT,
unix:PATH). 'leasefs publish' and 'leasefs status' talk to it through the
control socket. SIGTERM or SIGINT stops it.

Flags:
`)
		fs.PrintDefaults()
	}
	fs.Var(&exports, "export", "an export, NAME=DEVICE:MOUNTPOINT (repeatable)")
	fs.Var(&listens, "listen", "an address to serve guests on (repeatable)")
	fs.StringVar(&control, "control", "", "the control socket, unix:PATH (required)")
	fs.StringVar(&autoPublish, "auto-publish", "quiet=2s,max=30s", "publish on changes: quiet=DURATION,max=DURATION, or off (only 'leasefs publish')")
	fs.StringVar(&stateDir, "state-dir", "/var/lib/leasefs", "where freezes and generation numbers are recorded (not on an export)")
	fs.DurationVar(&ackTimeout, "ack-timeout", 5*time.Second, "how long guests have to acknowledge a lease break")
	fs.DurationVar(&grace, "grace", 30*time.Second, "how long a disconnected guest keeps its leases")
	fs.DurationVar(&budget, "freeze-budget", 2*time.Second, "the watchdog thaws a freeze that lasts longer")
	fs.IntVar(&fullEvery, "full-scan-every", 20, "every Nth publish scans every inode, not just those inotify named (-1: never)")
	fs.BoolVar(&expedite, "expedite-rcu", true, "expedite the kernel's RCU grace periods (system-wide, /sys/kernel/rcu_expedited) for the\nmoment of each freeze: FIFREEZE then takes well under 1 ms instead of tens (see docs/benchmarks.md)")
	fs.StringVar(&logLevel, "log-level", "info", "trace, debug, info, warn or error")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if len(exports) == 0 || len(listens) == 0 || control == "" || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "leasefs host: need --export, --listen and --control")
		fs.Usage()
		return errUsage
	}
	ap, err := hostagent.ParseAutoPublish(autoPublish)
	if err != nil {
		return err
	}
	ctlAddr, err := vsockproto.ParseAddr(control)
	if err != nil {
		return err
	}
	if ctlAddr.Kind != vsockproto.KindUnix {
		return fmt.Errorf("--control %s: must be unix:PATH", control)
	}
	var addrs []vsockproto.Addr
	for _, l := range listens {
		a, err := vsockproto.ParseAddr(l)
		if err != nil {
			return err
		}
		addrs = append(addrs, a)
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "leasefs-host", Output: stderr, Level: hclog.LevelFromString(logLevel)})
	type exportSpec struct{ name, dev, mnt string }
	var specs []exportSpec
	for _, spec := range exports {
		name, rest, ok1 := strings.Cut(spec, "=")
		dev, mnt, ok2 := strings.Cut(rest, ":")
		if !ok1 || !ok2 || name == "" || dev == "" || mnt == "" {
			return fmt.Errorf("--export %q: want NAME=DEVICE:MOUNTPOINT", spec)
		}
		if sameFS(stateDir, mnt) {
			return fmt.Errorf("--state-dir %s is on the export at %s itself; the agent would wait on its own freeze", stateDir, mnt)
		}
		specs = append(specs, exportSpec{name, dev, mnt})
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return err
	}

	var exps []*hostagent.Export
	defer func() {
		for _, e := range exps {
			e.Close()
		}
	}()
	for _, sp := range specs {
		name, dev, mnt := sp.name, sp.dev, sp.mnt
		wd, err := startWatchdog(mnt)
		if err != nil {
			return err
		}
		defer wd.Close()
		e, err := hostagent.OpenExport(hostagent.ExportConfig{Name: name, Device: dev, Mount: mnt, StateDir: stateDir,
			FreezeBudget: budget, Watchdog: wd, Logger: log, Watch: true, FullScanEvery: fullEvery, ExpediteRCU: expedite})
		if err != nil {
			return err
		}
		exps = append(exps, e)
	}
	srv, err := hostagent.NewServer(exps, hostagent.ServerOptions{
		Lease:  lease.Config{AckTimeout: ackTimeout, Grace: grace},
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
	for _, a := range addrs {
		l, err := vsockproto.Listen(a, vsockproto.ListenOptions{})
		if err != nil {
			return err
		}
		grp.Go(func() error { return srv.Serve(ctx, l) })
		log.Info("listening", "addr", a.String())
	}
	cl, err := vsockproto.Listen(ctlAddr, vsockproto.ListenOptions{Mode: 0o600})
	if err != nil {
		return err
	}
	grp.Go(func() error { return srv.ServeControl(ctx, cl) })
	if ap != nil {
		for _, e := range exps {
			grp.Go(func() error { return srv.AutoPublish(ctx, e.Name(), ap) })
		}
	}
	fmt.Fprintln(stdout, "ready")
	return grp.Wait()
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
