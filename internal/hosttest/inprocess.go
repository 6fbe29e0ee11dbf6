package hosttest

import (
	"cmp"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/internal/testenv"
	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
)

// Roles are the helper processes an InProcess host starts from the test
// binary: its freeze's watchdog ("watchdog" MOUNT), and a writer on the
// host that opens a file for writing and writes it ("write"
// PATH:CONTENT). A test binary that uses InProcess passes them to
// testenv.RunHelper first in its TestMain.
var Roles = map[string]testenv.Role{
	"watchdog": func(mount string) int {
		return testenv.Exit(hostagent.WatchdogMain(os.Stdin, mount, hclog.NewNullLogger()))
	},
	"write": func(spec string) int {
		path, content, _ := strings.Cut(spec, ":")
		return testenv.Exit(os.WriteFile(path, []byte(content), 0o644))
	},
}

// InProcess is a host agent in the test's own process: a fresh export
// (Export, 128 MiB) named "test", served by hostagent's Server on a Unix
// socket, publishing only when told unless Auto is set. Set what is to
// differ from the defaults, then StartInProcess; a test reaches the
// export and server through Exp and Srv.
type InProcess struct {
	AckTimeout time.Duration          // 3 s
	Grace      time.Duration          // a minute
	Auto       *hostagent.AutoPublish // publishes on its own, if set
	OnFrozen   func()                 // runs during each freeze, if set
	Addr       vsockproto.Addr        // a new Unix socket unless set
	Log        hclog.Logger           // the test's output with -v

	Img, Dev, Mnt, State string
	Watchdog             *hostagent.Watchdog
	Exp                  *hostagent.Export
	Srv                  *hostagent.Server
	stop                 context.CancelFunc
}

// StartInProcess makes h's export and serves it, with no generation yet,
// until t ends.
func StartInProcess(t testing.TB, h *InProcess) *InProcess {
	t.Helper()
	testenv.RequireFUSE(t) // what the guests mount
	h.AckTimeout = cmp.Or(h.AckTimeout, 3*time.Second)
	h.Grace = cmp.Or(h.Grace, time.Minute)
	if h.Log == nil {
		h.Log = hclog.NewNullLogger()
		if testing.Verbose() {
			h.Log = hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Debug, Output: os.Stderr})
		}
	}
	h.State = t.TempDir()
	h.Img, h.Mnt, h.Dev = Export(t, 128)
	if h.Addr.Path == "" {
		h.Addr, _ = vsockproto.ParseAddr("unix:" + filepath.Join(t.TempDir(), "host.sock"))
	}
	var err error
	if h.Watchdog, err = hostagent.StartWatchdog(testenv.Helper("watchdog", h.Mnt)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Watchdog.Close() })
	h.Serve(t, false)
	t.Cleanup(h.Shutdown)
	return h
}

// Serve opens the export and serves it; with publish, as 'leasefs host'
// does: it publishes before it serves, and returns the generation.
func (h *InProcess) Serve(t testing.TB, publish bool) (gen uint64) {
	t.Helper()
	var err error
	h.Exp, err = hostagent.OpenExport(hostagent.ExportConfig{Name: "test", Device: h.Dev, Mount: h.Mnt, StateDir: h.State,
		Watchdog: h.Watchdog, FreezeBudget: 10 * time.Second, Watch: true, AutoPublish: h.Auto, OnFrozen: func() {
			if h.OnFrozen != nil {
				h.OnFrozen()
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	h.Srv, err = hostagent.NewServer([]*hostagent.Export{h.Exp}, hostagent.ServerOptions{Lease: lease.Config{AckTimeout: h.AckTimeout, Grace: h.Grace}, Logger: h.Log})
	if err != nil {
		t.Fatal(err)
	}
	if publish {
		gen = h.Publish(t)
	}
	l, err := vsockproto.Listen(h.Addr, vsockproto.ListenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.stop = cancel
	go h.Srv.Serve(ctx, l)
	if h.Auto != nil {
		go h.Srv.AutoPublish(ctx, "test")
	}
	return gen
}

// Shutdown stops serving and closes the export, as an agent exiting
// does: guests are told (their leases revoked).
func (h *InProcess) Shutdown() {
	if h.Srv == nil {
		return
	}
	h.stop()
	h.Srv.Close()
	h.Exp.Close()
	h.Srv, h.Exp = nil, nil
}

// Vanish ends the host agent without a word to its guests, as a crash
// (or a partition) does: their leases are not revoked.
func (h *InProcess) Vanish() {
	h.stop()
	h.Srv.Leave()
	h.Exp.Close()
	h.Srv, h.Exp = nil, nil
}

// Publish publishes what the export holds and returns the generation.
func (h *InProcess) Publish(t testing.TB) uint64 {
	t.Helper()
	g, err := h.Srv.Publish("test")
	if err != nil {
		t.Fatal(err)
	}
	return g.Number
}

// Write writes name on the export.
func (h *InProcess) Write(t testing.TB, name, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(h.Mnt, name), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// WriteInPlace opens name for writing in another process, as a writer
// on the host does (its open waits for the lease breaks), and writes.
func (h *InProcess) WriteInPlace(t testing.TB, name, content string) {
	t.Helper()
	w := testenv.Helper("write", filepath.Join(h.Mnt, name)+":"+content)
	w.Stderr = nil
	if out, err := w.CombinedOutput(); err != nil {
		t.Fatalf("writer: %v %s", err, out)
	}
}

// Replace swaps in new content atomically, as a mirror sync does.
func (h *InProcess) Replace(t testing.TB, name, content string) {
	t.Helper()
	h.Write(t, name+".tmp", content)
	if err := os.Rename(filepath.Join(h.Mnt, name+".tmp"), filepath.Join(h.Mnt, name)); err != nil {
		t.Fatal(err)
	}
}
