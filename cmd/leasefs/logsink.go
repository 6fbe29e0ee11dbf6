package main

import (
	"bytes"
	"fmt"
	"io"
	"log/syslog"
	"os"
	"strings"
	"sync"

	"github.com/coreos/go-systemd/v22/journal"
	"github.com/hashicorp/go-hclog"
)

// Where a server logs (--log): a file, stderr, the journal, syslog (on
// /dev/log, or on the datagram socket syslog:PATH), or auto: stderr in
// the foreground; in the background the journal if it runs, else syslog
// if it listens, else nowhere (the parent says so before it detaches).
const logHelp = "where to log: stderr, journal, syslog, syslog:SOCKET, or a FILE to append to\n" +
	"(default: stderr in the foreground; the journal, else syslog, in the background)"

// logAuto is what a server started in the background is told when it
// was given no --log.
const logAuto = "auto"

// openLog opens the log destination spec for a server of the given name
// at level. Its closer is never nil.
func openLog(spec, name, level string, stderr io.Writer) (hclog.Logger, func(), error) {
	w, closer, err := logWriter(spec, name, stderr)
	if err != nil {
		return nil, nil, err
	}
	return hclog.New(&hclog.LoggerOptions{Name: name, Output: w, Level: hclog.LevelFromString(level)}), closer, nil
}

func logWriter(spec, name string, stderr io.Writer) (io.Writer, func(), error) {
	nothing := func() {}
	switch {
	case spec == "" || spec == "stderr":
		return journalStream(stderr), nothing, nil
	case spec == logAuto:
		switch {
		case journal.Enabled():
			return logWriter("journal", name, stderr)
		case syslogListening():
			return logWriter("syslog", name, stderr)
		}
		return io.Discard, nothing, nil
	case spec == "journal":
		if !journal.Enabled() {
			return nil, nil, fmt.Errorf("--log journal: the systemd journal does not run here")
		}
		return &lineSink{send: func(p hclog.Level, line string) error {
			return journal.Send(line, journalPriority(p), map[string]string{"SYSLOG_IDENTIFIER": name})
		}}, nothing, nil
	case spec == "syslog" || strings.HasPrefix(spec, "syslog:"):
		network, addr := "", ""
		if path, ok := strings.CutPrefix(spec, "syslog:"); ok {
			network, addr = "unixgram", path
		}
		s, err := syslog.Dial(network, addr, syslog.LOG_DAEMON|syslog.LOG_INFO, name)
		if err != nil {
			return nil, nil, fmt.Errorf("--log %s: %w", spec, err)
		}
		return &lineSink{send: func(p hclog.Level, line string) error { return syslogSend(s, p, line) }}, func() { s.Close() }, nil
	}
	f, err := os.OpenFile(spec, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, nil, fmt.Errorf("--log: %w", err)
	}
	return f, func() { f.Close() }, nil
}

// backgroundLogGoesNowhere reports whether a server in the background
// told --log auto would log nowhere.
func backgroundLogGoesNowhere() bool { return !journal.Enabled() && !syslogListening() }

func syslogListening() bool {
	st, err := os.Stat("/dev/log")
	return err == nil && st.Mode()&os.ModeSocket != 0
}

// lineSink turns hclog's lines into messages with a priority: it reads
// the level from the line's "[LEVEL]" tag and drops the timestamp (the
// journal and syslog stamp their own).
type lineSink struct {
	mu   sync.Mutex
	buf  []byte
	send func(hclog.Level, string) error
}

func (s *lineSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.buf = append(s.buf, p...)
	for {
		i := bytes.IndexByte(s.buf, '\n')
		if i < 0 {
			return len(p), nil
		}
		line := string(s.buf[:i])
		s.buf = s.buf[i+1:]
		level, msg := splitLevel(line)
		_ = s.send(level, msg) // a log that cannot be written is not worth failing for
	}
}

// splitLevel parses "TIMESTAMP [LEVEL]  rest".
func splitLevel(line string) (hclog.Level, string) {
	open := strings.IndexByte(line, '[')
	end := strings.IndexByte(line, ']')
	if open < 0 || end < open {
		return hclog.Info, line
	}
	level := hclog.LevelFromString(strings.ToLower(strings.TrimSpace(line[open+1 : end])))
	if level == hclog.NoLevel {
		level = hclog.Info
	}
	return level, strings.TrimSpace(line[end+1:])
}

func journalPriority(l hclog.Level) journal.Priority {
	switch {
	case l >= hclog.Error:
		return journal.PriErr
	case l == hclog.Warn:
		return journal.PriWarning
	case l == hclog.Info:
		return journal.PriInfo
	}
	return journal.PriDebug
}

func syslogSend(s *syslog.Writer, l hclog.Level, msg string) error {
	switch {
	case l >= hclog.Error:
		return s.Err(msg)
	case l == hclog.Warn:
		return s.Warning(msg)
	case l == hclog.Info:
		return s.Info(msg)
	}
	return s.Debug(msg)
}
