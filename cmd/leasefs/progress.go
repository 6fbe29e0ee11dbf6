package main

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// progressTo returns a progress callback that shows label and how far,
// on one line redrawn at most five times a second, when w is a terminal;
// otherwise it shows nothing (a log or journal has no use for it).
func progressTo(w io.Writer, label string) func(done, total int64) {
	f, ok := w.(*os.File)
	if !ok || !isTerminal(f) {
		return nil
	}
	return newProgress(w, label)
}

func newProgress(w io.Writer, label string) func(done, total int64) {
	var last time.Time
	finished := false
	return func(done, total int64) {
		if finished || done < total && time.Since(last) < 200*time.Millisecond {
			return
		}
		finished = done >= total
		last = time.Now()
		pct := 100.0
		if total > 0 {
			pct = 100 * float64(done) / float64(total)
		}
		end := ""
		if done >= total {
			end = "\n"
		}
		fmt.Fprintf(w, "\r%s: %3.0f%% (%d of %d MiB)%s", label, pct, done>>20, total>>20, end)
	}
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// startupTimeout is how much longer each EXTEND_TIMEOUT_USEC gives a
// start in progress; extendEvery how often it is sent.
const (
	startupTimeout = 60 * time.Second
	extendEvery    = 20 * time.Second
)

// extendStartup tells systemd, until the returned function is called,
// that the start is progressing (the first scan of a large export can
// outlast TimeoutStartSec): EXTEND_TIMEOUT_USEC at once and then
// periodically, with a STATUS line. Without a NOTIFY_SOCKET it does
// nothing.
func extendStartup(status string) (stop func()) {
	send := func() {
		_, _ = daemon.SdNotify(false, fmt.Sprintf("EXTEND_TIMEOUT_USEC=%d\nSTATUS=%s", startupTimeout.Microseconds(), status))
	}
	if os.Getenv("NOTIFY_SOCKET") == "" {
		return func() {}
	}
	send()
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(extendEvery)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				send()
			}
		}
	}()
	return func() { close(done) }
}
