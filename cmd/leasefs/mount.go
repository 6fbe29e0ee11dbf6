package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/hashicorp/go-hclog"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/guestagent"
)

// mountConfig is what 'leasefs mount' is told.
type mountConfig struct {
	image, dir        string
	foreground, debug bool
	logFile           string
	cacheMB           int
	readAheadKB       int
	allowDirtyJournal bool
}

// readyFDEnv names the descriptor on which a background mount reports
// that it is ready ("ok\n") or why it failed.
const readyFDEnv = "LEASEFS_READY_FD"

func runMount(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var c mountConfig
	fs := newFlagSet("mount", `Usage: leasefs mount --image IMG [flags] DIR

Mounts the ext2/3/4 filesystem in IMG (an image file or block device)
read-only at DIR through FUSE, read by leasefs's own ext4 reader. The image
must not change while mounted: the kernel caches what it reads. The command
returns once the mount is ready and serves in the background; 'umount DIR'
or SIGTERM to the server ends it.

`)
	fs.StringVar(&c.image, "image", "", "the ext4 image or device to mount (required)")
	fs.BoolVar(&c.foreground, "foreground", false, "stay attached: serve until unmounted or signalled")
	fs.BoolVar(&c.debug, "debug", false, "log every FUSE request (implies --foreground)")
	fs.StringVar(&c.logFile, "log", "", logHelp)
	fs.IntVar(&c.cacheMB, "cache-mb", 32, "metadata block cache size in MiB; the server's memory is held to about this plus 48 MiB\n(the environment variable GOMEMLIMIT overrides that bound)")
	fs.IntVar(&c.readAheadKB, "readahead-kb", 4096, "kernel readahead for the mount in KiB (0: kernel default)")
	fs.BoolVar(&c.allowDirtyJournal, "allow-dirty-journal", false,
		"mount even if the journal needs recovery; it is not replayed, so recent changes are missing and reads may fail")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if c.image == "" || fs.NArg() != 1 {
		fmt.Fprintln(stderr, "leasefs mount: need --image IMG and one mount point")
		fs.Usage()
		return errUsage
	}
	c.dir = fs.Arg(0)
	if c.debug {
		c.foreground = true
	}
	if !c.foreground {
		if c.logFile == "" {
			args = append([]string{"--log", logAuto}, args...)
		}
		return inBackground("mount", args)
	}
	return mountForeground(ctx, c, stderr)
}

// inBackground starts this program's subcommand name again with
// --foreground in a new session and waits until the child reports that
// its mount is ready.
func inBackground(name string, args []string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer devnull.Close()
	cmd := exec.Command(self, append([]string{name, "--foreground"}, args...)...)
	cmd.Env = append(os.Environ(), readyFDEnv+"=3")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, devnull
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return err
	}
	w.Close()
	line, _ := bufio.NewReader(r).ReadString('\n')
	line = strings.TrimSpace(line)
	if line == "ok" {
		return cmd.Process.Release()
	}
	_ = cmd.Wait()
	if line == "" {
		line = "the server exited before the mount was ready"
	}
	return errors.New(line)
}

func mountForeground(ctx context.Context, c mountConfig, stderr io.Writer) (err error) {
	ready := readyPipe()
	defer func() {
		if ready != nil { // failed before ready: tell the parent why
			fmt.Fprintf(ready, "%v\n", err)
			ready.Close()
		}
	}()
	log, closeLog, err := openLog(c.logFile, "leasefs-mount", "info", stderr)
	if err != nil {
		return err
	}
	defer closeLog()
	if os.Getenv("GOMEMLIMIT") == "" {
		// A soft bound: the block cache, FUSE request buffers in flight
		// (up to 1 MiB each) and garbage. Without it the heap grows to
		// twice what is live before the collector runs.
		debug.SetMemoryLimit(int64(c.cacheMB+48) << 20)
	}

	img, err := os.Open(c.image)
	if err != nil {
		return err
	}
	defer img.Close()
	size, err := img.Seek(0, io.SeekEnd)
	if err != nil {
		return fmt.Errorf("%s: %w", c.image, err)
	}
	view, err := ext4ro.Open(img, &ext4ro.Options{
		Size:              size,
		CacheBytes:        int64(c.cacheMB) << 20,
		AllowDirtyJournal: c.allowDirtyJournal,
	})
	if err != nil {
		return fmt.Errorf("%s: %w", c.image, err)
	}
	fsys := guestagent.NewFileSystem(view, guestagent.Config{
		Timeout: 24 * time.Hour, // a static image never changes
		NoOpen:  true,
		Logger:  log,
	})
	srv, err := guestagent.Mount(fsys, c.dir, guestagent.MountConfig{
		FsName:      c.image,
		Debug:       c.debug,
		ReadAheadKB: c.readAheadKB,
	})
	if err != nil {
		return err
	}
	log.Info("mounted", "image", c.image, "dir", c.dir)
	signalReady(&ready)
	return serveUntilUnmounted(ctx, srv, c.dir, log)
}

// signalReady tells a background parent that the mount is ready.
func signalReady(ready **os.File) {
	notifyReady("")
	if *ready != nil {
		fmt.Fprintln(*ready, "ok")
		(*ready).Close()
		*ready = nil
	}
}

// serveUntilUnmounted serves until the mount is unmounted from outside,
// or ctx ends (a signal), when it unmounts — lazily if the mount is busy.
func serveUntilUnmounted(ctx context.Context, srv *fuse.Server, dir string, log hclog.Logger) error {
	done := make(chan struct{})
	go func() { srv.Wait(); close(done) }()
	select {
	case <-done: // unmounted from outside
	case <-ctx.Done():
		log.Info("signalled: unmounting", "dir", dir)
		if err := srv.Unmount(); err != nil {
			// Busy: detach it; the kernel finishes when the last user goes.
			log.Warn("unmount failed, detaching lazily", "error", err)
			if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
				return fmt.Errorf("unmounting %s: %w", dir, err)
			}
		}
		<-done
	}
	log.Info("unmounted", "dir", dir)
	return nil
}

// readyPipe returns the descriptor a background parent waits on, if any.
func readyPipe() *os.File {
	if os.Getenv(readyFDEnv) != "3" {
		return nil
	}
	os.Unsetenv(readyFDEnv)
	return os.NewFile(3, "ready")
}
