package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strings"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/vsockproto"
)

// Apply makes the agent serve s's exports on s's addresses (a reload),
// and returns what changed. A change to a fixed setting is refused
// (*FixedError); so is anything that cannot be taken, and then nothing
// changes.
func (a *Agent) Apply(s *Settings) ([]string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	changes, err := a.plan(s)
	if err != nil {
		return nil, err
	}
	return changes, a.apply(s)
}

// Reload reads the settings again (Options.Load) and, unless dry,
// applies them (SIGHUP, 'leasefs reload', hostagent.ServerOptions.Reload),
// telling Notify and the log how it went; it returns what changes. A
// dry run may read another settings file, config, instead of the
// agent's own, and checks each new export's device and mount.
func (a *Agent) Reload(dry bool, config string) ([]string, error) {
	if !dry {
		a.notify(Reloading, "reloading the settings")
		defer func() { a.notify(Ready, a.srv.Status().Summary()) }()
	}
	if config != "" {
		if !dry {
			return nil, errors.New("only a dry run reads another settings file")
		}
		if !filepath.IsAbs(config) {
			return nil, fmt.Errorf("%s: the settings file's path must be absolute (the agent's working directory is not yours)", config)
		}
	}
	if a.opt.Load == nil {
		return nil, errors.New("this agent has no settings to read again")
	}
	s, err := a.opt.Load(config)
	if err != nil {
		if !dry {
			a.log.Error("reload refused; the running settings are kept", "error", err)
		}
		return nil, err
	}
	if dry {
		return a.dryRun(s)
	}
	changes, err := a.Apply(s)
	if err != nil {
		a.log.Error("reload refused; the running settings are kept", "error", err)
		return nil, err
	}
	a.log.Info("reloaded", "changes", strings.Join(changes, "; "), "exports", a.exportNames(), "listen", a.ListenAddrs())
	return changes, nil
}

// dryRun says what applying s would change, checking each export it
// would open.
func (a *Agent) dryRun(s *Settings) ([]string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	changes, err := a.plan(s)
	if err != nil {
		return nil, err
	}
	for _, sp := range s.Exports {
		if r := a.exports[sp.Name]; r == nil || r.spec != sp {
			if err := hostagent.CheckExport(sp.Device, sp.Mount); err != nil {
				return changes, fmt.Errorf("export %s: %w", sp.Name, err)
			}
		}
	}
	return changes, nil
}

// plan says what applying s would change, refusing a change to a fixed
// setting; a.mu held.
func (a *Agent) plan(s *Settings) ([]string, error) {
	if diff := FixedChanges(a.s, s); len(diff) > 0 {
		return nil, &FixedError{diff}
	}
	return a.changes(s), nil
}

// changes says what applying s would change; a.mu held.
func (a *Agent) changes(s *Settings) []string {
	var out []string
	want := map[string]bool{}
	for _, sp := range s.Exports {
		want[sp.Name] = true
		r := a.exports[sp.Name]
		switch {
		case r == nil && a.lost[sp.Name] == sp:
			out = append(out, fmt.Sprintf("export %s: lost; tried again", sp.Name))
		case r == nil:
			out = append(out, fmt.Sprintf("export %s: added (%s at %s)", sp.Name, sp.Device, sp.Mount))
		case r.spec != sp:
			out = append(out, fmt.Sprintf("export %s: now %s at %s (its guests start again)", sp.Name, sp.Device, sp.Mount))
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
	for _, l := range s.Listen {
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

// apply makes the agent serve s's exports on s's addresses: it takes
// what is new (take), and if anything fails gives it back and changes
// nothing; then it commits. a.mu held.
func (a *Agent) apply(s *Settings) error {
	if err := checkStateDir(s); err != nil {
		return err
	}
	t, err := a.take(s)
	if err != nil {
		return err
	}
	return a.commit(s, t)
}

// taken is what apply takes before it changes anything: the new
// addresses bound, the new exports opened; keep names the exports
// served already as s has them.
type taken struct {
	want    map[string]vsockproto.Addr // every address to serve, by key
	listens map[string]bound
	exports map[string]*runningExport
	keep    map[string]bool
}

type bound struct {
	serve func(context.Context) error
	l     *vsockproto.Listener // nil for a VM directory
}

// take binds s's new addresses and opens its new exports; if any fails,
// it closes what it took. a.mu held.
func (a *Agent) take(s *Settings) (_ *taken, err error) {
	t := &taken{want: maps.Clone(a.extra), listens: map[string]bound{}, exports: map[string]*runningExport{}, keep: map[string]bool{}}
	defer func() {
		if err != nil {
			for _, b := range t.listens {
				if b.l != nil {
					b.l.Close()
				}
			}
			for _, r := range t.exports {
				r.close()
			}
		}
	}()
	fromSettings := map[string]bool{}
	for _, l := range s.Listen {
		t.want[l.String()] = l
		fromSettings[l.String()] = true
	}
	for key, addr := range t.want {
		if a.listens[key] != nil {
			continue
		}
		serve, l, err := a.bind(addr)
		if err != nil && !fromSettings[key] {
			// One added through the control socket, no longer to be
			// had (its directory went, say): it goes.
			a.log.Warn("a listen address added through the control socket cannot be taken again; dropping it", "addr", key, "error", err)
			delete(a.extra, key)
			delete(t.want, key)
			a.saveExtra(s.StateDir)
			continue
		}
		if err != nil {
			return nil, err
		}
		t.listens[key] = bound{serve, l}
	}
	for _, sp := range s.Exports {
		if r := a.exports[sp.Name]; r != nil && r.spec == sp {
			t.keep[sp.Name] = true
			continue
		}
		if lost, ok := a.lost[sp.Name]; ok && lost == sp {
			if err := hostagent.CheckExport(sp.Device, sp.Mount); err != nil {
				// Still gone: it stays lost, and the rest applies.
				a.log.Warn("a lost export is still not mounted; not served", "export", sp.Name, "error", err)
				continue
			}
		}
		r, err := a.open(s, sp)
		if err != nil {
			return nil, err
		}
		t.exports[sp.Name] = r
	}
	return t, nil
}

// open opens export sp with its watchdog, taking over what the run
// before left of it.
func (a *Agent) open(s *Settings, sp Export) (*runningExport, error) {
	wd, err := a.opt.Watchdog(sp.Mount)
	if err != nil {
		return nil, err
	}
	ec := hostagent.ExportConfig{Name: sp.Name, Device: sp.Device, Mount: sp.Mount, StateDir: s.StateDir,
		FreezeBudget: s.FreezeBudget, Watchdog: wd, Logger: a.log, Watch: true, FullScanEvery: s.FullScanEvery, ExpediteRCU: s.ExpediteRCU,
		AutoPublish: s.AutoPublish,
		KeepFiles:   cmp.Or(s.Keep.Files, -1), KeepReplaced: s.Keep.Replaced, KeepBytes: s.Keep.ReplacedBytes,
		KeepGenerations: s.Keep.Generations}
	if a.opt.Progress != nil {
		ec.Progress = a.opt.Progress(sp.Name)
	}
	a.inherited.Export(&ec)
	e, err := hostagent.OpenExport(ec)
	if err != nil {
		wd.Close()
		return nil, err
	}
	return &runningExport{spec: sp, e: e, wd: wd}, nil
}

// commit serves what take took and stops what s no longer has; the
// new exports' first generations are published, in the order s gives.
// Nothing here refuses the change, but the first apply's failure to
// publish. a.mu held.
func (a *Agent) commit(s *Settings, t *taken) error {
	first := a.s == nil
	a.s = s
	for key, r := range a.listens {
		if _, ok := t.want[key]; !ok {
			r.stop()
			delete(a.listens, key)
			a.log.Info("stopped listening", "addr", key)
		}
	}
	for name := range a.lost {
		if !slices.ContainsFunc(s.Exports, func(sp Export) bool { return sp.Name == name }) || t.exports[name] != nil {
			delete(a.lost, name)
			_ = a.srv.RemoveExport(name) // out of status
		}
	}
	for name, r := range a.exports {
		if !t.keep[name] {
			if err := a.srv.RemoveExport(name); err != nil {
				a.log.Error("removing an export", "export", name, "error", err)
			}
			r.close()
			delete(a.exports, name)
			a.log.Info("export removed", "export", name)
		}
	}
	var err error
	for _, sp := range s.Exports {
		r := t.exports[sp.Name]
		if r == nil {
			continue
		}
		if err != nil { // the first apply failed: the rest goes too
			r.close()
			continue
		}
		if err = a.addExport(r); err != nil && !first {
			a.log.Error("an export could not be added", "export", sp.Name, "error", err)
			err = nil
		}
	}
	if err != nil {
		for _, b := range t.listens {
			if b.l != nil {
				b.l.Close()
			}
		}
		return err
	}
	for key, b := range t.listens {
		a.listens[key] = a.start(b.serve)
		a.listens[key].l = b.l
		a.log.Info("listening", "addr", key)
	}
	return nil
}

// addExport serves r and publishes its first generation; a.mu held.
func (a *Agent) addExport(r *runningExport) error {
	name := r.spec.Name
	if err := a.srv.AddExport(r.e); err != nil {
		r.close()
		return err
	}
	if g := r.e.Current(); g != nil { // handed over by an upgrade
		a.printf("export %s: generation %d (taken over, %d kept)\n", name, g.Number, r.e.Kept())
		a.exports[name] = r
		a.startAuto(r)
		return nil
	}
	g, err := a.srv.Publish(name)
	if err != nil {
		_ = a.srv.RemoveExport(name)
		r.close()
		return fmt.Errorf("export %s: the first generation: %w", name, err)
	}
	a.printf("export %s: generation %d (freeze %.1f ms, %d metadata blocks)\n", name, g.Number, float64(g.Frozen.Microseconds())/1000, g.Blocks())
	a.exports[name] = r
	a.startAuto(r)
	return nil
}

func (a *Agent) printf(format string, args ...any) {
	if a.opt.Out != nil {
		fmt.Fprintf(a.opt.Out, format, args...)
	}
}

// startAuto starts r's publishing on its own, if the settings say so.
func (a *Agent) startAuto(r *runningExport) {
	if a.s.AutoPublish != nil {
		r.auto = a.start(func(ctx context.Context) error { return a.srv.AutoPublish(ctx, r.spec.Name) })
	}
}
