package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/hashicorp/go-hclog"

	"github.com/leasefs/leasefs/guestagent"
	"github.com/leasefs/leasefs/vsockproto"
)

// guestOptions is what 'leasefs guest' is told.
type guestOptions struct {
	addr                vsockproto.Addr
	export, device, dir string
	follow              guestagent.Follow
	metrics, logFile    string
	foreground, debug   bool
}

// parseGuest checks a guest command line without acting on it.
func parseGuest(args []string, stderr io.Writer) (*guestOptions, error) {
	var o guestOptions
	var connect, follow string
	fs := newFlagSet("guest", `Usage: leasefs guest --connect ADDR --export NAME [--device PATH] [flags] MOUNTPOINT

Mounts export NAME of a host agent read-only at MOUNTPOINT. The host
publishes numbered generations of the export; the guest serves one at a
time, reading its metadata from the host and file data from --device, the
export's disk attached read-only to this VM (without it, data comes
through the host too). When a newer generation arrives the guest moves to
it (--follow) and tells the kernel exactly what changed; a file open here
keeps its bytes however the host replaces it.

ADDR is vsock:2:PORT from a VM (QEMU vhost-vsock or Firecracker), or
unix:PATH or hvsock:PATH:PORT on one machine. The command returns once the
mount is ready and serves in the background (--foreground under systemd);
'umount MOUNTPOINT' ends it. With --follow manual, SIGHUP to the server
moves it to the newest generation. 'mount -t fuse.leasefs' does the same
(see docs/operations.md).

`)
	fs.StringVar(&connect, "connect", "", "the host agent's address (required)")
	fs.StringVar(&o.export, "export", "", "the export to mount (required)")
	fs.StringVar(&o.device, "device", "", "the export's device or image, shared read-only (default: data through the host)")
	fs.StringVar(&follow, "follow", "always", "when to move to a new generation: always, interval=DURATION or manual")
	fs.StringVar(&o.metrics, "metrics", "", "serve Prometheus metrics over HTTP (/metrics) on a loopback HOST:PORT or unix:PATH")
	fs.BoolVar(&o.foreground, "foreground", false, "stay attached: serve until unmounted or signalled")
	fs.BoolVar(&o.debug, "debug", false, "log every FUSE request (implies --foreground)")
	fs.StringVar(&o.logFile, "log", "", "append the agent's log to this file (default: stderr in the foreground, none in the background)")
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
		return nil, err
	}
	o.dir = fs.Arg(0)
	o.foreground = o.foreground || o.debug
	return &o, nil
}

func runGuest(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	o, err := parseGuest(args, stderr)
	if err != nil {
		return err
	}
	if !o.foreground {
		return inBackground("guest", args)
	}
	ready := readyPipe()
	defer func() {
		if ready != nil {
			fmt.Fprintf(ready, "%v\n", err)
			ready.Close()
		}
	}()
	logOut := stderr
	if o.logFile != "" {
		f, err := os.OpenFile(o.logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		logOut = f
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "leasefs-guest", Output: logOut, Level: hclog.Info})
	var ml net.Listener
	if o.metrics != "" {
		if ml, err = metricsListener(o.metrics); err != nil {
			return err
		}
		defer ml.Close()
	}
	c, err := guestagent.NewClient(ctx, guestagent.ClientConfig{Addr: o.addr, Export: o.export, Device: o.device, Follow: o.follow, Logger: log})
	if err != nil {
		return err
	}
	defer c.Close()
	srv, err := guestagent.Mount(c.FileSystem(), o.dir, guestagent.MountConfig{FsName: "leasefs:" + o.export, Debug: o.debug, ReadAheadKB: 4096})
	if err != nil {
		return err
	}
	c.Attach(srv)
	runCtx, stop := context.WithCancel(context.Background())
	defer stop()
	go c.Run(runCtx)
	if ml != nil {
		go serveMetrics(runCtx, ml, c.Gatherer(), log)
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for range hup {
			c.Refresh()
		}
	}()
	log.Info("mounted", "export", o.export, "dir", o.dir, "generation", c.Generation())
	signalReady(&ready)
	return serveUntilUnmounted(ctx, srv, o.dir, log)
}
