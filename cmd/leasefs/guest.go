package main

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/hashicorp/go-hclog"

	"github.com/leasefs/leasefs/guestagent"
	"github.com/leasefs/leasefs/internal/mountinfo"
	"github.com/leasefs/leasefs/vsockproto"
)

// guestOptions is what 'leasefs guest' is told.
type guestOptions struct {
	addr                vsockproto.Addr
	export, device, dir string
	follow              guestagent.Follow
	down                guestagent.DownPolicy
	metrics, logTo      string
	logLevel            string
	pageCache           guestagent.PageCache
	cacheMB             int
	statusSocket        string
	foreground, debug   bool
	retry               bool
	storageDaemon       bool
	linger              time.Duration
	pin                 uint64 // --generation
	pinLabel            string // --label
	showGenerations     bool
}

// parseGuest checks a guest command line without acting on it.
func parseGuest(args []string, stderr io.Writer) (*guestOptions, error) {
	var o guestOptions
	var connect, follow, pageCache, down string
	fs := newFlagSet("guest", `Usage: leasefs guest --connect ADDR --export NAME [--device PATH] [flags] MOUNTPOINT
       leasefs guest status [--json] MOUNTPOINT

Mounts export NAME of a host agent read-only at MOUNTPOINT. The host
publishes numbered generations of the export; the guest serves one at a
time, reading its metadata from the host and file data from --device, the
export's disk attached read-only to this VM (without it, data comes
through the host too). The device is checked against the export when the
guest connects: a wrong disk is refused. When a newer generation arrives
the guest moves to it (--follow) and tells the kernel exactly what
changed; a file open here keeps its bytes however the host replaces it.

ADDR is vsock:2:PORT from a VM (QEMU vhost-vsock or Firecracker), or
unix:PATH or hvsock:PATH:PORT on one machine. The command returns once the
mount is ready and serves in the background (--foreground under systemd);
'umount MOUNTPOINT' ends it; 'mount -t fuse.leasefs' mounts as this does
(see docs/operations.md). 'leasefs guest status MOUNTPOINT' shows what it
serves, and its pid: with --follow manual, SIGHUP to it moves the mount to
the newest generation.

`)
	fs.StringVar(&connect, "connect", "", "the host agent's address (required)")
	fs.StringVar(&o.export, "export", "", "the export to mount (required)")
	fs.StringVar(&o.device, "device", "", "the export's device or image, shared read-only (default: data through the host)")
	fs.StringVar(&follow, "follow", "always", "when to move to a new generation: always, interval=DURATION or manual")
	fs.Uint64Var(&o.pin, "generation", 0, "stay on this generation, one the host keeps (host --keep-generations), instead of following;\n"+
		"the host says before it drops it, and the mount then moves to the newest")
	fs.StringVar(&o.pinLabel, "label", "", "as --generation, for the newest generation the host keeps that was published with this label")
	fs.BoolVar(&o.showGenerations, "show-generations", false, "list the .generations directory in the mount's root (it is there, hidden, either way): the\n"+
		"generations the host keeps, each a directory by number, each label a link to the newest with it")
	fs.StringVar(&down, "down", "soft", "while the host agent is down or unreachable, what reads of open files, opens and\n"+
		"uncached metadata do: hard (wait until it is back, as NFS hard mounts do), soft (fail with EIO\nafter 30 s, then at once until it is back) or soft=DURATION; an export the host no longer\nserves fails at once (ESTALE)")
	fs.StringVar(&pageCache, "page-cache", "guest", "where file data is cached: guest (this kernel's page cache) or host (none here: the\n"+
		"device is read past it, so that only the host's cache of the drive holds data, once for all guests)")
	fs.IntVar(&o.cacheMB, "cache-mb", guestagent.DefaultCacheBytes>>20, "metadata cache size in MiB; the agent's memory is held to about this plus 32 MiB\n(the environment variable GOMEMLIMIT overrides that bound)")
	fs.StringVar(&o.metrics, "metrics", "", "serve Prometheus metrics over HTTP (/metrics) on a loopback HOST:PORT or unix:PATH")
	fs.StringVar(&o.statusSocket, "status-socket", "", "the status socket (default: one per mount point under "+runDir()+")")
	fs.BoolVar(&o.foreground, "foreground", false, "stay attached: serve until unmounted or signalled")
	fs.DurationVar(&o.linger, "lease-linger", 30*time.Second, "how long a file's lease is kept after its last close, so that opening it again (a program\n"+
		"start: its binary, libraries, modules) needs no round trip to the host (0: released at once)")
	fs.BoolVar(&o.storageDaemon, "storage-daemon", false, "serve a filesystem the system runs from (/usr, /): the agent names itself @leasefs-guest,\n"+
		"which systemd's final kill at shutdown spares (its rule for storage daemons of the root\n"+
		"filesystem), so it serves to the end; for a mount made in the initramfs")
	fs.BoolVar(&o.retry, "retry", false, "while the host agent cannot be reached, keep trying (every 1 s, backing off to 30 s)\ninstead of failing: for a guest started while its host restarts")
	fs.BoolVar(&o.debug, "debug", false, "log every FUSE request (implies --foreground)")
	fs.StringVar(&o.logTo, "log", "", logHelp)
	fs.StringVar(&o.logLevel, "log-level", "info", "trace, debug, info, warn or error")
	if err := parseFlags(fs, args, stderr); err != nil {
		return nil, err
	}
	if connect == "" || o.export == "" || fs.NArg() != 1 {
		fmt.Fprintln(stderr, "leasefs guest: need --connect, --export and one mount point")
		fs.Usage()
		return nil, errUsage
	}
	var err error
	if o.addr, err = vsockproto.ParseAddr(connect); err != nil {
		return nil, err
	}
	if o.follow, err = guestagent.ParseFollow(follow); err != nil {
		return nil, fmt.Errorf("--follow %w", err)
	}
	if o.down, err = guestagent.ParseDownPolicy(down); err != nil {
		return nil, fmt.Errorf("--down %w", err)
	}
	if hclog.LevelFromString(o.logLevel) == hclog.NoLevel {
		return nil, fmt.Errorf("--log-level %q: want trace, debug, info, warn or error", o.logLevel)
	}
	if o.pageCache, err = guestagent.ParsePageCache(pageCache); err != nil {
		return nil, fmt.Errorf("--page-cache %w", err)
	}
	if o.linger < 0 {
		return nil, fmt.Errorf("--lease-linger %v: must be 0 or more", o.linger)
	}
	if o.pin != 0 && o.pinLabel != "" {
		return nil, fmt.Errorf("--generation and --label: give one")
	}
	if o.cacheMB <= 0 {
		return nil, fmt.Errorf("--cache-mb %d: must be positive", o.cacheMB)
	}
	if o.dir, err = filepath.Abs(fs.Arg(0)); err != nil {
		return nil, err
	}
	if o.statusSocket == "" {
		o.statusSocket = statusSocketFor(o.dir)
	}
	o.foreground = o.foreground || o.debug
	return &o, nil
}

// runDir is where guests keep their status sockets: /run/leasefs, or
// $LEASEFS_RUN_DIR (tests, unusual layouts).
func runDir() string {
	if d := os.Getenv("LEASEFS_RUN_DIR"); d != "" {
		return d
	}
	return "/run/leasefs"
}

// statusSocketFor is the status socket of the mount at dir (absolute):
// named by a digest of the path, which fits a socket address however
// long the path is.
func statusSocketFor(dir string) string {
	sum := sha256.Sum256([]byte(filepath.Clean(dir)))
	return filepath.Join(runDir(), "guest-"+hex.EncodeToString(sum[:8])+".sock")
}

func runGuest(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	if len(args) > 0 && args[0] == "status" {
		return runGuestStatus(ctx, args[1:], stdout, stderr)
	}
	o, err := parseGuest(args, stderr)
	if err != nil {
		return err
	}
	if err := checkGuestTarget(o); err != nil {
		return err
	}
	if o.storageDaemon && (len(os.Args[0]) == 0 || os.Args[0][0] != '@') {
		// argv[0] is what systemd reads (/proc/PID/cmdline): it can
		// only be set by an exec.
		exe, err := os.Executable()
		if err != nil {
			return err
		}
		return syscall.Exec(exe, append([]string{storageDaemonName, "guest"}, args...), os.Environ())
	}
	if !o.foreground {
		if o.logTo == "" {
			if backgroundLogGoesNowhere() {
				fmt.Fprintln(stderr, "leasefs guest: no journal or syslog here: the agent will log nothing in the background (--log FILE keeps its log)")
			}
			args = append([]string{"--log", logAuto}, args...)
		}
		return inBackground("guest", args)
	}
	ready := readyPipe()
	defer func() {
		if ready != nil {
			fmt.Fprintf(ready, "%v\n", err)
			ready.Close()
		}
	}()
	log, closeLog, err := openLog(o.logTo, "leasefs-guest", o.logLevel, stderr)
	if err != nil {
		return err
	}
	defer closeLog()
	if os.Getenv("GOMEMLIMIT") == "" {
		// A soft bound: the metadata cache, the kernel's nodes, FUSE
		// request buffers in flight and garbage.
		debug.SetMemoryLimit(int64(o.cacheMB+32) << 20)
	}
	var ml net.Listener
	if o.metrics != "" {
		if ml, err = metricsListener(o.metrics); err != nil {
			return err
		}
		defer ml.Close()
	}
	if err := os.MkdirAll(filepath.Dir(o.statusSocket), 0o755); err != nil {
		return fmt.Errorf("the status socket's directory: %w", err)
	}
	sl, err := vsockproto.Listen(vsockproto.Addr{Kind: vsockproto.KindUnix, Path: o.statusSocket}, vsockproto.ListenOptions{Mode: 0o600})
	if err != nil {
		return fmt.Errorf("the status socket: %w", err)
	}
	defer sl.Close()
	c, err := connectGuest(ctx, guestagent.ClientConfig{Addr: o.addr, Export: o.export, Device: o.device, Follow: o.follow, Down: o.down,
		CacheBytes: int64(o.cacheMB) << 20, PageCache: o.pageCache, Linger: cmp.Or(o.linger, -1), Pin: o.pin, PinLabel: o.pinLabel, ShowGenerations: o.showGenerations, Logger: log}, o.retry, log)
	if err != nil {
		return err
	}
	defer c.Close()
	srv, err := guestagent.Mount(c.FileSystem(), o.dir, guestagent.MountConfig{FsName: "leasefs:" + o.export, Debug: o.debug, ReadAheadKB: 4096})
	if err != nil {
		return err
	}
	c.Attach(srv)
	if o.pageCache == guestagent.PageCacheHost && !guestagent.DirectIOMmap(srv) {
		log.Warn("this kernel cannot map files opened for direct I/O (FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6): with --page-cache=host, shared mappings of files fail with ENODEV; private ones (exec) work")
	}
	runCtx, stop := context.WithCancel(context.Background())
	defer stop()
	go c.Run(runCtx)
	go func() {
		if err := c.ServeStatus(runCtx, sl); err != nil {
			log.Error("the status socket failed", "error", err)
		}
	}()
	if ml != nil {
		go serveMetrics(runCtx, ml, c.Gatherer(), log)
	}
	go closeWhenUnmounted(runCtx, o.dir, c, log)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for range hup {
			c.Refresh()
		}
	}()
	log.Info("mounted", "export", o.export, "host", o.addr.String(), "dir", o.dir, "generation", c.Generation(),
		"device", o.device, "status", o.statusSocket)
	signalReady(&ready)
	return serveUntilUnmounted(ctx, srv, o.dir, log)
}

func runGuestStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("guest status", `Usage: leasefs guest status [--json] MOUNTPOINT

Shows what the guest agent serving MOUNTPOINT is doing: its host and
session, the generation it serves and the newest announced, its follow
policy and how the host publishes, its metadata cache against its bound,
its open files and those fenced (their reads are ESTALE: why, and when),
whether its device verified, and its last error.

`)
	asJSON := fs.Bool("json", false, "print JSON")
	socket := fs.String("status-socket", "", "the agent's status socket (default: the one for MOUNTPOINT)")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(stderr, "leasefs guest status: name one mount point")
		fs.Usage()
		return errUsage
	}
	path := *socket
	if path == "" {
		dir, err := filepath.Abs(fs.Arg(0))
		if err != nil {
			return err
		}
		path = statusSocketFor(dir)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := guestagent.GetStatus(ctx, vsockproto.Addr{Kind: vsockproto.KindUnix, Path: path})
	if err != nil {
		return fmt.Errorf("%s: %w", fs.Arg(0), err)
	}
	if *asJSON {
		return writeJSON(stdout, st)
	}
	return writeGuestStatus(stdout, st, time.Now())
}

// writeGuestStatus shows a guest's status at a glance.
func writeGuestStatus(w io.Writer, st *guestagent.Status, now time.Time) error {
	ago := func(t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		return now.Sub(t).Round(time.Second).String() + " ago"
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	conn := "connected " + ago(st.Since)
	switch {
	case !st.Connected && st.Gone != "":
		conn = "DISCONNECTED since " + ago(st.Since) + ": THE HOST NO LONGER SERVES THIS EXPORT (" + st.Gone + "); everything not cached fails with ESTALE"
	case !st.Connected:
		conn = "DISCONNECTED since " + ago(st.Since) + " (reconnecting; requests wait as --down " + st.Down + " says)"
	}
	fmt.Fprintf(tw, "host\t%s, export %s: %s; session %s, %d reconnects (%d resumed)\n", st.Host, st.Export, conn, st.Session, st.Reconnects, st.Resumes)
	gen := fmt.Sprintf("%d, since %s", st.Generation, ago(st.Switched))
	if st.Label != "" {
		gen = fmt.Sprintf("%d (%s), since %s", st.Generation, st.Label, ago(st.Switched))
	}
	if st.Latest != st.Generation {
		gen += fmt.Sprintf("; %d announced", st.Latest)
	}
	follows := "follows " + st.Follow
	if st.Follow == "manual" {
		follows += fmt.Sprintf(" (kill -HUP %d moves it to the newest)", st.Pid)
	}
	if st.Pinned {
		follows = "PINNED (--generation, --label): stays on it until the host drops it"
	}
	fmt.Fprintf(tw, "generation\t%s; %s; the host publishes %s\n", gen, follows, st.Publish)
	fmt.Fprintf(tw, "metadata cache\t%s of %s (%d hits, %d misses); the kernel holds %d nodes\n",
		sizeOf(st.Cache.Bytes), sizeOf(st.Cache.LimitBytes), st.Cache.Hits, st.Cache.Misses, st.Nodes)
	fmt.Fprintf(tw, "open files\t%d; file data cached in the %s's page cache\n", st.OpenFiles, st.PageCache)
	if d := st.Device; d != nil {
		fmt.Fprintf(tw, "device\t%s: %s (%s, checked %s)\n", d.Path, d.State, d.Detail, ago(d.Checked))
	} else {
		fmt.Fprintf(tw, "device\tnone: file data comes through the host\n")
	}
	if st.LastError != "" {
		fmt.Fprintf(tw, "last error\t%s: %s\n", ago(st.LastErrorAt), st.LastError)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(st.Fenced) > 0 {
		fmt.Fprintf(w, "\nfenced files (reads are ESTALE; open them again):\n")
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "  PATH\tINODE\tGEN\tWHEN\tWHY")
		for _, f := range st.Fenced {
			path := f.Path
			if path == "" {
				path = "?"
			}
			fmt.Fprintf(tw, "  %s\t%d\t%d\t%s\t%s\n", path, f.Inode, f.Generation, ago(f.At), f.Why)
		}
		return tw.Flush()
	}
	return nil
}

// sizeOf writes n bytes in KiB or MiB, whole.
func sizeOf(n int64) string {
	if n < 10<<20 {
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d MiB", n>>20)
}

// storageDaemonName is the guest's argv[0] with --storage-daemon: a
// first character '@' exempts a process from systemd's killing at
// shutdown (systemd.io/ROOT_STORAGE_DAEMONS).
const storageDaemonName = "@leasefs-guest"

// checkGuestTarget checks, before anything is started, what a mount
// needs: a directory to mount on that holds no leasefs mount already
// (live, or left by an agent that died), and the device, if one is
// named.
func checkGuestTarget(o *guestOptions) error {
	var st syscall.Stat_t
	switch err := syscall.Stat(o.dir, &st); {
	case errors.Is(err, syscall.ENOENT):
		return fmt.Errorf("mount point %s does not exist: create it first (mkdir -p %s)", o.dir, o.dir)
	case errors.Is(err, syscall.ENOTCONN):
		return fmt.Errorf("%s is a FUSE mount whose server died (ENOTCONN): detach it first (umount -l %s)", o.dir, o.dir)
	case err != nil:
		return fmt.Errorf("mount point %s: %w", o.dir, err)
	case st.Mode&syscall.S_IFMT != syscall.S_IFDIR:
		return fmt.Errorf("mount point %s is not a directory", o.dir)
	}
	if m, ok, _ := mountinfo.At(o.dir); ok && m.FSType == "fuse.leasefs" {
		return fmt.Errorf("%s is already a leasefs mount (%s): unmount it first (umount %s), or choose another mount point", o.dir, m.Source, o.dir)
	}
	if o.device != "" {
		if _, err := os.Stat(o.device); err != nil {
			return fmt.Errorf("--device %s: %w: name the export's disk as this machine sees it (attached read-only), or leave --device out to read file data through the host", o.device, errors.Unwrap(err))
		}
	}
	return nil
}

// closeWhenUnmounted closes the client once the mount at dir is gone
// (umount from outside), so that requests still waiting for the host end
// at once and the server exits, instead of after their deadline.
func closeWhenUnmounted(ctx context.Context, dir string, c *guestagent.Client, log hclog.Logger) {
	var st syscall.Stat_t
	if syscall.Stat(dir, &st) != nil {
		return
	}
	dev := st.Dev
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		// Unmounted: the directory is another filesystem's again, or the
		// connection was aborted. Any other error (the root's
		// attributes failing for a moment, as the host restarts) is not.
		err := syscall.Stat(dir, &st)
		if err == nil && st.Dev != dev || errors.Is(err, syscall.ENOTCONN) {
			log.Warn("the mount was detached (umount, umount -l): the session with the host ends, and files still open on it read errors (EIO) from now on",
				"dir", dir)
			c.Close()
			return
		}
	}
}

// Backing off between tries to reach the host (--retry).
const (
	retryFirst = time.Second
	retryMax   = 30 * time.Second
)

// connectGuest makes the guest's client; with retry, it tries again,
// backing off, until it succeeds or ctx ends (SIGTERM), saying why in
// the log and to systemd.
func connectGuest(ctx context.Context, cfg guestagent.ClientConfig, retry bool, log hclog.Logger) (*guestagent.Client, error) {
	wait := retryFirst
	for {
		c, err := guestagent.NewClient(ctx, cfg)
		if de := (*guestagent.DeviceError)(nil); errors.As(err, &de) {
			err = fmt.Errorf("--%w", de) // with the flag's name: --device PATH: why
		} else if nk := (*guestagent.NotKeptError)(nil); errors.As(err, &nk) {
			err = fmt.Errorf("%w (more with the host's --keep-generations)", err)
		} else if errors.Is(err, guestagent.ErrNeedsDevice) {
			err = fmt.Errorf("%w: give --device (the export's disk, attached read-only)", err)
		}
		if err == nil || !retry {
			return c, err
		}
		log.Warn("cannot reach the host agent; trying again", "host", cfg.Addr.String(), "in", wait, "error", err)
		_, _ = daemon.SdNotify(false, "STATUS=waiting for the host agent at "+cfg.Addr.String()+": "+err.Error())
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(wait):
		}
		wait = min(2*wait, retryMax)
	}
}
