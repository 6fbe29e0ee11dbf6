package hostagent

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// The freeze ioctls.
const (
	fiFreeze = 0xC0045877
	fiThaw   = 0xC0045878
)

// freezeFS and thawFS freeze and thaw the filesystem of fd.
func freezeFS(fd int) error { return unix.IoctlSetInt(fd, fiFreeze, 0) }
func thawFS(fd int) error   { return unix.IoctlSetInt(fd, fiThaw, 0) }

// A freeze outlives the process that made it, and writers held by it
// cannot even be killed. So the agent never freezes without a watchdog:
// a separate process, told over a pipe when a freeze starts ("F <budget
// in ms>") and ends ("T"), that thaws the filesystem itself when the
// freeze overruns its budget or when the pipe closes mid-freeze because
// the agent died.

// WatchdogMain runs the watchdog process for the filesystem mounted at
// mount, reading the agent's commands from r until it closes.
func WatchdogMain(r io.Reader, mount string, log hclog.Logger) error {
	fd, err := unix.Open(mount, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: mount, Err: err}
	}
	defer unix.Close(fd)
	var mu sync.Mutex
	var timer *time.Timer // the armed freeze's deadline; guarded by mu
	thaw := func(why string) {
		err := thawFS(fd)
		log.Error("thawed the export", "why", why, "mount", mount, "thaw_error", err)
	}
	lines := bufio.NewScanner(r)
	for lines.Scan() {
		cmd, arg, _ := strings.Cut(lines.Text(), " ")
		mu.Lock()
		if timer != nil {
			timer.Stop()
			timer = nil
		}
		if cmd == "F" {
			ms, err := strconv.Atoi(arg)
			if err != nil || ms <= 0 {
				ms = 2000
			}
			timer = time.AfterFunc(time.Duration(ms)*time.Millisecond, func() {
				mu.Lock()
				defer mu.Unlock()
				if timer != nil {
					timer = nil
					thaw(fmt.Sprintf("the freeze overran its budget of %d ms", ms))
				}
			})
		}
		mu.Unlock()
	}
	mu.Lock()
	defer mu.Unlock()
	if timer != nil {
		timer.Stop()
		thaw("the agent went away during a freeze")
	}
	return nil
}

// Watchdog is the agent's end of a watchdog process.
type Watchdog struct {
	cmd  *exec.Cmd
	pipe io.WriteCloser
	done chan error
}

// StartWatchdog starts cmd, which must run WatchdogMain on its stdin.
func StartWatchdog(cmd *exec.Cmd) (*Watchdog, error) {
	pipe, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting the freeze watchdog: %w", err)
	}
	w := &Watchdog{cmd: cmd, pipe: pipe, done: make(chan error, 1)}
	go func() { w.done <- cmd.Wait() }()
	return w, nil
}

// arm tells the watchdog a freeze is starting.
func (w *Watchdog) arm(budget time.Duration) error {
	select {
	case err := <-w.done:
		w.done <- err
		return fmt.Errorf("the freeze watchdog is not running (%v): not freezing without it", err)
	default:
	}
	_, err := fmt.Fprintf(w.pipe, "F %d\n", budget.Milliseconds())
	return err
}

// disarm tells the watchdog the freeze is over.
func (w *Watchdog) disarm() error {
	_, err := io.WriteString(w.pipe, "T\n")
	return err
}

// Close ends the watchdog.
func (w *Watchdog) Close() error {
	w.pipe.Close()
	return <-w.done
}

// ThawRecorded thaws the freezes recorded in stateDir that no publish saw
// through: for a service manager to run once the agent has stopped
// (systemd's ExecStopPost), since stopping a service may kill the agent
// and its watchdog together. A recorded filesystem that is not frozen
// is left as it is. It returns the mount points it thawed.
func ThawRecorded(stateDir string) ([]string, error) {
	records, err := filepath.Glob(filepath.Join(stateDir, "*.freezing"))
	if err != nil {
		return nil, err
	}
	var thawed []string
	var errs []error
	for _, rec := range records {
		b, err := os.ReadFile(rec)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		mount := strings.TrimSpace(string(b))
		fd, err := unix.Open(mount, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s (recorded in %s): %w", mount, rec, err))
			continue
		}
		err = thawFS(fd)
		unix.Close(fd)
		switch {
		case err == nil:
			thawed = append(thawed, mount)
		case errors.Is(err, unix.EINVAL): // not frozen
		default:
			errs = append(errs, fmt.Errorf("FITHAW %s: %w", mount, err))
			continue
		}
		os.Remove(rec)
	}
	return thawed, errors.Join(errs...)
}

// Pid is the watchdog process's, for a successor to reap once it has
// seen its pipe close at the exec.
func (w *Watchdog) Pid() int { return w.cmd.Process.Pid }
