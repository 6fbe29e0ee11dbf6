package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/hashicorp/go-hclog"

	"github.com/leasefs/leasefs/guestagent"
	"github.com/leasefs/leasefs/vsockproto"
)

func runGuest(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	var connect, export, device, follow, logFile string
	var foreground, debug bool
	fs := flag.NewFlagSet("guest", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: leasefs guest --connect ADDR --export NAME [--device PATH] [--follow POLICY] MOUNTPOINT

Mounts export NAME of the host agent at ADDR (vsock:2:PORT from a VM,
unix:PATH or hvsock:PATH:PORT on one machine) read-only at MOUNTPOINT.
File data is read from --device, the export's device attached read-only
to this guest; without it, through the host. The command returns once the
mount is ready and serves in the background; 'umount MOUNTPOINT' ends it.
With --follow manual, SIGHUP to the server moves it to the newest
generation.

Flags:
`)
		fs.PrintDefaults()
	}
	fs.StringVar(&connect, "connect", "", "the host agent's address (required)")
	fs.StringVar(&export, "export", "", "the export to mount (required)")
	fs.StringVar(&device, "device", "", "the export's device or image, shared read-only (default: data through the host)")
	fs.StringVar(&follow, "follow", "always", "when to move to a new generation: always, interval=DURATION or manual")
	fs.BoolVar(&foreground, "foreground", false, "stay attached: serve until unmounted or signalled")
	fs.BoolVar(&debug, "debug", false, "log every FUSE request (implies --foreground)")
	fs.StringVar(&logFile, "log", "", "append the agent's log to this file (default: stderr in the foreground, none in the background)")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if connect == "" || export == "" || fs.NArg() != 1 {
		fmt.Fprintln(stderr, "leasefs guest: need --connect, --export and one mount point")
		fs.Usage()
		return errUsage
	}
	addr, err := vsockproto.ParseAddr(connect)
	if err != nil {
		return err
	}
	pol, err := guestagent.ParseFollow(follow)
	if err != nil {
		return err
	}
	if debug {
		foreground = true
	}
	if !foreground {
		return inBackground("guest", args)
	}
	dir := fs.Arg(0)

	ready := readyPipe()
	defer func() {
		if ready != nil {
			fmt.Fprintf(ready, "%v\n", err)
			ready.Close()
		}
	}()
	logOut := stderr
	if logFile != "" {
		f, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		logOut = f
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "leasefs-guest", Output: logOut, Level: hclog.Info})
	c, err := guestagent.NewClient(ctx, guestagent.ClientConfig{Addr: addr, Export: export, Device: device, Follow: pol, Logger: log})
	if err != nil {
		return err
	}
	defer c.Close()
	srv, err := guestagent.Mount(c.FileSystem(), dir, guestagent.MountConfig{FsName: "leasefs:" + export, Debug: debug, ReadAheadKB: 4096})
	if err != nil {
		return err
	}
	c.Attach(srv)
	runCtx, stop := context.WithCancel(context.Background())
	defer stop()
	go c.Run(runCtx)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for range hup {
			c.Refresh()
		}
	}()
	log.Info("mounted", "export", export, "dir", dir, "generation", c.Generation())
	signalReady(&ready)
	return serveUntilUnmounted(ctx, srv, dir, log)
}
