package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/hostagent/upgrade"
	"github.com/leasefs/leasefs/vsockproto"
)

// An in-place upgrade (SIGUSR2, or 'leasefs host --upgrade' through the
// control socket) execs the agent's binary at its path in the same
// process, handing it the agent's state (package hostagent/upgrade).

// runVersion is 'leasefs version' (and --version).
func runVersion(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("version", "Usage: leasefs version [--handover]\n\nPrints the version.\n\n")
	handover := fs.Bool("handover", false, "first print the form of state this binary takes over in an upgrade in place")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if *handover {
		if _, err := fmt.Fprintln(stdout, "handover", upgrade.Format); err != nil {
			return err
		}
	}
	_, err := fmt.Fprintln(stdout, "leasefs", versionString())
	return err
}

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

// upgrade checks the binary at the agent's path and returns what execs
// it (hostagent.ServerOptions.Upgrade).
func (a *hostAgent) upgrade() (func(), error) {
	v, err := upgrade.Check(a.self, a.args)
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
func (a *hostAgent) execSuccessor() error {
	h := upgrade.Handing{From: versionString(), Server: a.srv, StateLock: a.lock, Control: a.ctl,
		Listeners: map[string]*vsockproto.Listener{}, Log: a.log,
		Signals: map[os.Signal]chan<- os.Signal{syscall.SIGHUP: a.hup, syscall.SIGUSR2: a.usr2}}
	for name, r := range a.exports {
		if r.auto != nil {
			r.auto.stop()
			defer func() { // Exec returned: publishing goes on
				r.auto = a.start(func(ctx context.Context) error { return a.srv.AutoPublish(ctx, name) })
			}()
		}
		h.Reap = append(h.Reap, r.wd.Pid())
	}
	for key, r := range a.listens {
		if r.l != nil { // a VM directory's: the successor binds its sockets again
			h.Listeners[key] = r.l
		}
	}
	return upgrade.Exec(a.self, os.Args, h)
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
