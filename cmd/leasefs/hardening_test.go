package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/testenv"
	"github.com/leasefs/leasefs/vsockproto"
)

// A local user who can reach the agent's sockets or the VM directory is
// not trusted: nothing such a user names or plants ends the agent or is
// served.

// A VM socket whose name is not UTF-8, with a guest connected through
// it: status and metrics (the Prometheus client refuses such label
// values) show it, and the agent goes on.
func TestNonUTF8VMName(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	t.Setenv("LEASEFS_RUN_DIR", filepath.Join(run, "guests"))
	vms := filepath.Join(run, "vms")
	if err := os.Mkdir(vms, 0o755); err != nil {
		t.Fatal(err)
	}
	vm := filepath.Join(vms, "vm\xff.sock")
	vmSocket(t, vm)
	h := &hostProc{control: "unix:" + filepath.Join(run, "control.sock")}
	runHostCmd(t, h, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", "hvsock-dir:"+vms+":5000",
		"--control", h.control, "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	waitFor(t, "the VM served", func() bool { return exists(vm + "_5000") })
	g := guestMount(t, "--connect", "unix:"+vm+"_5000", "--export", "mirror", "--device", dev)
	if b, err := os.ReadFile(filepath.Join(g, "hello")); err != nil || string(b) != "generation one\n" {
		t.Fatalf("hello: %q %v", b, err)
	}
	for range 3 {
		out, err := leasefs(t, "metrics", "--control", h.control)
		if err != nil || !strings.Contains(out, "leasefs_guest_generation_lag") || !strings.Contains(out, "vm\uFFFD.sock") {
			t.Fatalf("metrics: %v\n%s\nagent:\n%s", err, out, h.Log)
		}
		if out, err := leasefs(t, "status", "--control", h.control); err != nil {
			t.Fatalf("status: %v\n%s", err, out)
		}
	}
	if h.Exited() {
		t.Fatalf("the agent exited:\n%s", h.Log)
	}
}

// A VM directory others can write (a sticky /tmp-like one too) is
// refused at start, naming the directory and the rule.
func TestWritableVMDirIsRefused(t *testing.T) {
	mnt, dev := hostExport(t)
	for _, mode := range []os.FileMode{0o777 | os.ModeSticky, 0o775, 0o757} {
		run := t.TempDir()
		vms := filepath.Join(run, "vms")
		if err := os.Mkdir(vms, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(vms, mode); err != nil {
			t.Fatal(err)
		}
		out := hostFails(t, "--export", "mirror="+dev+":"+mnt, "--listen", "hvsock-dir:"+vms+":5000",
			"--control", "unix:"+filepath.Join(run, "control.sock"), "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
		if !strings.Contains(out, vms) || !strings.Contains(out, "writable by group or others") {
			t.Fatalf("mode %v: the agent said:\n%s", mode, out)
		}
	}
}

// Settings files that are not what they should be — a FIFO (which would
// block a reader for ever), /dev/zero (endless), a symlink, one others
// can write, one too large — are refused at start and at a reload, at
// once, naming the file and the rule; the running agent goes on.
func TestOddSettingsFilesAreRefused(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	conf := filepath.Join(run, "host.toml")
	control := "unix:" + filepath.Join(run, "control.sock")
	good := []string{
		fmt.Sprintf("state_dir = %q", filepath.Join(run, "state")),
		fmt.Sprintf("control = %q", control),
		fmt.Sprintf("listen = [%q]", "unix:"+filepath.Join(run, "guest.sock")),
		`auto-publish = "off"`,
		"[export.mirror]", fmt.Sprintf("device = %q", dev), fmt.Sprintf("mount = %q", mnt),
	}
	odd := []struct {
		name, want string
		make       func(path string) error
	}{
		{"a FIFO", "not a regular file", func(p string) error { return unix.Mkfifo(p, 0o600) }},
		{"/dev/zero", "not a regular file", func(p string) error { // its device node
			return unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 5)))
		}},
		{"a symlink", "is a symlink", func(p string) error {
			hostConfig(t, p+".real", good...)
			return os.Symlink(p+".real", p)
		}},
		{"writable by others", "writable by group or others", func(p string) error {
			hostConfig(t, p, good...)
			return os.Chmod(p, 0o666)
		}},
		{"too large", "more than", func(p string) error {
			return os.WriteFile(p, append([]byte(strings.Join(good, "\n")+"\n#"), bytes.Repeat([]byte("x"), 2<<20)...), 0o644)
		}},
	}
	for _, c := range odd {
		p := filepath.Join(t.TempDir(), "host.toml")
		if err := c.make(p); err != nil {
			t.Fatal(err)
		}
		out := hostFails(t, "--config", p)
		if !strings.Contains(out, c.want) {
			t.Fatalf("%s at start: the agent said:\n%s", c.name, out)
		}
	}

	hostConfig(t, conf, good...)
	h := &hostProc{control: control}
	runHostCmd(t, h, mnt, "host", "--config", conf)
	for _, c := range odd {
		if err := os.Remove(conf); err != nil {
			t.Fatal(err)
		}
		os.Remove(conf + ".real")
		if err := c.make(conf); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if got := reloadAndWait(t, h); !strings.Contains(got, "reload refused") || !strings.Contains(got, c.want) {
			t.Fatalf("%s at a reload: %s", c.name, got)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("%s: the reload took %v", c.name, d)
		}
		if out, err := leasefs(t, "status", "--control", control); err != nil {
			t.Fatalf("status after %s: %v\n%s", c.name, err, out)
		}
	}
}

// An upgrade runs the binary at the agent's path as the agent's user
// (root): one that another user owns, or could have put there (a
// directory on its path writable by others and not sticky), is refused
// before it runs, and the agent goes on.
func TestUpgradeRefusesAnUntrustedBinary(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	binDir := filepath.Join(run, "bin")
	bin := filepath.Join(binDir, "leasefs")
	if out, err := exec.Command("install", "-D", "-m", "0755", leasefsBin, bin).CombinedOutput(); err != nil {
		t.Fatalf("install: %v\n%s", err, out)
	}
	control := "unix:" + filepath.Join(run, "control.sock")
	newAgentOf(t, bin, mnt, "host", "--export", "mirror="+dev+":"+mnt,
		"--listen", "unix:"+filepath.Join(run, "guest.sock"), "--control", control, "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	marker := filepath.Join(run, "ran")
	planted := fmt.Sprintf("#!/bin/sh\ntouch %s\nexec %s \"$@\"\n", marker, leasefsBin)
	for _, c := range []struct {
		name, want string
		plant      func()
		undo       func()
	}{
		{"a binary another user owns", "owned by uid 1001", func() {
			os.WriteFile(bin+".new", []byte(planted), 0o755)
			os.Rename(bin+".new", bin)
			os.Chown(bin, 1001, 1001)
		}, func() {}},
		{"a binary others can write", "writable by group or others", func() {
			os.WriteFile(bin+".new", []byte(planted), 0o755)
			os.Rename(bin+".new", bin)
			os.Chmod(bin, 0o777)
		}, func() {}},
		{"a directory others can write", "writable by group or others", func() {
			os.WriteFile(bin+".new", []byte(planted), 0o755)
			os.Rename(bin+".new", bin)
			os.Chmod(binDir, 0o777)
		}, func() { os.Chmod(binDir, 0o755) }},
	} {
		c.plant()
		before := hostStatus(t, control)
		out, err := leasefs(t, "host", "--upgrade", "--control", control)
		if err == nil || !strings.Contains(out, c.want) {
			t.Fatalf("%s: host --upgrade: %v\n%s", c.name, err, out)
		}
		if exists(marker) {
			t.Fatalf("%s: the planted binary ran", c.name)
		}
		if st := hostStatus(t, control); !st.Started.Equal(before.Started) {
			t.Fatalf("%s: the agent restarted", c.name)
		}
		c.undo()
	}
	if out, err := exec.Command("install", "-D", "-m", "0755", leasefsBin, bin).CombinedOutput(); err != nil {
		t.Fatalf("install: %v\n%s", err, out)
	}
	if out, err := leasefs(t, "host", "--upgrade", "--control", control); err != nil || !strings.Contains(out, "upgraded:") {
		t.Fatalf("an upgrade to a trusted binary: %v\n%s", err, out)
	}
}

// A state directory another user owns or can write, where a planted
// symlink would have the agent write through it, is refused at start;
// so is one below a directory others can write (not sticky).
func TestUntrustedStateDirIsRefused(t *testing.T) {
	mnt, dev := hostExport(t)
	for _, c := range []struct {
		name, want string
		make       func(run string) string
	}{
		{"owned by another user", "owned by uid 1001", func(run string) string {
			d := filepath.Join(run, "state")
			os.Mkdir(d, 0o700)
			os.Chown(d, 1001, 1001)
			return d
		}},
		{"writable by others", "writable by group or others", func(run string) string {
			d := filepath.Join(run, "state")
			os.Mkdir(d, 0o700)
			os.Chmod(d, 0o777|os.ModeSticky)
			return d
		}},
		{"below a directory others can write", "writable by group or others", func(run string) string {
			open := filepath.Join(run, "open")
			os.Mkdir(open, 0o700)
			os.Chmod(open, 0o777)
			d := filepath.Join(open, "state")
			os.Mkdir(d, 0o700)
			return d
		}},
	} {
		run := t.TempDir()
		state := c.make(run)
		if err := os.Symlink("/etc/leasefs-test-target", filepath.Join(state, "mirror.freezing.tmp")); err != nil {
			t.Fatal(err)
		}
		out := hostFails(t, "--export", "mirror="+dev+":"+mnt, "--listen", "unix:"+filepath.Join(run, "guest.sock"),
			"--control", "unix:"+filepath.Join(run, "control.sock"), "--state-dir", state, "--auto-publish", "off")
		if !strings.Contains(out, state) || !strings.Contains(out, c.want) {
			t.Fatalf("%s: the agent said:\n%s", c.name, out)
		}
		if exists("/etc/leasefs-test-target") {
			os.Remove("/etc/leasefs-test-target")
			t.Fatalf("%s: the agent wrote through a planted symlink", c.name)
		}
	}
}

// A listen address added through the control socket is served after an
// upgrade and after a restart, as the settings' own are, until it is
// removed; a guest connected through it reconnects each time.
func TestAddedListenersSurviveUpgradeAndRestart(t *testing.T) {
	h, _, dev := newContractHost(t, false)
	vm := filepath.Join(t.TempDir(), "vm7")
	addr := "hvsock:" + vm + ":5000"
	if out, err := leasefs(t, "listen", "--control", h.control, "--add", addr); err != nil {
		t.Fatalf("listen --add: %v\n%s", err, out)
	}
	g := guestMount(t, "--connect", "unix:"+vm+"_5000", "--export", "mirror", "--device", dev)
	served := func(what string) {
		t.Helper()
		out, err := leasefs(t, "listen", "--control", h.control)
		if err != nil || !strings.Contains(out, addr) || !exists(vm+"_5000") {
			t.Fatalf("%s: the added address is not served: %v\n%s\nagent:\n%s", what, err, out, h.Log)
		}
		waitFor(t, what+": the guest reconnects", func() bool {
			st := guestStatus(t, g)
			b, err := os.ReadFile(filepath.Join(g, "hello"))
			return st.Connected && err == nil && string(b) == "generation one\n"
		})
	}
	before := hostStatus(t, h.control)
	if out, err := leasefs(t, "host", "--upgrade", "--control", h.control); err != nil || !strings.Contains(out, "upgraded:") {
		t.Fatalf("upgrade: %v\n%s", err, out)
	}
	waitFor(t, "the new run", func() bool {
		out, err := leasefs(t, "status", "--json", "--control", h.control)
		return err == nil && !strings.Contains(out, before.Started.Format(time.RFC3339Nano))
	})
	served("after an upgrade")
	h.stop(syscall.SIGTERM)
	h.start()
	served("after a restart")
	if out, err := leasefs(t, "listen", "--control", h.control, "--remove", addr); err != nil {
		t.Fatalf("listen --remove: %v\n%s", err, out)
	}
	h.stop(syscall.SIGTERM)
	h.start()
	if out, err := leasefs(t, "listen", "--control", h.control); err != nil || strings.Contains(out, addr) || exists(vm+"_5000") {
		t.Fatalf("the removed address is served again after a restart: %v\n%s", err, out)
	}
}

// Serving a VM costs the agent two descriptors (its listening socket and
// its directory), and they come from the budget guests' files do: under
// a small fd limit, VMs beyond the budget wait, the agent stays below
// its limit, and they are served once descriptors are freed (here, by a
// guest closing its files), not only when another VM goes.
func TestVMsWaitForDescriptors(t *testing.T) {
	testenv.RequireTool(t, "prlimit")
	mnt, dev := hostExport(t)
	const files = 40
	for i := range files {
		if err := os.WriteFile(filepath.Join(mnt, fmt.Sprintf("f%02d", i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	run := t.TempDir()
	t.Setenv("LEASEFS_RUN_DIR", filepath.Join(run, "guests"))
	vms := filepath.Join(run, "vms")
	if err := os.Mkdir(vms, 0o755); err != nil {
		t.Fatal(err)
	}
	guest := "unix:" + filepath.Join(run, "guest.sock")
	control := "unix:" + filepath.Join(run, "control.sock")
	// A budget of 90 for guests' files, connections and VMs; none kept
	// for whole generations (--keep-files 0), which would take up to
	// half of it.
	const limit = 120
	a := newAgentOf(t, "prlimit", mnt, fmt.Sprintf("--nofile=%d:%d", limit, limit),
		leasefsBinNoRace, "host", "--export", "mirror="+dev+":"+mnt, "--listen", guest, "--listen", "hvsock-dir:"+vms+":5000",
		"--control", control, "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off", "--keep-files", "0")
	pid := a.Pid()
	base := fdCount(pid)
	g := guestMount(t, "--connect", guest, "--export", "mirror", "--lease-linger", "0") // closing frees at once
	var open []*os.File
	for i := range files {
		f, err := os.Open(filepath.Join(g, fmt.Sprintf("f%02d", i)))
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, f)
	}
	const n = 30
	for i := range n {
		vmSocket(t, filepath.Join(vms, fmt.Sprintf("vm%02d.sock", i)))
	}
	servedVMs := func() int {
		c := 0
		for i := range n {
			if exists(filepath.Join(vms, fmt.Sprintf("vm%02d.sock_5000", i))) {
				c++
			}
		}
		return c
	}
	time.Sleep(3 * time.Second)
	served := servedVMs()
	if served == n || served == 0 {
		t.Fatalf("%d of %d VMs served with the guest's %d files open; want some to wait", served, n, files)
	}
	if fds := fdCount(pid); fds >= limit {
		t.Fatalf("the agent has %d descriptors of its %d (%d before the guest, %d VMs served): the budget does not count what VMs cost", fds, limit, base, served)
	}
	t.Logf("%d of %d VMs served, the agent at %d of %d descriptors", served, n, fdCount(pid), limit)
	for _, f := range open {
		f.Close()
	}
	waitFor(t, "every VM served once the guest's files are closed", func() bool { return servedVMs() == n })
}

// One guest churning sessions (connect, hello, leave, again and again)
// gets a few log lines and a summary, not one per connection: it cannot
// fill the host's disk with the agent's log.
func TestSessionChurnDoesNotFloodTheLog(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	guest := filepath.Join(run, "guest.sock")
	h := &hostProc{control: "unix:" + filepath.Join(run, "control.sock")}
	runHostCmd(t, h, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", "unix:"+guest,
		"--control", h.control, "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off", "--max-sessions-per-guest", "4")
	before := strings.Count(h.Log.String(), "\n")
	addr := vsockproto.Addr{Kind: vsockproto.KindUnix, Path: guest}
	sessions := 0
	for deadline := time.Now().Add(4 * time.Second); time.Now().Before(deadline); sessions++ {
		c, _, err := vsockproto.DialHello(context.Background(), addr, vsockproto.Hello{Export: "mirror", Features: vsockproto.FeatureResume}, nil, vsockproto.Options{})
		if errors.Is(err, vsockproto.ErrQuota) {
			continue // its sessions are not all detached yet
		}
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	time.Sleep(200 * time.Millisecond)
	lines := strings.Count(h.Log.String(), "\n") - before
	t.Logf("%d sessions, %d log lines", sessions, lines)
	if sessions < 500 {
		t.Fatalf("only %d sessions in 4 s", sessions)
	}
	if lines > 100 {
		t.Fatalf("%d sessions wrote %d log lines:\n%s", sessions, lines, h.Log.String()[len(h.Log.String())-2000:])
	}
	if !strings.Contains(h.Log.String(), "lines_left_out") && !strings.Contains(h.Log.String(), "most are left out") {
		t.Fatalf("no word of the lines left out:\n%s", h.Log)
	}
}

// 'leasefs listen --add' refuses what it cannot serve as meant: a
// relative path (the agent's working directory is not the caller's), a
// name with a newline (it would make two lines of the record the agent
// keeps), and a path where a file that is not a socket is (left as it
// is); the agent goes on serving what it served.
func TestListenAddChecksItsAddress(t *testing.T) {
	h, _, _ := startHostCmd(t)
	file := filepath.Join(t.TempDir(), "precious")
	if err := os.WriteFile(file, []byte("keep me\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ addr, want string }{
		{"unix:relative.sock", "must be absolute"},
		{"hvsock:vms/vm1.sock:5000", "must be absolute"},
		{"unix:" + filepath.Join(t.TempDir(), "a\nunix:/etc/b.sock"), "control characters"},
		{"unix:" + file, "not a socket"},
	} {
		out, err := leasefs(t, "listen", "--control", h.control, "--add", c.addr)
		if err == nil || !strings.Contains(out, c.want) {
			t.Fatalf("listen --add %q: %v\n%s", c.addr, err, out)
		}
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "keep me\n" {
		t.Fatalf("the file at the refused path: %q %v", b, err)
	}
	out, err := leasefs(t, "listen", "--control", h.control)
	if err != nil || !strings.Contains(out, h.guest) || strings.Count(strings.TrimSpace(out), "\n") != 0 {
		t.Fatalf("listen after the refusals: %v\n%s", err, out)
	}
}
