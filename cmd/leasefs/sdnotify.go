package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// What systemd is told (sd_notify(3)), when it started us as
// Type=notify; without $NOTIFY_SOCKET nothing is sent. The variable is
// left set: an upgrade in place execs the next binary with this
// environment, and it must be able to notify too (and to use the fd
// store).

// notify sends state lines to systemd.
func notify(lines ...string) {
	_, _ = daemon.SdNotify(false, strings.Join(lines, "\n"))
}

// notifyReady: started, or a reload or upgrade done.
func notifyReady(status string) {
	lines := []string{daemon.SdNotifyReady}
	if status != "" {
		lines = append(lines, "STATUS="+status)
	}
	notify(lines...)
}

// notifyReloading: a reload (or upgrade) begins; READY=1 ends it. systemd
// 253 and later want the time with it (Type=notify-reload).
func notifyReloading(status string) {
	notify("RELOADING=1", fmt.Sprintf("MONOTONIC_USEC=%d", monotonicUsec()), "STATUS="+status)
}

// notifyStopping: the agent is stopping.
func notifyStopping(status string) { notify("STOPPING=1", "STATUS="+status) }

func monotonicUsec() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano() / 1000
}

// journalStream returns w, unless w is the journal's stream (systemd
// names it in $JOURNAL_STREAM): then a writer that gives each of
// hclog's lines its priority as a "<N>" prefix (sd-daemon(3)), without
// the timestamp (the journal keeps its own), so that 'journalctl -p
// warning' shows warnings.
func journalStream(w io.Writer) io.Writer {
	f, ok := w.(*os.File)
	if !ok || !isJournalStream(f) {
		return w
	}
	return &lineSink{send: func(p hclog.Level, line string) error {
		_, err := fmt.Fprintf(f, "<%d>%s\n", journalPriority(p), line)
		return err
	}}
}

// isJournalStream reports whether f is the stream $JOURNAL_STREAM
// names (DEVICE:INODE).
func isJournalStream(f *os.File) bool {
	var dev, ino uint64
	if _, err := fmt.Sscanf(os.Getenv("JOURNAL_STREAM"), "%d:%d", &dev, &ino); err != nil {
		return false
	}
	var st unix.Stat_t
	return unix.Fstat(int(f.Fd()), &st) == nil && st.Dev == dev && st.Ino == ino
}
