package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
	"github.com/leasefs/leasefs/vsockproto"
)

// TestMain runs the watchdog when a test starts this binary as one.
func TestMain(m *testing.M) {
	testenv.RunHelper(map[string]testenv.Role{"watchdog": func(mount string) int {
		return testenv.Exit(hostagent.WatchdogMain(os.Stdin, mount, hclog.New(&hclog.LoggerOptions{Output: os.Stderr})))
	}})
	os.Exit(m.Run())
}

func watchdog(mount string) (*hostagent.Watchdog, error) {
	return hostagent.StartWatchdog(testenv.Helper("watchdog", mount))
}

// TestFixedChangesNamesEveryField: a change to any field of Settings but
// the exports and addresses is named, so that a field added later is
// not silently applied (or ignored) by a reload.
func TestFixedChangesNamesEveryField(t *testing.T) {
	base := &Settings{AutoPublish: &hostagent.AutoPublish{Quiet: time.Second}}
	for f := range reflect.TypeFor[Settings]().Fields() {
		if f.Name == "Exports" || f.Name == "Listen" {
			continue
		}
		changed := *base
		changed.AutoPublish = &hostagent.AutoPublish{Quiet: time.Second} // same, another pointer
		v := reflect.ValueOf(&changed).Elem().FieldByIndex(f.Index)
		switch v.Kind() {
		case reflect.Pointer:
			v.Set(reflect.Zero(v.Type()))
		case reflect.Struct:
			v.Field(0).Set(reflect.ValueOf(mutate(v.Field(0).Interface())))
		default:
			v.Set(reflect.ValueOf(mutate(v.Interface())).Convert(v.Type()))
		}
		if got := FixedChanges(base, &changed); !slices.Equal(got, []string{f.Name}) {
			t.Errorf("%s changed: FixedChanges says %v", f.Name, got)
		}
	}
	same := *base
	same.AutoPublish = &hostagent.AutoPublish{Quiet: time.Second}
	same.Exports, same.Listen = []Export{{"a", "/dev/a", "/a"}}, []vsockproto.Addr{{Kind: vsockproto.KindVsock, Port: 1}}
	if got := FixedChanges(base, &same); len(got) > 0 {
		t.Errorf("only exports and addresses changed: FixedChanges says %v", got)
	}
}

// mutate returns a value of v's kind other than v's.
func mutate(v any) any {
	switch x := v.(type) {
	case string:
		return x + "x"
	case bool:
		return !x
	case int:
		return x + 1
	case int64:
		return x + 1
	case time.Duration:
		return x + 1
	case vsockproto.Addr:
		x.Path += "x"
		return x
	}
	panic(fmt.Sprintf("mutate: %T", v))
}

// world is one export, freshly made, and where an agent keeps its state.
type world struct {
	dev, mnt, state, run string
}

func newWorld(t *testing.T) world {
	testenv.RequireRoot(t)
	imgtest.RequireTools(t, "mkfs.ext4")
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "hello"), []byte("hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := imgtest.Mkfs(t, "ext4", src, 32, "-b", "4096")
	mnt := imgtest.KernelMount(t, img, "rw")
	return world{dev: imgtest.LoopDevice(t, mnt), mnt: mnt, state: t.TempDir(), run: t.TempDir()}
}

func (w world) addr(t *testing.T, name string) vsockproto.Addr {
	a, err := vsockproto.ParseAddr("unix:" + filepath.Join(w.run, name))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func (w world) settings(t *testing.T) *Settings {
	return &Settings{Exports: []Export{{"mirror", w.dev, w.mnt}}, Listen: []vsockproto.Addr{w.addr(t, "guest.sock")},
		StateDir: w.state, Control: w.addr(t, "control.sock"), Grace: 5 * time.Second, AckTimeout: time.Second,
		MaxLeasesPerGuest: 100, MaxSessionsPerGuest: 4, FreezeBudget: 2 * time.Second, FullScanEvery: 20, Keep: Keep{Files: -1, Replaced: 100, ReplacedBytes: 1 << 20, Generations: 1}}
}

// start runs an agent in this process until the test ends.
func start(t *testing.T, s *Settings, load func(string) (*Settings, error)) *Agent {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	a, err := New(ctx, s, Options{Logger: hclog.NewNullLogger(), Version: "test", Load: load, Watchdog: watchdog})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Run() }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		a.Close()
	})
	return a
}

func exportsServed(a *Agent) []string {
	var out []string
	for _, e := range a.Server().Status().Exports {
		out = append(out, fmt.Sprintf("%s@%d", e.Name, e.Generation))
	}
	return out
}

// TestAgentAppliesSettingsInProcess: an agent started in this process
// serves its export and address; Apply adds and removes them, refuses a
// fixed setting's change and a bad address without changing anything,
// and a dry reload says what would change.
func TestAgentAppliesSettingsInProcess(t *testing.T) {
	w := newWorld(t)
	s := w.settings(t)
	var next *Settings
	a := start(t, s, func(config string) (*Settings, error) { return next, nil })
	if got := exportsServed(a); !slices.Equal(got, []string{"mirror@1"}) {
		t.Fatalf("serves %v, want mirror@1", got)
	}
	if got := a.ListenAddrs(); !slices.Equal(got, []string{s.Listen[0].String()}) {
		t.Fatalf("listens on %v", got)
	}

	// A second address, by a reload.
	two := *s
	two.Listen = append(slices.Clone(s.Listen), w.addr(t, "more.sock"))
	next = &two
	changes, err := a.Reload(true, "")
	if err != nil || !slices.Equal(changes, []string{"listen " + two.Listen[1].String() + ": added"}) {
		t.Fatalf("dry reload: %v, %v", changes, err)
	}
	if len(a.ListenAddrs()) != 1 {
		t.Fatal("a dry reload changed the addresses")
	}
	if _, err := a.Reload(false, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(w.run, "more.sock")); err != nil || len(a.ListenAddrs()) != 2 {
		t.Fatalf("the added address is not served (%v): %v", err, a.ListenAddrs())
	}

	// A fixed setting changed: refused whole, even with another change.
	fixed := two
	fixed.Grace, fixed.Listen = time.Minute, s.Listen
	var fe *FixedError
	if _, err := a.Apply(&fixed); !errors.As(err, &fe) || !slices.Equal(fe.Fields, []string{"Grace"}) {
		t.Fatalf("a change of Grace: %v", err)
	}
	if len(a.ListenAddrs()) != 2 {
		t.Fatal("a refused change changed the addresses")
	}

	// An address that cannot be had: nothing changes.
	bad := two
	bad.Listen = append(slices.Clone(two.Listen[:1]), vsockproto.Addr{Kind: vsockproto.KindVMDir, Path: filepath.Join(w.run, "none"), Port: 5000})
	var le *ListenError
	if _, err := a.Apply(&bad); !errors.As(err, &le) || !strings.Contains(err.Error(), "want a directory of VM sockets") {
		t.Fatalf("a missing VM directory: %v", err)
	}
	if len(a.ListenAddrs()) != 2 {
		t.Fatal("a refused change changed the addresses")
	}

	// Through the control socket, as 'leasefs listen' does.
	extra := "unix:" + filepath.Join(w.run, "extra.sock")
	if err := a.AddListener(extra); err != nil {
		t.Fatal(err)
	}
	if err := a.AddListener(extra); err == nil || !strings.Contains(err.Error(), "already listening") {
		t.Fatalf("added twice: %v", err)
	}

	// The export removed: its guests are told, it is no longer served.
	none := two
	none.Exports = nil
	changes, err = a.Apply(&none)
	if err != nil || !slices.Contains(changes, "export mirror: removed (its guests get errors)") {
		t.Fatalf("removing the export: %v, %v", changes, err)
	}
	if got := exportsServed(a); len(got) != 0 {
		t.Fatalf("still serves %v", got)
	}
	if got := a.ListenAddrs(); len(got) != 3 {
		t.Fatalf("the address added through the control socket did not survive the reload: %v", got)
	}
}

// TestAgentRefusesAStateDirOnTheExport, and a second agent on the same
// state directory.
func TestAgentRefusesAStateDirOnTheExport(t *testing.T) {
	w := newWorld(t)
	s := w.settings(t)
	s.StateDir = filepath.Join(w.mnt, "state")
	var se *StateDirError
	if _, err := New(context.Background(), s, Options{Logger: hclog.NewNullLogger(), Watchdog: watchdog}); !errors.As(err, &se) {
		t.Fatalf("a state directory on the export: %v", err)
	}
	s = w.settings(t)
	if _, err := start(t, s, nil).Reload(false, ""); err == nil {
		t.Error("a reload with no way to read the settings again succeeded")
	}
	second := w.settings(t)
	second.Control, second.Listen = w.addr(t, "control2.sock"), []vsockproto.Addr{w.addr(t, "guest2.sock")}
	if _, err := New(context.Background(), second, Options{Logger: hclog.NewNullLogger(), Watchdog: watchdog}); err == nil || !strings.Contains(err.Error(), "held by another leasefs host agent") {
		t.Fatalf("a second agent on the same state directory and export: %v", err)
	}
}
