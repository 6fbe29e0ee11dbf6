package main

import (
	"cmp"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/internal/hosttest"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// hostProc is a 'leasefs host' a test runs, stops and starts again, as
// a supervisor would (hosttest.Agent), on the export mounted at mnt.
// When the test ends it is stopped with SIGTERM, and must exit cleanly
// and take its watchdog with it (before the export is unmounted).
type hostProc struct {
	*hosttest.Agent
	t              *testing.T
	mnt            string
	control, guest string   // its sockets, if the test named them
	wrap           []string // a program leasefs runs under (setpriv), or none
}

// start runs the agent, leasefsBin unless Prog is set, and waits until
// it is ready.
func (h *hostProc) start() {
	h.t.Helper()
	h.Prog = cmp.Or(h.Prog, leasefsBin)
	h.Agent.Start(h.t)
}

// stop signals the agent and waits for it to exit: cleanly, on SIGTERM.
func (h *hostProc) stop(sig syscall.Signal) {
	h.t.Helper()
	if err := h.Agent.Stop(h.t, sig); sig == syscall.SIGTERM && err != nil {
		h.t.Errorf("leasefs host on SIGTERM: %v\n%s", err, h.Log)
	}
}

// supervise starts h, as set, on the export mounted at mnt, stopping it
// when t ends.
func supervise(t *testing.T, h *hostProc, mnt string) *hostProc {
	t.Helper()
	if h.Agent == nil {
		h.Agent = &hosttest.Agent{}
	}
	h.t, h.mnt = t, mnt
	t.Cleanup(func() {
		h.stop(syscall.SIGTERM)
		waitGone(t, mnt) // its watchdog too
	})
	h.start()
	return h
}

// hostExport is a fresh loop-mounted export holding "hello".
func hostExport(t *testing.T) (mnt, dev string) {
	t.Helper()
	testenv.RequireLoop(t)
	testenv.RequireFUSE(t)
	_, mnt, dev = hosttest.Export(t, 64)
	if err := os.WriteFile(filepath.Join(mnt, "hello"), []byte("generation one\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return mnt, dev
}

// startHostCmd runs 'leasefs host' on a fresh loop-mounted export and
// waits until it is ready.
func startHostCmd(t *testing.T) (h *hostProc, mnt, dev string) {
	t.Helper()
	mnt, dev = hostExport(t)
	h, _ = startHostOn(t, mnt, dev)
	return h, mnt, dev
}

// startHostOn runs 'leasefs host' on the export mounted at mnt from dev,
// publishing only when told, and waits until it is ready.
func startHostOn(t *testing.T, mnt, dev string) (h *hostProc, run string) {
	t.Helper()
	run = t.TempDir()
	h = &hostProc{control: "unix:" + filepath.Join(run, "control.sock"), guest: "unix:" + filepath.Join(run, "guest.sock")}
	runHostCmd(t, h, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", h.guest,
		"--control", h.control, "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	return h, run
}

// runHostCmd runs leasefs with args (under h.wrap, if set), a host agent
// of the export at mnt, until t ends (supervise).
func runHostCmd(t *testing.T, h *hostProc, mnt string, args ...string) {
	t.Helper()
	h.Agent = &hosttest.Agent{Prog: leasefsBin, Args: args}
	if len(h.wrap) > 0 {
		h.Prog, h.Args = h.wrap[0], append(append(h.wrap[1:], leasefsBin), args...)
	}
	supervise(t, h, mnt)
}

func leasefs(t *testing.T, args ...string) (string, error) {
	t.Helper()
	out, err := exec.Command(leasefsBin, args...).CombinedOutput()
	return string(out), err
}

// 'leasefs host', 'guest', 'publish' and 'status' together, as a user
// runs them.
func TestHostAndGuestCommands(t *testing.T) {
	h, mnt, dev := startHostCmd(t)
	var guests []string
	for _, device := range []string{dev, ""} {
		dir := t.TempDir()
		args := []string{"guest", "--connect", h.guest, "--export", "mirror"}
		if device != "" {
			args = append(args, "--device", device)
		}
		if out, err := leasefs(t, append(args, dir)...); err != nil {
			t.Fatalf("leasefs guest: %v\n%s", err, out)
		}
		t.Cleanup(func() { imgtest.Unmount(t, dir); waitGone(t, dir) })
		if !isFuseMount(t, dir) {
			t.Fatal("leasefs guest returned before the mount was ready")
		}
		if b, err := os.ReadFile(filepath.Join(dir, "hello")); err != nil || string(b) != "generation one\n" {
			t.Fatalf("guest read %q, %v", b, err)
		}
		guests = append(guests, dir)
	}

	os.WriteFile(filepath.Join(mnt, "news"), []byte("generation two\n"), 0o644)
	out, err := leasefs(t, "publish", "--control", h.control, "mirror")
	if err != nil || !strings.HasPrefix(out, "mirror: generation 2, freeze ") {
		t.Fatalf("leasefs publish: %v\n%s", err, out)
	}
	for _, dir := range guests {
		deadline := time.Now().Add(5 * time.Second)
		for {
			if b, err := os.ReadFile(filepath.Join(dir, "news")); err == nil && string(b) == "generation two\n" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("guest %s does not show generation 2", dir)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	out, err = leasefs(t, "status", "--control", h.control, "--json")
	if err != nil {
		t.Fatalf("leasefs status: %v\n%s", err, out)
	}
	var st hostagent.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status JSON: %v\n%s", err, out)
	}
	if len(st.Exports) != 1 || st.Exports[0].Generation != 2 || len(st.Exports[0].Guests) != 2 {
		t.Fatalf("status %+v", st)
	}
	if out, err := leasefs(t, "status", "--control", h.control); err != nil || !regexp.MustCompile(`(?m)^mirror +2 +- +\d+s ago +[\d.]+ ms +2 `).MatchString(out) ||
		!strings.Contains(out, "guests of mirror:") {
		t.Fatalf("leasefs status: %v\n%s", err, out)
	}

	// publish --json: the generation, what changed, and each step's time.
	os.WriteFile(filepath.Join(mnt, "hello"), []byte("generation three\n"), 0o644)
	out, err = leasefs(t, "publish", "--control", h.control, "--json", "mirror")
	if err != nil {
		t.Fatalf("leasefs publish --json: %v\n%s", err, out)
	}
	var p hostagent.Published
	if err := json.Unmarshal([]byte(out), &p); err != nil {
		t.Fatalf("publish JSON: %v\n%s", err, out)
	}
	if p.Generation != 3 || p.ChangedInodes < 1 || p.FreezeMS <= 0 || p.ScanMS <= 0 || p.SyncMS <= 0 ||
		p.FIFreezeMS+p.ScanMS+p.FIThawMS > p.FreezeMS+0.01 {
		t.Fatalf("publish --json: %+v", p)
	}

	// Clear errors.
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"publish", "--control", h.control, "nope"}, `no export "nope"`},
		{[]string{"publish", "--control", "unix:/nonexistent/control.sock", "mirror"}, "control socket"},
		{[]string{"guest", "--connect", "unix:/nonexistent/guest.sock", "--export", "mirror", t.TempDir()}, "connecting to unix:/nonexistent/guest.sock"},
		{[]string{"guest", "--connect", h.guest, "--export", "nope", t.TempDir()}, `no export "nope"`},
		{[]string{"guest", "--connect", h.guest, "--export", "mirror", "--follow", "sometimes", t.TempDir()}, "--follow"},
		{[]string{"host", "--export", "x=" + dev + ":" + mnt, "--listen", "unix:" + filepath.Join(t.TempDir(), "s"),
			"--control", "unix:" + filepath.Join(t.TempDir(), "c"), "--state-dir", filepath.Join(mnt, "state")}, "would wait on its own freeze"},
	} {
		out, err := leasefs(t, c.args...)
		if err == nil || !strings.Contains(out, c.want) {
			t.Errorf("leasefs %s: %v, output %q; want an error saying %q", strings.Join(c.args, " "), err, out, c.want)
		}
	}
	if _, err := os.Stat(filepath.Join(mnt, "state")); !os.IsNotExist(err) {
		t.Errorf("a refused host agent left its state directory on the export: %v", err)
	}
}
