package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/hostagent/upgrade"
)

// An in-place upgrade (SIGUSR2, or 'leasefs upgrade' through the
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

// runCheckUpgrade is 'leasefs check-upgrade ARGS' (upgrade.CheckCommand).
func runCheckUpgrade(_ context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseHost(args, stderr)
	if err != nil {
		return err
	}
	if err := checkStateDir(o); err != nil {
		return err
	}
	return runVersion(context.Background(), []string{"--handover"}, stdout, stderr)
}

// runUpgrade is 'leasefs upgrade': it asks the agent on the
// control socket to upgrade in place, and waits until the new binary
// answers.
func runUpgrade(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("upgrade", `Usage: leasefs upgrade [--control ADDR]

Asks the running host agent to upgrade in place: it execs the leasefs
binary at its path (install the new one there first), handing over its
sockets, held files, guest sessions and generations. Guests reconnect and
go on; open files keep reading. It waits until the new agent answers.

`)
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
