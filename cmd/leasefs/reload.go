package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/time/rate"

	"github.com/leasefs/leasefs/hostagent"
)

// reloadRequest reads the settings again and, unless dry, applies them
// (SIGHUP, 'leasefs host --reload', hostagent.ServerOptions.Reload),
// telling systemd and the log how it went. config, for a dry run, is
// another file to read instead of the agent's own.
func (a *hostAgent) reloadRequest(dry bool, config string) ([]string, error) {
	if !dry {
		notifyReloading("reloading the settings")
		defer func() { notifyReady(statusLine(a.srv.Status())) }()
	}
	args := a.args
	if config != "" {
		if !dry {
			return nil, errors.New("only a dry run reads another settings file")
		}
		if !filepath.IsAbs(config) {
			return nil, fmt.Errorf("%s: the settings file's path must be absolute (the agent's working directory is not yours)", config)
		}
		args = append(slices.Clone(args), "--config", config)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	changes, err := a.reload(args, dry)
	switch {
	case dry:
	case err != nil:
		a.log.Error("reload refused; the running settings are kept", "error", err)
	default:
		a.log.Info("reloaded", "changes", strings.Join(changes, "; "),
			"exports", slices.Sorted(maps.Keys(a.exports)), "listen", slices.Sorted(maps.Keys(a.listens)))
	}
	return changes, err
}

// reload reads the command line args and its settings file again and,
// unless dry, applies what changed in exports and listen addresses; it
// returns what changes. Anything else changed, or any error, refuses it
// whole. a.mu held.
func (a *hostAgent) reload(args []string, dry bool) ([]string, error) {
	var msg strings.Builder // what the command would print: the first line says why
	o, err := parseHost(args, &msg)
	if errors.Is(err, errUsage) {
		why, _, _ := strings.Cut(msg.String(), "\n")
		return nil, errors.New(why)
	}
	if err != nil {
		return nil, err
	}
	if diff := fixedDiff(a.o, o); len(diff) > 0 {
		return nil, fmt.Errorf("%s changed, which needs a restart", strings.Join(diff, ", "))
	}
	changes := a.changes(o)
	if dry {
		for _, sp := range o.exports {
			if r := a.exports[sp.name]; r == nil || r.spec != sp {
				if err := hostagent.CheckExport(sp.dev, sp.mnt); err != nil {
					return changes, fmt.Errorf("export %s: %w", sp.name, err)
				}
			}
		}
		return changes, nil
	}
	return changes, a.apply(o)
}

// changes says what applying o would change; a.mu held.
func (a *hostAgent) changes(o *hostOptions) []string {
	var out []string
	want := map[string]bool{}
	for _, sp := range o.exports {
		want[sp.name] = true
		r := a.exports[sp.name]
		switch {
		case r == nil && a.lost[sp.name] == sp:
			out = append(out, fmt.Sprintf("export %s: lost; tried again", sp.name))
		case r == nil:
			out = append(out, fmt.Sprintf("export %s: added (%s at %s)", sp.name, sp.dev, sp.mnt))
		case r.spec != sp:
			out = append(out, fmt.Sprintf("export %s: now %s at %s (its guests start again)", sp.name, sp.dev, sp.mnt))
		}
	}
	for _, name := range slices.Sorted(maps.Keys(a.exports)) {
		if !want[name] {
			out = append(out, fmt.Sprintf("export %s: removed (its guests get errors)", name))
		}
	}
	for _, name := range slices.Sorted(maps.Keys(a.lost)) {
		if !want[name] {
			out = append(out, fmt.Sprintf("export %s: lost, and now removed", name))
		}
	}
	listen := maps.Clone(a.extra)
	for _, l := range o.listen {
		listen[l.String()] = l
	}
	for _, key := range slices.Sorted(maps.Keys(listen)) {
		if a.listens[key] == nil {
			out = append(out, "listen "+key+": added")
		}
	}
	for _, key := range slices.Sorted(maps.Keys(a.listens)) {
		if _, ok := listen[key]; !ok {
			out = append(out, "listen "+key+": removed (its guests stay connected)")
		}
	}
	if len(out) == 0 {
		out = append(out, "nothing changes")
	}
	return out
}

// fixedDiff names the settings tagged in hostOptions that differ.
func fixedDiff(a, b *hostOptions) []string {
	va, vb := reflect.ValueOf(a).Elem(), reflect.ValueOf(b).Elem()
	var out []string
	for i := range va.NumField() {
		tag := va.Type().Field(i).Tag.Get("flag")
		// fmt reads unexported fields, and prints what pointers point to.
		if tag != "" && fmt.Sprintf("%+v", va.Field(i)) != fmt.Sprintf("%+v", vb.Field(i)) {
			out = append(out, tag)
		}
	}
	return out
}

// watchMounts checks every second, until ctx ends, that each export's
// filesystem is still mounted as it was (hostagent.Export.Mounted). One
// that went away — unmounted, even lazily; remounted read-only; its
// device gone — is lost: its publishing stops, its guests are told and
// follow the lease contract (their open files answer errors), and status,
// metrics and systemd's status say so. A reload tries it again. A check
// that cannot tell (the agent out of descriptors a moment) loses nothing.
func (a *hostAgent) watchMounts(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	unsure := rate.NewLimiter(rate.Every(time.Minute), 1)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		a.mu.Lock()
		for _, name := range slices.Sorted(maps.Keys(a.exports)) {
			r := a.exports[name]
			err := r.e.Mounted()
			if err == nil {
				continue
			}
			if !errors.Is(err, hostagent.ErrGone) {
				// Out of descriptors or memory for a moment: that is
				// no reason to give the export up.
				if unsure.Allow() {
					a.log.Warn("cannot check an export's mount; trying again", "export", name, "error", err)
				}
				continue
			}
			a.log.Error("export lost: its filesystem went away; no longer publishing or serving it. Mount it again and reload, or remove it from the settings",
				"export", name, "mount", r.spec.mnt, "error", err)
			if r.auto != nil {
				r.auto.stop()
				r.auto = nil
			}
			if err := a.srv.LoseExport(name, err); err != nil {
				a.log.Error("removing a lost export", "export", name, "error", err)
			}
			r.close()
			delete(a.exports, name)
			a.lost[name] = r.spec
			notify("STATUS=" + statusLine(a.srv.Status()))
		}
		a.mu.Unlock()
	}
}

// reportStatus keeps systemd's STATUS= up to date, until ctx ends.
func (a *hostAgent) reportStatus(ctx context.Context) {
	t := time.NewTicker(statusEvery)
	defer t.Stop()
	last := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if line := statusLine(a.srv.Status()); line != last {
			notify("STATUS=" + line)
			last = line
		}
	}
}

// runCheckConfig is 'leasefs host --check-config': it reads the settings
// as the agent would, checks each export's device and mount, and asks a
// running agent what a reload with this file would change.
func runCheckConfig(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	args = slices.DeleteFunc(slices.Clone(args), func(s string) bool { return s == "--check-config" || s == "-check-config" })
	o, err := parseHost(args, stderr)
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

// runReload is 'leasefs host --reload': the running agent reads its
// settings again; a refusal is an error (exit 1), so that 'systemctl
// reload' fails when the reload does.
func runReload(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("host --reload", `Usage: leasefs host --reload [--control ADDR]

Asks the running host agent to read its settings file again and apply it
(as SIGHUP does), and waits for the outcome: it prints what changed, or
why the agent refused the file (exit 1; the running settings are kept).
leasefs-host.service runs it for 'systemctl reload'. 'leasefs host
--check-config' says what a reload would change without making it.

`)
	fs.Bool("reload", true, "reload the running agent's settings")
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
