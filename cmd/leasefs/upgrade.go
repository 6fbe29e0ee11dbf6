package main

import (
	"context"
	"encoding/gob"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
)

// An in-place upgrade (SIGUSR2, or 'leasefs host --upgrade' through the
// control socket) execs the agent's binary at its path in the same
// process, handing it the agent's state: the state directory's lock,
// the control socket and the guests' listening sockets, and per export
// its lock, block store, kept generations and held files (with their
// kernel leases; the sessions and leases are in the lease journal).
// Guests' connections close at the exec; they reconnect to the same
// sockets, resume their sessions and stay on their generations. The
// state goes in a memfd named by handoverEnv, the descriptors by number,
// kept open across the exec.

const handoverEnv = "LEASEFS_HANDOVER"

// handoverFormat numbers the form of what is handed over; a binary that
// does not print the same (leasefs version --handover) is not exec'd.
const handoverFormat = 1

// runVersion is 'leasefs version' (and --version).
func runVersion(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("version", "Usage: leasefs version [--handover]\n\nPrints the version.\n\n")
	handover := fs.Bool("handover", false, "first print the form of state this binary takes over in an upgrade in place")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if *handover {
		if _, err := fmt.Fprintln(stdout, "handover", handoverFormat); err != nil {
			return err
		}
	}
	_, err := fmt.Fprintln(stdout, "leasefs", versionString())
	return err
}

// handover is what an agent hands the binary it execs.
type handover struct {
	From        string // the version handing over
	StateLock   int
	Control     int    // -1: none
	ControlAddr string // what Control listens on
	Listeners   map[string]int
	Exports     map[string]*hostagent.ExportState
	Reap        []int // the old watchdogs' pids: they end at the exec, and are our children
}

// takeHandover reads the state a predecessor handed over, if this run is
// an upgrade's.
func takeHandover() (*handover, error) {
	v := os.Getenv(handoverEnv)
	if v == "" {
		return nil, nil
	}
	os.Unsetenv(handoverEnv)
	fd, err := strconv.Atoi(v)
	if err != nil {
		return nil, fmt.Errorf("%s=%q: %w", handoverEnv, v, err)
	}
	f := os.NewFile(uintptr(fd), "leasefs-handover")
	defer f.Close()
	h := &handover{}
	if err := gob.NewDecoder(f).Decode(h); err != nil {
		return nil, fmt.Errorf("reading the state handed over: %w", err)
	}
	for _, pid := range h.Reap {
		go func() { _, _ = unix.Wait4(pid, nil, 0, nil) }()
	}
	return h, nil
}

// listener takes the handed-over socket of addr, if there is one.
func (h *handover) listener(addr vsockproto.Addr, opt vsockproto.ListenOptions) (*vsockproto.Listener, bool, error) {
	if h == nil {
		return nil, false, nil
	}
	fd, ok := h.Listeners[addr.String()]
	if !ok {
		return nil, false, nil
	}
	delete(h.Listeners, addr.String())
	f := os.NewFile(uintptr(fd), addr.String())
	defer f.Close()
	l, err := vsockproto.FileListener(addr, f, opt)
	return l, true, err
}

// export takes the handed-over state of export sp, if there is one: of
// the same name, device and mount point.
func (h *handover) export(sp exportSpec) *hostagent.ExportState {
	if h == nil {
		return nil
	}
	st := h.Exports[sp.name]
	if st == nil || st.Device != sp.dev || st.Mount != sp.mnt {
		return nil // let go by rest
	}
	delete(h.Exports, sp.name)
	return st
}

// keepOnly lets go, before anything is opened, of the exports handed
// over that specs do not have as they were (their locks would stand in
// the way of opening the same mount afresh).
func (h *handover) keepOnly(specs []exportSpec, store *fdStore) {
	if h == nil {
		return
	}
	for name, st := range h.Exports {
		if !slices.Contains(specs, exportSpec{name, st.Device, st.Mount}) {
			letGoExport(name, st, store)
			delete(h.Exports, name)
		}
	}
}

// letGoExport closes what an export handed over, its held files' leases
// dropped and, if systemd's store keeps them, removed from it.
func letGoExport(name string, st *hostagent.ExportState, store *fdStore) {
	st.CloseKept()
	unix.Close(st.MountFD)
	unix.Close(st.StoreFD)
	var k lease.Keeper
	if store != nil {
		k = store.keeper(name)
	}
	lease.LetGo(st.Held, k)
}

// rest lets go of what was handed over and not taken: exports and
// listen addresses the settings no longer have.
func (h *handover) rest(store *fdStore) {
	if h == nil {
		return
	}
	for name, st := range h.Exports {
		letGoExport(name, st, store)
	}
	for key, fd := range h.Listeners {
		unix.Close(fd)
		// Its socket file, if it has one, is nobody's now.
		if a, err := vsockproto.ParseAddr(key); err == nil && (a.Kind == vsockproto.KindUnix || a.Kind == vsockproto.KindHybrid) {
			path := a.Path
			if a.Kind == vsockproto.KindHybrid {
				path = fmt.Sprintf("%s_%d", a.Path, a.Port)
			}
			var st unix.Stat_t
			if unix.Lstat(path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFSOCK {
				os.Remove(path)
			}
		}
	}
	h.Exports, h.Listeners = nil, nil
}

// checkUpgradeArg, first after 'host', makes the binary only read and
// check the settings the other arguments give, and print what
// 'version --handover' prints: what an upgrade asks of the binary it
// would exec, which would otherwise end on settings it refuses, with
// the agent.
const checkUpgradeArg = "--check-upgrade"

// runCheckUpgrade is 'leasefs host --check-upgrade ARGS'.
func runCheckUpgrade(args []string, stdout, stderr io.Writer) error {
	o, err := parseHost(args, stderr)
	if err != nil {
		return err
	}
	if err := checkStateDir(o); err != nil {
		return err
	}
	return runVersion(context.Background(), []string{"--handover"}, stdout, stderr)
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

// checkBinary runs the binary an upgrade would exec, to see that it
// runs, takes over what this one hands over, and accepts the settings
// args give (read again now, as the new run will); it returns its
// version.
func checkBinary(self string, args []string) (string, error) {
	if err := hostagent.TrustedPath(self, true); err != nil {
		return "", fmt.Errorf("%w: not upgrading (an upgrade runs it as the agent's user)", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	run := func(argv ...string) (string, string, error) {
		var out, errOut strings.Builder
		cmd := exec.CommandContext(ctx, self, argv...)
		cmd.Stdout, cmd.Stderr = &out, &errOut
		err := cmd.Run()
		return out.String(), firstReason(errOut.String()), err
	}
	// One run in the usual case (a binary built with -race takes a
	// second to start); a refusal runs it again, to say why.
	format := fmt.Sprintf("handover %d\n", handoverFormat)
	out, refusal, err := run(append([]string{"host", checkUpgradeArg}, args...)...)
	if v, ok := strings.CutPrefix(out, format); err == nil && ok {
		return strings.TrimSpace(v), nil
	}
	if out, _, err := run("version", "--handover"); err == nil && strings.HasPrefix(out, format) {
		return "", fmt.Errorf("the new binary %s (%s) refuses the agent's settings: %s: not upgrading; fix them first",
			self, strings.TrimSpace(strings.TrimPrefix(out, format)), refusal)
	}
	if out, _, err = run("version"); err != nil {
		return "", fmt.Errorf("the new binary %s does not run (%v): not upgrading", self, err)
	}
	return "", fmt.Errorf("the new binary %s (%s) cannot take over from this one (it predates upgrades in place, or hands over another form): not upgrading; restart instead",
		self, strings.TrimSpace(out))
}

// upgrade checks the binary at the agent's path and returns what execs
// it (hostagent.ServerOptions.Upgrade).
func (a *hostAgent) upgrade() (func(), error) {
	v, err := checkBinary(a.self, a.args)
	if err != nil {
		return nil, err
	}
	a.log.Info("upgrading in place", "binary", a.self, "to", v)
	return func() {
		// Control requests being answered are answered first; those
		// that come meanwhile wait in the socket for the successor.
		drained, reopen := a.srv.Quiesce(controlDrain)
		defer reopen() // if the exec does not happen
		if !drained {
			a.log.Warn("control requests still unanswered; upgrading anyway (their clients see the connection end)", "waited", controlDrain)
		}
		// systemd sees a reload until the new run says READY=1.
		notifyReloading("upgrading in place to " + v)
		a.mu.Lock()
		defer a.mu.Unlock()
		if err := a.execSuccessor(); err != nil {
			a.log.Error("the upgrade failed; this agent goes on", "error", err)
			notifyReady(statusLine(a.srv.Status()))
		}
	}, nil
}

// controlDrain bounds how long an upgrade waits for the control
// requests being answered (a publish of a large export takes seconds).
const controlDrain = 30 * time.Second

// execSuccessor hands everything over and execs a.self; it returns only
// if that failed, having taken everything back. Called with a.mu held.
func (a *hostAgent) execSuccessor() (err error) {
	h := &handover{From: versionString(), StateLock: -1, Control: -1, Listeners: map[string]int{}}
	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()
	for name, r := range a.exports {
		if r.auto != nil {
			r.auto.stop()
			undo = append(undo, func() {
				r.auto = a.start(func(ctx context.Context) error { return a.srv.AutoPublish(ctx, name) })
			})
		}
		h.Reap = append(h.Reap, r.wd.Pid())
	}
	states, release, err := a.srv.Handover()
	if err != nil {
		return err
	}
	undo = append(undo, release)
	h.Exports = states
	var keep []int
	dup := func(f *os.File, err error) (int, error) {
		if err != nil {
			return -1, err
		}
		undo = append(undo, func() { f.Close() })
		return fdOf(f), nil
	}
	for key, r := range a.listens {
		if r.l == nil {
			continue // a VM directory: the successor binds its sockets again
		}
		fd, err := dup(r.l.File())
		if err != nil {
			return fmt.Errorf("handing over %s: %w", key, err)
		}
		h.Listeners[key] = fd
		keep = append(keep, fd)
	}
	if h.Control, err = dup(a.ctl.File()); err != nil {
		return fmt.Errorf("handing over the control socket: %w", err)
	}
	h.ControlAddr = a.ctl.Addr().String()
	h.StateLock = int(a.lock.Fd())
	keep = append(keep, h.Control, h.StateLock)
	for _, st := range states {
		keep = append(keep, st.MountFD, st.StoreFD)
		for _, fd := range st.Held {
			keep = append(keep, fd)
		}
		for _, k := range st.Kept {
			keep = append(keep, k.FD)
		}
	}
	mfd, err := unix.MemfdCreate("leasefs-handover", 0)
	if err != nil {
		return err
	}
	mf := os.NewFile(uintptr(mfd), "leasefs-handover")
	undo = append(undo, func() { mf.Close() })
	if err := gob.NewEncoder(mf).Encode(h); err != nil {
		return err
	}
	if _, err := mf.Seek(0, io.SeekStart); err != nil {
		return err
	}
	for _, fd := range keep {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, 0); err != nil {
			return fmt.Errorf("keeping descriptor %d open across the exec: %w", fd, err)
		}
		undo = append(undo, func() { unix.CloseOnExec(fd) })
	}
	// A reload or upgrade signal in the moment the new binary has not
	// yet asked for them would end it: ignored across the exec (the new
	// run's signal.Notify takes them again).
	signal.Ignore(syscall.SIGHUP, syscall.SIGUSR2)
	undo = append(undo, func() {
		signal.Notify(a.hup, syscall.SIGHUP)
		signal.Notify(a.usr2, syscall.SIGUSR2)
	})
	env := append(os.Environ(), handoverEnv+"="+strconv.Itoa(mfd))
	a.log.Info("executing the new binary", "binary", a.self, "files_held", len(keep), "exports", len(states))
	return fmt.Errorf("exec %s: %w", a.self, syscall.Exec(a.self, os.Args, env))
}

// runUpgrade is 'leasefs host --upgrade': it asks the agent on the
// control socket to upgrade in place, and waits until the new binary
// answers.
func runUpgrade(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("host --upgrade", `Usage: leasefs host --upgrade [--control ADDR]

Asks the running host agent to upgrade in place: it execs the leasefs
binary at its path (install the new one there first), handing over its
sockets, held files, guest sessions and generations. Guests reconnect and
go on; open files keep reading. It waits until the new agent answers.

`)
	fs.Bool("upgrade", true, "upgrade the running agent")
	addr, err := parseControl(fs, args, stderr)
	if err != nil {
		return err
	}
	_, before, err := hostagent.Control(ctx, addr, hostagent.ControlRequest{Op: "status"})
	if err != nil {
		return err
	}
	if _, _, err := hostagent.Control(ctx, addr, hostagent.ControlRequest{Op: "upgrade"}); err != nil {
		return err
	}
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, now, err := hostagent.Control(qctx, addr, hostagent.ControlRequest{Op: "status"})
		cancel()
		if err == nil && !now.Started.Equal(before.Started) {
			fmt.Fprintf(stdout, "upgraded: %s -> %s\n", before.Version, now.Version)
			return nil
		}
	}
	return errors.New("the agent did not answer as a new run within 2 minutes: see its log")
}

// isUpgrade reports whether the command line asks for --upgrade.
func isUpgrade(args []string) bool {
	for _, a := range args {
		switch a {
		case "--upgrade", "-upgrade", "--upgrade=true", "-upgrade=true":
			return true
		case "--":
			return false
		}
	}
	return false
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
