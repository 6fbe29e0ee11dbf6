package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// hostConfig writes a host.toml in run with the given lines.
func hostConfig(t *testing.T, path string, lines ...string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// reloadAndWait sends SIGHUP and waits for the log to say how it ended,
// which it returns ("reloaded" or the refusal).
func reloadAndWait(t *testing.T, h *hostProc) string {
	t.Helper()
	before := strings.Count(h.Log.String(), "SIGHUP: reading the settings again")
	if err := h.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	var line string
	waitFor(t, "the reload's outcome in the log", func() bool {
		log := h.Log.String()
		if strings.Count(log, "SIGHUP: reading the settings again") <= before {
			return false
		}
		rest := log[strings.LastIndex(log, "SIGHUP: reading the settings again"):]
		for _, l := range strings.Split(rest, "\n")[1:] {
			if strings.Contains(l, "reloaded") || strings.Contains(l, "reload refused") {
				line = l
				return true
			}
		}
		return false
	})
	return line
}

// The host agent from a settings file, changed while guests read: SIGHUP
// adds an export and a listen address, and later takes them away, while
// a guest of the first export keeps its session and its open file. A
// file with a syntax error, an unknown key, a changed fixed setting, or a
// new address another process serves is refused whole; the agent goes on
// as it was.
func TestConfigFileAndReload(t *testing.T) {
	mntA, devA := hostExport(t)
	mntB, devB := hostExport(t)
	mntC, devC := hostExport(t)
	run := t.TempDir()
	conf := filepath.Join(run, "host.toml")
	control := "unix:" + filepath.Join(run, "control.sock")
	guest1, guest2 := filepath.Join(run, "guest1.sock"), filepath.Join(run, "guest2.sock")
	base := []string{
		"# the test's host agent",
		fmt.Sprintf("state_dir = %q", filepath.Join(run, "state")),
		fmt.Sprintf("control = %q", control),
		`auto-publish = "off"`,
		"max_leases_per_guest = 1000",
	}
	export := func(name, dev, mnt string) []string {
		return []string{"[export." + name + "]", fmt.Sprintf("device = %q", dev), fmt.Sprintf("mount = %q", mnt)}
	}
	listen := func(socks ...string) string {
		q := make([]string, len(socks))
		for i, s := range socks {
			q[i] = fmt.Sprintf("%q", "unix:"+s)
		}
		return "listen = [" + strings.Join(q, ", ") + "]"
	}
	write := func(parts ...[]string) {
		var lines []string
		for _, p := range parts {
			lines = append(lines, p...)
		}
		hostConfig(t, conf, lines...)
	}
	write(base, []string{listen(guest1)}, export("a", devA, mntA))
	h := &hostProc{control: control, guest: "unix:" + guest1}
	runHostCmd(t, h, mntA, "host", "--config", conf)

	ga := guestMount(t, "--connect", "unix:"+guest1, "--export", "a", "--device", devA)
	f, err := os.Open(filepath.Join(ga, "hello"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	stillReads := func() {
		t.Helper()
		if b, err := io.ReadAll(io.NewSectionReader(f, 0, 100)); err != nil || string(b) != "generation one\n" {
			t.Fatalf("the open file of export a: %q %v", b, err)
		}
	}
	status := func() string {
		t.Helper()
		out, err := leasefs(t, "status", "--control", control, "--json")
		if err != nil {
			t.Fatalf("status: %v\n%s", err, out)
		}
		return out
	}
	sessionBefore := status()

	// Add export b and a second address.
	write(base, []string{listen(guest1, guest2)}, export("a", devA, mntA), export("b", devB, mntB))
	if got := reloadAndWait(t, h); !strings.Contains(got, "reloaded") {
		t.Fatalf("reload: %s\n%s", got, h.Log)
	}
	gb := guestMount(t, "--connect", "unix:"+guest2, "--export", "b", "--device", devB)
	if b, err := os.ReadFile(filepath.Join(gb, "hello")); err != nil || string(b) != "generation one\n" {
		t.Fatalf("export b: %q %v", b, err)
	}
	stillReads()
	if s := status(); !strings.Contains(s, `"name": "b"`) && !strings.Contains(s, `"name":"b"`) {
		t.Fatalf("status after adding b:\n%s", s)
	}

	// Refusals: each keeps everything as it is.
	served := listenSocket(t, filepath.Join(run, "taken.sock"))
	for _, c := range []struct {
		name  string
		parts [][]string
		want  string
	}{
		{"syntax", [][]string{base, {"listen = [unclosed"}}, "host.toml"},
		{"no exports left", [][]string{base, {listen(guest1, guest2)}}, "need --export and --listen"},
		{"unknown key", [][]string{base, {listen(guest1, guest2), "max_leases = 5"}, export("a", devA, mntA), export("b", devB, mntB)}, `max_leases\" is not a setting`},
		{"fixed setting", [][]string{base, {listen(guest1, guest2), "grace = \"1m\""}, export("a", devA, mntA), export("b", devB, mntB)}, "grace changed, which needs a restart"},
		{"taken address", [][]string{base, {listen(guest1, guest2, served)}, export("a", devA, mntA), export("b", devB, mntB), export("c", devC, mntC)}, "is being served by another process"},
		{"export not mounted there", [][]string{base, {listen(guest1, guest2, filepath.Join(run, "guest3.sock"))}, export("a", devA, mntA), export("b", devB, mntB), export("c", "/dev/null", mntC)}, "not a block device"},
		{"bad export", [][]string{base, {listen(guest1, guest2)}, export("a", devA, mntA), export("b", devB, mntB), {"[export.c]", `device = "/dev/null"`}}, "want exactly device and mount"},
	} {
		write(c.parts...)
		if got := reloadAndWait(t, h); !strings.Contains(got, "reload refused") || !strings.Contains(got, c.want) {
			t.Errorf("%s: %s; want a refusal saying %q", c.name, got, c.want)
		}
		if s := status(); strings.Contains(s, mntC) || !strings.Contains(s, mntB) {
			t.Errorf("%s: a refused reload changed the exports:\n%s", c.name, s)
		}
		if _, err := os.Stat(guest2); err != nil {
			t.Errorf("%s: the second address went: %v", c.name, err)
		}
		if exists(filepath.Join(run, "guest3.sock")) {
			t.Errorf("%s: a refused reload left a new address behind", c.name)
		}
		stillReads()
	}

	// Take b and the second address away again.
	write(base, []string{listen(guest1)}, export("a", devA, mntA))
	if got := reloadAndWait(t, h); !strings.Contains(got, "reloaded") {
		t.Fatalf("reload: %s\n%s", got, h.Log)
	}
	waitFor(t, "guest2.sock removed", func() bool { return !exists(guest2) })
	if s := status(); strings.Contains(s, mntB) {
		t.Fatalf("export b still served:\n%s", s)
	}
	stillReads()
	peer := regexp.MustCompile(`"peer": "[^"]*",\s*"generation": 1,\s*"leases": 1`).FindString(sessionBefore)
	if after := status(); peer == "" || !strings.Contains(after, peer) {
		t.Errorf("the guest of a is not the same session with its lease:\nbefore %s\nafter %s", sessionBefore, after)
	}
}

// listenSocket serves a Unix socket at path (another process's, as far
// as the agent can tell) until t ends, and returns path.
func listenSocket(t *testing.T, path string) string {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return path
}

// The command line and the file merge: exports and listen addresses
// from both are served; any other setting given in both places is an
// error naming both, as is an export named in both. A missing file
// named by --config is an error, the default one missing is not; every
// command's --control defaults to the unit's socket.
func TestConfigPrecedence(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "host.toml")
	hostConfig(t, conf, `listen = ["vsock:5000", "vsock:5001"]`, `ack_timeout = "3s"`,
		"[export.m]", `device = "/dev/vdb"`, `mount = "/srv/m"`)
	o, err := parseHost([]string{"--config", conf, "--listen", "vsock:6000", "--state-dir", "/from/flag", "--export", "n=/dev/vdc:/srv/n"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	var ports []uint32
	for _, l := range o.listen {
		ports = append(ports, l.Port)
	}
	if fmt.Sprint(ports) != "[5000 5001 6000]" || o.stateDir != "/from/flag" || o.ackTimeout != 3*time.Second ||
		len(o.exports) != 2 || o.exports[0] != (exportSpec{"m", "/dev/vdb", "/srv/m"}) || o.exports[1] != (exportSpec{"n", "/dev/vdc", "/srv/n"}) ||
		o.control.Path != "/run/leasefs/control.sock" {
		t.Fatalf("parsed %+v", o)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--ack-timeout", "4s"}, `ack_timeout is also given on the command line (--ack-timeout): give each setting in one place`},
		{[]string{"--export", "m=/dev/vdd:/srv/other"}, "the name m is given twice"},
	} {
		if _, err := parseHost(append([]string{"--config", conf}, c.args...), io.Discard); err == nil || !strings.Contains(err.Error(), c.want) ||
			!strings.Contains(err.Error(), conf) && !strings.Contains(c.want, "twice") {
			t.Errorf("%v with the file: %v; want an error saying %q", c.args, err, c.want)
		}
	}
	if _, err := parseHost([]string{"--config", filepath.Join(dir, "missing.toml")}, io.Discard); err == nil || !os.IsNotExist(err) {
		t.Fatalf("a missing --config: %v", err)
	}
	for _, cmd := range []string{"status", "publish", "metrics"} {
		args := []string{cmd}
		if cmd == "publish" {
			args = append(args, "x")
		}
		if out, err := leasefs(t, args...); err == nil || !strings.Contains(out, "/run/leasefs/control.sock") {
			t.Errorf("leasefs %s without --control: %v %s", cmd, err, out)
		}
	}
}

// A QEMU or Firecracker host adds a VM's listener when it starts the VM
// and removes it when it stops it, through the control socket: the
// other guests never notice, and a reload keeps what was added.
func TestListenersAddedAndRemoved(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	conf := filepath.Join(run, "host.toml")
	control := "unix:" + filepath.Join(run, "control.sock")
	first := filepath.Join(run, "first.sock")
	hostConfig(t, conf, fmt.Sprintf("state_dir = %q", filepath.Join(run, "state")), fmt.Sprintf("control = %q", control),
		`auto_publish = "off"`, fmt.Sprintf("listen = [%q]", "unix:"+first), "[export.mirror]", fmt.Sprintf("device = %q", dev), fmt.Sprintf("mount = %q", mnt))
	h := &hostProc{control: control, guest: "unix:" + first}
	runHostCmd(t, h, mnt, "host", "--config", conf)
	g1 := guestMount(t, "--connect", "unix:"+first, "--export", "mirror", "--device", dev)
	f, err := os.Open(filepath.Join(g1, "hello"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	vm := filepath.Join(run, "vm7")
	out, err := leasefs(t, "listen", "--control", control, "--add", "hvsock:"+vm+":5000")
	if err != nil || !strings.Contains(out, "hvsock:"+vm+":5000") || !strings.Contains(out, "unix:"+first) {
		t.Fatalf("listen --add: %v\n%s", err, out)
	}
	g2 := guestMount(t, "--connect", "unix:"+vm+"_5000", "--export", "mirror", "--device", dev)
	if b, err := os.ReadFile(filepath.Join(g2, "hello")); err != nil || string(b) != "generation one\n" {
		t.Fatalf("the added VM's guest: %q %v", b, err)
	}
	if out, err := leasefs(t, "listen", "--control", control, "--add", "hvsock:"+vm+":5000"); err == nil || !strings.Contains(out, "already listening") {
		t.Fatalf("added twice: %v %s", err, out)
	}
	if got := reloadAndWait(t, h); !strings.Contains(got, "reloaded") || !exists(vm+"_5000") {
		t.Fatalf("a reload dropped the added listener: %s", got)
	}
	if out, err := leasefs(t, "listen", "--control", control, "--remove", "hvsock:"+vm+":5000"); err != nil || strings.Contains(out, vm) {
		t.Fatalf("listen --remove: %v\n%s", err, out)
	}
	if exists(vm + "_5000") {
		t.Fatal("the removed listener's socket is still there")
	}
	if out, err := leasefs(t, "listen", "--control", control, "--remove", "vsock:9"); err == nil || !strings.Contains(out, "not listening on vsock:9") {
		t.Fatalf("removing what is not served: %v %s", err, out)
	}
	if b, err := io.ReadAll(io.NewSectionReader(f, 0, 100)); err != nil || string(b) != "generation one\n" {
		t.Fatalf("the first guest's open file: %q %v", b, err)
	}
}
