// Command leasefs is the one binary of leasefs: the host agent, the guest
// agent and the tools that talk to them, as subcommands.
//
// For the host agent it keeps only what is a command's: flags and the
// settings file turned into agent.Settings (host.go), the signals, what
// systemd is told (sdnotify.go), the metrics listener, and the flag
// names in errors. The agent itself is package hostagent/agent; what one
// run leaves the next, package hostagent/upgrade. The requests to a
// running agent (publish, status, metrics, listen, reload, check-config,
// upgrade) are commands of their own that talk to its control socket.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strings"
	"syscall"

	"github.com/hashicorp/go-hclog"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/hostagent/upgrade"
)

// version is set at build time with -ldflags "-X main.version=…" (make
// build); without it, versionString finds what the Go toolchain recorded.
var version = ""

// versionString is the version, then the toolchain and platform: the
// module's version for 'go install …@vX', the commit for a build in a
// checkout.
func versionString() string {
	v := version
	if bi, ok := debug.ReadBuildInfo(); ok && v == "" {
		v = bi.Main.Version
		var rev, dirty string
		for _, s := range bi.Settings {
			switch {
			case s.Key == "vcs.revision":
				rev = s.Value[:min(12, len(s.Value))]
			case s.Key == "vcs.modified" && s.Value == "true":
				dirty = "-dirty"
			}
		}
		if (v == "" || v == "(devel)") && rev != "" {
			v = rev + dirty
		}
	}
	if v == "" {
		v = "unknown"
	}
	return fmt.Sprintf("%s (%s, %s/%s)", v, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// A command is one subcommand: its name, a line of help, and how to run
// it with the arguments after its name.
type command struct {
	name, summary string
	run           func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

var commands = []command{
	{"host", "run the host agent: publish generations, serve guests", runHost},
	{"guest", "mount an export of a host agent (the guest agent)", runGuest},
	{"publish", "publish a generation of an export now", runPublish},
	{"status", "show a host agent's exports, guests and leases", runStatus},
	{"metrics", "print a host agent's Prometheus metrics", runMetrics},
	{"listen", "add or remove a host agent's guest listen addresses", runListen},
	{"reload", "make a host agent read its settings again", runReload},
	{"check-config", "check a host agent's settings, and say what a reload would change", runCheckConfig},
	{"upgrade", "upgrade a host agent in place, its guests and open files kept", runUpgrade},
	{"thaw", "thaw exports a dead host agent left frozen", runThaw},
	{"mount", "mount an ext4 image read-only through FUSE", runMount},
	{"version", "print the version", runVersion},
	{"watchdog", "", runWatchdog},               // started by the host agent
	{upgrade.CheckCommand, "", runCheckUpgrade}, // run by an agent before it upgrades
	{"mount-helper", "", runMountHelper},        // mount.fuse.leasefs
}

func usage(w io.Writer) {
	fmt.Fprintf(w, `leasefs keeps one writer's ext4 tree readable by many VMs: the host
publishes consistent generations of the metadata, guests read them through
FUSE, and files a guest holds open are never freed under it.

Usage: leasefs COMMAND [flags] [args]

Commands:
`)
	for _, c := range commands {
		if c.summary != "" {
			fmt.Fprintf(w, "  %-13s %s\n", c.name, c.summary)
		}
	}
	fmt.Fprintf(w, `
On the host, with the export mounted read-write at /srv/mirror:
  leasefs host --export mirror=/dev/vdb:/srv/mirror --listen vsock:5000 \
      --control unix:/run/leasefs/control.sock
In each VM, with the export's disk attached read-only as /dev/vdb:
  leasefs guest --connect vsock:2:5000 --export mirror --device /dev/vdb /srv/mirror

Run 'leasefs COMMAND -h' for what a command does and its flags;
docs/operations.md for deployment and recovery.
`)
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	args := os.Args[1:]
	if strings.HasPrefix(filepath.Base(os.Args[0]), "mount.") { // mount(8)'s helper
		args = append([]string{"mount-helper"}, args...)
	}
	stopProfile := profile(args)
	err := run(ctx, args, os.Stdout, os.Stderr)
	stopProfile()
	stop()
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errUsage):
		os.Exit(2)
	default:
		if ce := (*hostagent.ControlError)(nil); errors.As(err, &ce) {
			err = fmt.Errorf("%w (is 'leasefs host --control %s' running, and are you root?)", err, ce.Addr)
		}
		prefix := ""
		if isJournalStream(os.Stderr) {
			prefix = fmt.Sprintf("<%d>", journalPriority(hclog.Error))
		}
		fmt.Fprintln(os.Stderr, prefix+"leasefs:", err)
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stdout)
		return nil
	}
	if args[0] == "--version" || args[0] == "-version" {
		args = []string{"version"}
	}
	for _, c := range commands {
		if c.name == args[0] {
			return c.run(ctx, args[1:], stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "leasefs: unknown command %q\n\n", args[0])
	usage(stderr)
	return errUsage
}

// newFlagSet is a command's flag set. Its usage message is usage (the
// usage line and a few lines on what the command does), then the flags.
func newFlagSet(name, usage string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage+"Flags:\n")
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args with fs, printing usage errors to stderr. It
// returns errUsage (exit 2) for bad flags.
func parseFlags(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	return nil
}

// profile writes a CPU profile of the command, for benchmarks, when
// LEASEFS_CPUPROFILE=PREFIX is set: to PREFIX.COMMAND.PID.pprof; and a
// heap profile as it ends, to PREFIX.COMMAND.PID.heap.
func profile(args []string) func() {
	prefix := os.Getenv("LEASEFS_CPUPROFILE")
	if prefix == "" || len(args) == 0 {
		return func() {}
	}
	f, err := os.Create(fmt.Sprintf("%s.%s.%d.pprof", prefix, args[0], os.Getpid()))
	if err != nil {
		fmt.Fprintln(os.Stderr, "leasefs: LEASEFS_CPUPROFILE:", err)
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
		if h, err := os.Create(fmt.Sprintf("%s.%s.%d.heap", prefix, args[0], os.Getpid())); err == nil {
			_ = pprof.Lookup("heap").WriteTo(h, 0)
			h.Close()
		}
	}
}
