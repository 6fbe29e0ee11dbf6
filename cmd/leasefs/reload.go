package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/leasefs/leasefs/hostagent"
)

// runCheckConfig is 'leasefs check-config': it reads the settings
// as the agent would, checks each export's device and mount, and asks a
// running agent what a reload with this file would change.
func runCheckConfig(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseHostAs("check-config", `Usage: leasefs check-config [--config FILE] [flags of leasefs host]

Reads the host agent's settings as 'leasefs host' would, from the same
flags and settings file, and checks them: the state directory, and each
export's device and mount. Then it asks the agent running on --control
what a reload with them would change, without changing anything; with no
agent there, it says what one would start serving. It exits 1 when
anything would be refused.

`, args, stderr)
	if err != nil {
		return err
	}
	var bad []string
	if err := checkStateDir(o); err != nil {
		bad = append(bad, err.Error())
	}
	for _, sp := range o.exports {
		if err := hostagent.CheckExport(sp.dev, sp.mnt); err != nil {
			bad = append(bad, fmt.Sprintf("export %s: %v", sp.name, err))
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("%s: %s", o.config, strings.Join(bad, "; "))
	}
	fmt.Fprintf(stdout, "%s: the settings are valid\n", o.config)
	qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	config, _ := filepath.Abs(o.config)
	changes, err := hostagent.ControlReload(qctx, o.control, true, config)
	switch {
	case errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT):
		fmt.Fprintf(stdout, "no host agent answers at %s; it would start serving:\n", o.control)
		for _, sp := range o.exports {
			fmt.Fprintf(stdout, "  export %s: %s at %s\n", sp.name, sp.dev, sp.mnt)
		}
		for _, l := range o.listen {
			fmt.Fprintf(stdout, "  listen %s\n", l)
		}
		return nil
	case err != nil:
		return fmt.Errorf("the running agent at %s would refuse a reload: %w", o.control, err)
	}
	fmt.Fprintf(stdout, "a reload of the agent at %s would change:\n", o.control)
	for _, c := range changes {
		fmt.Fprintln(stdout, "  "+c)
	}
	return nil
}

// runReload is 'leasefs reload': the running agent reads its
// settings again; a refusal is an error (exit 1), so that 'systemctl
// reload' fails when the reload does.
func runReload(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("reload", `Usage: leasefs reload [--control ADDR]

Asks the running host agent to read its settings file again and apply it
(as SIGHUP does), and waits for the outcome: it prints what changed, or
why the agent refused the file (exit 1; the running settings are kept).
leasefs-host.service runs it for 'systemctl reload'. 'leasefs
check-config' says what a reload would change without making it.

`)
	addr, err := parseControl(fs, args, stderr)
	if err != nil {
		return err
	}
	qctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	changes, err := hostagent.ControlReload(qctx, addr, false, "")
	if err != nil {
		return fmt.Errorf("reload refused, the running settings are kept: %w", err)
	}
	for _, c := range changes {
		fmt.Fprintln(stdout, "reloaded: "+c)
	}
	return nil
}
