package upgrade

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/vsockproto"
)

// CheckCommand is the command that makes a binary only read and check
// the host agent's settings its arguments give, and then print what
// 'version --handover' prints: "handover FORM" and its version, a line
// each.
const CheckCommand = "check-upgrade"

// ErrRefused wraps every reason Check gives not to upgrade.
var ErrRefused = errors.New("not upgrading")

// Check runs the binary an upgrade would exec, to see that it runs,
// takes the Format this one hands over, and accepts the settings args
// give (read again now, as the new run will); it returns its version.
func Check(binary string, args []string) (string, error) {
	if err := hostagent.TrustedPath(binary, true); err != nil {
		return "", fmt.Errorf("%w: %w (an upgrade runs it as the agent's user)", ErrRefused, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	run := func(argv ...string) (string, string, error) {
		var out, errOut strings.Builder
		cmd := exec.CommandContext(ctx, binary, argv...)
		cmd.Stdout, cmd.Stderr = &out, &errOut
		err := cmd.Run()
		return out.String(), firstReason(errOut.String()), err
	}
	// One run in the usual case (a binary built with -race takes a
	// second to start); a refusal runs it again, to say why.
	form := fmt.Sprintf("handover %d\n", Format)
	out, refusal, err := run(append([]string{CheckCommand}, args...)...)
	if v, ok := strings.CutPrefix(out, form); err == nil && ok {
		return strings.TrimSpace(v), nil
	}
	if out, _, err := run("version", "--handover"); err == nil && strings.HasPrefix(out, form) {
		return "", fmt.Errorf("%w: the new binary %s (%s) refuses the agent's settings: %s; fix them first",
			ErrRefused, binary, strings.TrimSpace(strings.TrimPrefix(out, form)), refusal)
	}
	if out, _, err = run("version"); err != nil {
		return "", fmt.Errorf("%w: the new binary %s does not run (%v)", ErrRefused, binary, err)
	}
	return "", fmt.Errorf("%w: the new binary %s (%s) cannot take over from this one (it predates upgrades in place, or takes another form than %d); restart instead",
		ErrRefused, binary, strings.TrimSpace(out), Format)
}

// firstReason is what a command's stderr says went wrong: its error
// line ("leasefs: …"), else its first line (a usage message's reason).
func firstReason(stderr string) string {
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	for _, l := range lines {
		if strings.HasPrefix(l, "leasefs: ") {
			return strings.TrimPrefix(l, "leasefs: ")
		}
	}
	return lines[0]
}

// Handing is what a running agent hands the binary it execs.
type Handing struct {
	From      string // this binary's version
	Server    *hostagent.Server
	StateLock *os.File
	Control   *vsockproto.Listener
	Listeners map[string]*vsockproto.Listener // by address
	Reap      []int                           // the watchdogs' pids
	Log       hclog.Logger
	// Signals the agent takes, ignored across the exec (one that came
	// before the new binary asks for it would end it) and taken again
	// if the exec fails.
	Signals map[os.Signal]chan<- os.Signal
}

// Exec stops every change to the server's exports (Server.Handover),
// hands everything over and execs binary with argv. It returns only if
// that failed, having given everything back; the server goes on.
// Whatever else must not run across the exec (publishing on its own)
// the caller stops first and starts again if Exec returns.
func Exec(binary string, argv []string, h Handing) (err error) {
	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()
	states, release, err := h.Server.Handover()
	if err != nil {
		return err
	}
	undo = append(undo, release)
	d := &Document{From: h.From, StateLock: int(h.StateLock.Fd()), Control: -1, Listeners: map[string]int{}, Exports: states, Reap: h.Reap}
	// Each socket goes as a copy: the original is non-blocking, served,
	// and goes on being so if the exec fails.
	dup := func(l *vsockproto.Listener) (int, error) {
		f, err := l.File()
		if err != nil {
			return -1, err
		}
		undo = append(undo, func() { f.Close() })
		return fdOf(f), nil
	}
	for key, l := range h.Listeners {
		if d.Listeners[key], err = dup(l); err != nil {
			return fmt.Errorf("handing over %s: %w", key, err)
		}
	}
	if h.Control != nil {
		if d.Control, err = dup(h.Control); err != nil {
			return fmt.Errorf("handing over the control socket: %w", err)
		}
		d.ControlAddr = h.Control.Addr().String()
	}
	mfd, err := unix.MemfdCreate("leasefs-handover", 0)
	if err != nil {
		return err
	}
	mf := os.NewFile(uintptr(mfd), "leasefs-handover")
	undo = append(undo, func() { mf.Close() })
	if err := Encode(mf, d); err != nil {
		return err
	}
	if _, err := mf.Seek(0, io.SeekStart); err != nil {
		return err
	}
	for _, fd := range d.descriptors() {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, 0); err != nil {
			return fmt.Errorf("keeping descriptor %d open across the exec: %w", fd, err)
		}
		undo = append(undo, func() { unix.CloseOnExec(fd) })
	}
	for sig := range h.Signals {
		signal.Ignore(sig)
	}
	undo = append(undo, func() {
		for sig, c := range h.Signals {
			signal.Notify(c, sig)
		}
	})
	env := append(os.Environ(), Env+"="+strconv.Itoa(mfd), FDsEnv+"="+joinFDs(d.descriptors()))
	h.Log.Info("executing the new binary", "binary", binary, "files_held", len(d.descriptors()), "exports", len(states))
	return fmt.Errorf("exec %s: %w", binary, syscall.Exec(binary, argv, env))
}

func joinFDs(fds []int) string {
	s := make([]string, len(fds))
	for i, fd := range fds {
		s[i] = strconv.Itoa(fd)
	}
	return strings.Join(s, ",")
}

// fdOf is f's descriptor, without making it blocking as f.Fd does: a
// socket's copy shares its mode with the original, which goes on serving
// if the exec fails.
func fdOf(f *os.File) int {
	fd := -1
	if rc, err := f.SyscallConn(); err == nil {
		_ = rc.Control(func(d uintptr) { fd = int(d) })
	}
	return fd
}
