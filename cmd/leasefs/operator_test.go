package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// hostFails runs 'leasefs host' with args, which must fail within 30 s,
// and returns what it printed.
func hostFails(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, leasefsBin, append([]string{"host"}, args...)...).CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("leasefs host %v ran on; want a refusal\n%s", args, out)
	}
	if err == nil {
		t.Fatalf("leasefs host %v succeeded; want a refusal\n%s", args, out)
	}
	return string(out)
}

// What a tired operator does to a running host agent: a second agent on
// the same export, on the same state directory, on the same sockets; a
// bad address; a duplicated export; SIGHUP. Each is refused with a
// message naming the conflict (and the running agent's pid), before
// anything is frozen; the running agent serves on undisturbed.
func TestOneAgentPerExportAndSocket(t *testing.T) {
	h, mnt, dev := startHostCmd(t)
	run := filepath.Dir(strings.TrimPrefix(h.control, "unix:"))
	pid := fmt.Sprintf("pid %d", h.Pid())
	fresh := func() (args []string, state string) {
		d := t.TempDir()
		state = filepath.Join(d, "state")
		return []string{"--listen", "unix:" + filepath.Join(d, "guest.sock"), "--control", "unix:" + filepath.Join(d, "control.sock"),
			"--state-dir", state, "--auto-publish", "off"}, state
	}
	otherMnt, otherDev := hostExport(t)
	refusals := []struct {
		name string
		args func() ([]string, string)
		want []string
	}{
		{"the same export", func() ([]string, string) {
			a, s := fresh()
			return append(a, "--export", "mirror="+dev+":"+mnt), s
		}, []string{"export mirror (" + mnt + ") is held by another leasefs host agent", pid}},
		{"the same state directory", func() ([]string, string) {
			a, _ := fresh()
			return append(a, "--export", "other="+otherDev+":"+otherMnt, "--state-dir", filepath.Join(run, "state")), ""
		}, []string{"the state directory " + filepath.Join(run, "state") + " is held by another leasefs host agent", pid}},
		{"the same control socket", func() ([]string, string) {
			a, s := fresh()
			return append(a, "--export", "other="+otherDev+":"+otherMnt, "--control", h.control), s
		}, []string{"--control " + h.control, "is being served by another process"}},
		{"the same guest socket", func() ([]string, string) {
			a, s := fresh()
			return append(a, "--export", "other="+otherDev+":"+otherMnt, "--listen", h.guest), s
		}, []string{"--listen " + h.guest, "is being served by another process"}},
		{"metrics off loopback", func() ([]string, string) {
			a, s := fresh()
			return append(a, "--export", "other="+otherDev+":"+otherMnt, "--metrics", "0.0.0.0:9464"), s
		}, []string{"served on loopback only"}},
		{"a socket in a missing directory", func() ([]string, string) {
			a, s := fresh()
			return append(a, "--export", "other="+otherDev+":"+otherMnt, "--listen", "unix:/nonexistent/leasefs/guest.sock"), s
		}, []string{"--listen unix:/nonexistent/leasefs/guest.sock", "no such file or directory"}},
		{"a VM directory that is not there", func() ([]string, string) {
			a, s := fresh()
			return append(a, "--export", "other="+otherDev+":"+otherMnt, "--listen", "hvsock-dir:/nonexistent/vms:5000"), s
		}, []string{"--listen hvsock-dir:/nonexistent/vms:5000: want a directory of VM sockets"}},
		{"one export twice", func() ([]string, string) {
			a, s := fresh()
			return append(a, "--export", "other="+otherDev+":"+otherMnt, "--export", "other="+dev+":"+mnt), s
		}, []string{"the name other is given twice"}},
		{"an export name that names no file", func() ([]string, string) {
			a, s := fresh()
			return append(a, "--export", "../x="+otherDev+":"+otherMnt), s
		}, []string{`export name "../x"`, "letters, digits"}},
		{"an fd store without systemd", func() ([]string, string) {
			a, s := fresh()
			return append(a, "--export", "other="+otherDev+":"+otherMnt, "--fd-store"), s
		}, []string{"--fd-store: systemd's notify socket"}},
		{"one filesystem twice", func() ([]string, string) {
			a, s := fresh()
			return append(a, "--export", "a="+otherDev+":"+otherMnt, "--export", "b="+otherDev+":/elsewhere"), s
		}, []string{"a and b are the same filesystem"}},
	}
	for _, c := range refusals {
		t.Run(c.name, func(t *testing.T) {
			args, state := c.args()
			out := hostFails(t, args...)
			for _, w := range c.want {
				if !strings.Contains(out, w) {
					t.Errorf("the refusal does not say %q:\n%s", w, out)
				}
			}
			if strings.Contains(out, "generation") {
				t.Errorf("refused after publishing:\n%s", out)
			}
			if state != "" {
				if gens, _ := filepath.Glob(filepath.Join(state, "*.generation")); len(gens) > 0 {
					t.Errorf("refused after publishing: %v", gens)
				}
			}
			// The running agent is untouched: its sockets answer.
			if out, err := leasefs(t, "status", "--control", h.control); err != nil || !strings.Contains(out, "mirror") {
				t.Fatalf("the running agent after the refusal: %v\n%s", err, out)
			}
		})
	}

	t.Run("SIGHUP", func(t *testing.T) {
		if err := h.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(5 * time.Second); !strings.Contains(h.Log.String(), "SIGHUP"); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("no word of the SIGHUP:\n%s", h.Log)
			}
		}
		if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
			t.Fatalf("publish after SIGHUP: %v\n%s", err, out)
		}
	})
}

// An agent killed outright leaves its sockets behind; the next agent on
// the same paths replaces them (saying so) and serves; its locks went
// with it.
func TestStaleSocketsAreReplaced(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	args := []string{"host", "--export", "mirror=" + dev + ":" + mnt, "--listen", "unix:" + filepath.Join(run, "guest.sock"),
		"--control", "unix:" + filepath.Join(run, "control.sock"), "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off"}
	first := exec.Command(leasefsBin, args...)
	out, err := first.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	var seen strings.Builder
	for !strings.Contains(seen.String(), "ready") {
		n, err := out.Read(buf)
		if err != nil {
			first.Process.Kill()
			first.Wait()
			t.Fatalf("the first agent: %v\n%s", err, seen.String())
		}
		seen.Write(buf[:n])
	}
	first.Process.Kill()
	first.Wait()
	if _, err := os.Stat(filepath.Join(run, "control.sock")); err != nil {
		t.Fatalf("the killed agent left no socket to test with: %v", err)
	}
	h := &hostProc{control: "unix:" + filepath.Join(run, "control.sock"), guest: "unix:" + filepath.Join(run, "guest.sock")}
	runHostCmd(t, h, mnt, args...)
	if n := strings.Count(h.Log.String(), "replaced a stale socket"); n != 2 {
		t.Errorf("%d stale sockets reported, want 2:\n%s", n, h.Log)
	}
	if out, err := leasefs(t, "status", "--control", h.control); err != nil || !strings.Contains(out, "mirror") {
		t.Fatalf("status: %v\n%s", err, out)
	}
}

// 'leasefs --version' and 'leasefs version' say the same: the version
// make stamps in, or else what the toolchain recorded, then the Go
// version and platform.
func TestVersion(t *testing.T) {
	for _, flag := range []string{"--version", "version"} {
		out, err := leasefs(t, flag)
		if err != nil || !strings.HasPrefix(out, "leasefs ") || !strings.Contains(out, runtime.Version()) || !strings.Contains(out, runtime.GOOS+"/"+runtime.GOARCH) {
			t.Errorf("leasefs %s: %v %q", flag, err, out)
		}
	}
	bin := filepath.Join(t.TempDir(), "leasefs")
	if out, err := exec.Command("go", "build", "-ldflags", "-X main.version=v9.8.7", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	if out, err := exec.Command(bin, "--version").CombinedOutput(); err != nil || !strings.HasPrefix(string(out), "leasefs v9.8.7 (") {
		t.Errorf("a stamped build: %v %q", err, out)
	}
}

// The host agent's requests are commands of their own, and their older
// spellings as 'host' flags do the same.
func TestHostRequestCommands(t *testing.T) {
	none := "unix:" + filepath.Join(t.TempDir(), "none.sock")
	for _, c := range []struct {
		cmd, old []string
		want     string
	}{
		{[]string{"reload", "--control", none}, []string{"host", "--reload", "--control", none}, "reload refused"},
		{[]string{"upgrade", "--control", none}, []string{"host", "--upgrade", "--control", none}, "control socket"},
		{[]string{"check-config", "--config", "/nonexistent.toml"}, []string{"host", "--check-config", "--config", "/nonexistent.toml"}, "/nonexistent.toml"},
		{[]string{"check-upgrade", "--config", "/nonexistent.toml"}, []string{"host", "--check-upgrade", "--config", "/nonexistent.toml"}, "/nonexistent.toml"},
	} {
		out, err := leasefs(t, c.cmd...)
		if err == nil || !strings.Contains(out, c.want) {
			t.Errorf("leasefs %s: %v\n%s", strings.Join(c.cmd, " "), err, out)
		}
		old, oldErr := leasefs(t, c.old...)
		if (oldErr == nil) != (err == nil) || old != out {
			t.Errorf("leasefs %s does not do what leasefs %s does:\n%s\n%s", strings.Join(c.old, " "), strings.Join(c.cmd, " "), old, out)
		}
	}
	if out, _ := leasefs(t, "--help"); !strings.Contains(out, "check-config") || strings.Contains(out, "check-upgrade") {
		t.Errorf("the usage lists the commands an operator runs, not the one between binaries:\n%s", out)
	}
}

// vmSocket plays a VMM creating its VM's hybrid-vsock socket at path:
// a listening Unix socket, removed (the VM gone) by the returned func.
func vmSocket(t *testing.T, path string) (gone func()) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	gone = func() { once.Do(func() { l.Close() }) } // closing removes it
	t.Cleanup(gone)
	return gone
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after 10s: %s", what)
		}
	}
}

func exists(path string) bool { _, err := os.Lstat(path); return err == nil }

// Firecracker VMs come and go under one agent with --listen
// hvsock-dir:DIR:PORT: each VM's socket appearing in DIR is served as
// that VM (at SOCKET_PORT, where Firecracker delivers its guest's
// connections), and one going away ends only its own serving; the
// others read on, and the agent never restarts. A symlink planted in
// DIR is not served.
func TestVMsComeAndGo(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	vms := filepath.Join(run, "vms")
	if err := os.Mkdir(vms, 0o755); err != nil {
		t.Fatal(err)
	}
	vm1 := filepath.Join(vms, "vm1.sock")
	gone1 := vmSocket(t, vm1) // there before the agent
	h := &hostProc{control: "unix:" + filepath.Join(run, "control.sock")}
	runHostCmd(t, h, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", "hvsock-dir:"+vms+":5000",
		"--control", h.control, "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	pid := h.Pid()
	waitFor(t, "vm1 served", func() bool { return exists(vm1 + "_5000") })

	vm2 := filepath.Join(vms, "vm2.sock")
	vmSocket(t, vm2) // one that comes while the agent runs
	waitFor(t, "vm2 served", func() bool { return exists(vm2 + "_5000") })
	elsewhere := filepath.Join(run, "elsewhere.sock")
	vmSocket(t, elsewhere)
	if err := os.Symlink(elsewhere, filepath.Join(vms, "planted")); err != nil {
		t.Fatal(err)
	}

	g1 := guestMount(t, "--connect", "unix:"+vm1+"_5000", "--export", "mirror", "--device", dev)
	g2 := guestMount(t, "--connect", "unix:"+vm2+"_5000", "--export", "mirror", "--device", dev)
	for _, g := range []string{g1, g2} {
		if b, err := os.ReadFile(filepath.Join(g, "hello")); err != nil || string(b) != "generation one\n" {
			t.Fatalf("%s: %q %v", g, b, err)
		}
	}
	status := func() string {
		out, err := leasefs(t, "status", "--control", h.control, "--json")
		if err != nil {
			t.Fatalf("status: %v\n%s", err, out)
		}
		return out
	}
	if s := status(); !strings.Contains(s, "vm "+vm1) || !strings.Contains(s, "vm "+vm2) {
		t.Fatalf("status does not name both VMs by their sockets:\n%s", s)
	}

	gone1()
	waitFor(t, "vm1's listener removed", func() bool { return !exists(vm1 + "_5000") })
	waitFor(t, "vm1's guest gone from status", func() bool { return !strings.Contains(status(), "vm "+vm1) })
	os.WriteFile(filepath.Join(mnt, "news"), []byte("generation two\n"), 0o644)
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	waitFor(t, "vm2 reads generation two", func() bool {
		b, err := os.ReadFile(filepath.Join(g2, "news"))
		return err == nil && string(b) == "generation two\n"
	})
	if exists(filepath.Join(vms, "planted_5000")) {
		t.Fatal("a symlink planted in the VM directory was served")
	}
	// vm1 comes back (a restart of the VM): served again.
	vmSocket(t, vm1)
	waitFor(t, "vm1 served again", func() bool { return exists(vm1 + "_5000") })
	if h.Pid() != pid || h.Exited() {
		t.Fatal("the agent restarted")
	}
	for _, want := range []string{"VM appeared: serving it", "VM gone: stopped serving it"} {
		if !strings.Contains(h.Log.String(), want) {
			t.Errorf("the log does not say %q:\n%s", want, h.Log)
		}
	}
	// The whole directory goes: the agent says so and serves on.
	if err := os.RemoveAll(vms); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(h.Log.String(), "the VM directory "+vms+" is gone"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the directory's end is not logged:\n%s", h.Log)
		}
	}
	if s := status(); !strings.Contains(s, `"name": "mirror"`) {
		t.Fatalf("the agent after its VM directory went:\n%s", s)
	}
}

// An operator sees who holds what: 'status --leases' lists each guest's
// leases (path, generation, how long), and a break waiting on a guest
// that cannot answer, with its age; the revocation's log line names the
// guest and the path; the metrics give each guest's lag, the last
// publish and the build.
func TestSeeingLeases(t *testing.T) {
	h, mnt, dev := startHostCmd(t)
	if err := os.WriteFile(filepath.Join(mnt, "held"), []byte("held bytes"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil || !strings.Contains(out, "generation 2") {
		t.Fatalf("publish: %v %s", err, out)
	}
	dir := guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev)
	f, err := os.Open(filepath.Join(dir, "held"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out, err := leasefs(t, "status", "--control", h.control, "--leases")
	if err != nil || !regexp.MustCompile(`mirror\s+pid \d+ uid 0\s+/held\s+2\s+\d+s\s+-`).MatchString(out) {
		t.Fatalf("status --leases: %v\n%s", err, out)
	}
	if out, err := leasefs(t, "status", "--control", h.control, "--leases", "nope"); err == nil || !strings.Contains(out, `no export "nope"`) {
		t.Fatalf("status --leases nope: %v\n%s", err, out)
	}

	// The guest cannot answer a break: it waits, with its age shown,
	// until the deadline revokes it.
	pids := serverPids(dir)
	if len(pids) != 1 {
		t.Fatalf("guest pids %v", pids)
	}
	testenv.Stop(t, pids[0])
	defer syscall.Kill(pids[0], syscall.SIGCONT)
	wrote := make(chan error, 1)
	go func() {
		w, err := os.OpenFile(filepath.Join(mnt, "held"), os.O_WRONLY, 0)
		if err == nil {
			w.Close()
		}
		wrote <- err
	}()
	pending := regexp.MustCompile(`/held\s+2\s+\d+s\s+\d+(\.\d+)?m?s`)
	waitFor(t, "a pending break in status --leases", func() bool {
		out, _ := leasefs(t, "status", "--control", h.control, "--leases", "mirror")
		return pending.MatchString(out)
	})
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the writer still waits after the ack deadline")
	}
	waitFor(t, "the revocation logged", func() bool {
		return regexp.MustCompile(`revoking: export=mirror guest="pid \d+ uid 0" path=/held`).MatchString(h.Log.String())
	})

	m, err := leasefs(t, "metrics", "--control", h.control)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`leasefs_build_info{goversion="` + runtime.Version() + `",version="`, `leasefs_last_publish_timestamp_seconds{export="mirror"} 1.`,
		`leasefs_guest_generation_lag{export="mirror",guest="pid `} {
		if !strings.Contains(m, want) {
			t.Errorf("the metrics lack %s", want)
		}
	}
}

// notifySocket is systemd's notify socket, in dir, for the agents the
// test starts ($NOTIFY_SOCKET).
func notifySocket(t *testing.T, dir string) (*net.UnixConn, string) {
	sock := filepath.Join(dir, "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv("NOTIFY_SOCKET", sock)
	return conn, sock
}

// systemd's side of sd_notify: the host agent extends its start timeout
// while it takes the first generations, then says it is ready.
func TestHostExtendsItsStartTimeout(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	conn, _ := notifySocket(t, run)
	var got []string
	var mu sync.Mutex
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			mu.Lock()
			got = append(got, string(buf[:n]))
			mu.Unlock()
		}
	}()
	h := &hostProc{control: "unix:" + filepath.Join(run, "control.sock")}
	runHostCmd(t, h, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", "unix:"+filepath.Join(run, "guest.sock"),
		"--control", h.control, "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	waitFor(t, "READY=1", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return slices.ContainsFunc(got, func(m string) bool { return strings.HasPrefix(m, "READY=1\nSTATUS=serving mirror generation 1") })
	})
	mu.Lock()
	defer mu.Unlock()
	if !strings.HasPrefix(got[0], "EXTEND_TIMEOUT_USEC=60000000\nSTATUS=publishing the first generations") {
		t.Fatalf("the notifications: %q", got)
	}
}

// A reload asked for while the agent starts (its first scan can take
// minutes) neither ends it nor is lost: it happens once the agent is
// ready. systemd's notify socket is kept full, so the start cannot get
// past its first notification until the test has signalled.
func TestReloadDuringStart(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	conn, sock := notifySocket(t, run)
	filler, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer filler.Close()
	for queued := 0; ; queued++ {
		filler.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		if _, err := filler.Write([]byte("FILLER=1")); err != nil {
			if queued == 0 {
				t.Fatal(err)
			}
			break
		}
	}
	control := "unix:" + filepath.Join(run, "control.sock")
	var log testenv.SyncBuffer
	cmd := exec.Command(leasefsBin, "host", "--export", "mirror="+dev+":"+mnt, "--listen", "unix:"+filepath.Join(run, "guest.sock"),
		"--control", control, "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	cmd.Stderr = &log
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var exitErr error
	exited := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, out)
		exitErr = cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			t.Errorf("the agent did not exit on SIGTERM")
			_ = cmd.Process.Kill()
		}
		waitGone(t, mnt)
	})
	// The control socket is bound early in the start, before the first
	// notification, which waits for room in the socket's queue.
	waitFor(t, "the control socket", func() bool {
		_, err := os.Stat(filepath.Join(run, "control.sock"))
		return err == nil
	})
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
		t.Fatalf("the agent ended on a SIGHUP during its start: %v\n%s", exitErr, log.String())
	case <-time.After(500 * time.Millisecond):
	}
	go func() { // systemd reads the notifications at last
		buf := make([]byte, 4096)
		for {
			if _, err := conn.Read(buf); err != nil {
				return
			}
		}
	}()
	waitFor(t, "the reload asked for during the start", func() bool {
		return strings.Contains(log.String(), "SIGHUP: reading the settings again") && strings.Contains(log.String(), "reloaded")
	})
	if out, err := leasefs(t, "status", "--control", control); err != nil || !strings.Contains(out, "mirror") {
		t.Fatalf("status after the reload: %v\n%s", err, out)
	}
}

// make install puts the binary, the mount helper and the units (their
// commands pointing at the binary) under PREFIX and DESTDIR; make
// uninstall takes them all away again.
func TestInstallAndUninstall(t *testing.T) {
	testenv.RequireTool(t, "make")
	dest := t.TempDir()
	mk := func(target string) {
		t.Helper()
		cmd := exec.Command("make", "-C", "../..", target, "DESTDIR="+dest, "PREFIX=/opt/leasefs")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("make %s: %v\n%s", target, err, out)
		}
	}
	mk("install")
	units := filepath.Join(dest, "opt/leasefs/lib/systemd/system")
	for _, f := range []string{"opt/leasefs/bin/leasefs", "sbin/mount.fuse.leasefs", "opt/leasefs/lib/systemd/system/leasefs-host.service",
		"opt/leasefs/lib/systemd/system/leasefs-guest@.service"} {
		if !exists(filepath.Join(dest, f)) {
			t.Errorf("make install did not make %s", f)
		}
	}
	if l, _ := os.Readlink(filepath.Join(dest, "sbin/mount.fuse.leasefs")); l != "/opt/leasefs/bin/leasefs" {
		t.Errorf("the mount helper points at %q", l)
	}
	for _, u := range []string{"leasefs-host.service", "leasefs-guest@.service"} {
		k := unitKeys(t, filepath.Join(units, u))
		for _, key := range []string{"ExecStart", "ExecStopPost"} {
			if v := k[key]; strings.Contains(v, "leasefs ") && !strings.Contains(v, "/opt/leasefs/bin/leasefs ") {
				t.Errorf("%s %s=%s does not run the installed binary", u, key, v)
			}
		}
	}
	mk("uninstall")
	var left []string
	filepath.WalkDir(dest, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			left = append(left, p)
		}
		return nil
	})
	if len(left) > 0 {
		t.Errorf("make uninstall left %v", left)
	}
}

// 'leasefs publish --label REV' records an upstream revision with the
// generation: the host's status and metrics and the guest's status show
// it; one that goes back is refused unless --force.
func TestPublishLabels(t *testing.T) {
	h, mnt, dev := startHostCmd(t)
	t.Setenv("LEASEFS_RUN_DIR", t.TempDir())
	dir := guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev)
	os.WriteFile(filepath.Join(mnt, "news"), []byte("r10\n"), 0o644)
	out, err := leasefs(t, "publish", "--control", h.control, "--label", "r10", "mirror")
	if err != nil || !strings.HasPrefix(out, "mirror: generation 2 (r10), freeze ") {
		t.Fatalf("publish --label: %v %s", err, out)
	}
	if out, err := leasefs(t, "status", "--control", h.control); err != nil || !regexp.MustCompile(`mirror\s+2\s+r10\s`).MatchString(out) {
		t.Fatalf("status: %v\n%s", err, out)
	}
	if m, _ := leasefs(t, "metrics", "--control", h.control); !strings.Contains(m, `leasefs_generation_label{export="mirror",label="r10"} 1`) {
		t.Errorf("metrics lack the label:\n%s", m)
	}
	waitFor(t, "the guest's status names r10", func() bool {
		out, _ := leasefs(t, "guest", "status", dir)
		return strings.Contains(out, "generation") && strings.Contains(out, "2 (r10)")
	})
	if out, err := leasefs(t, "publish", "--control", h.control, "--label", "r9", "mirror"); err == nil || !strings.Contains(out, `"r9" sorts before the last label "r10"`) {
		t.Fatalf("a label going back: %v %s", err, out)
	}
	if out, err := leasefs(t, "publish", "--control", h.control, "--label", "r9", "--force", "mirror"); err != nil || !strings.Contains(out, "generation 3 (r9)") {
		t.Fatalf("forced: %v %s", err, out)
	}
	waitFor(t, "the guest's status names r9", func() bool {
		out, _ := leasefs(t, "guest", "status", dir)
		return strings.Contains(out, "3 (r9)")
	})
	// A generation published without a label has none, here and there.
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil || !strings.Contains(out, "generation 4,") {
		t.Fatalf("publish: %v %s", err, out)
	}
	if out, _ := leasefs(t, "status", "--control", h.control); !regexp.MustCompile(`mirror\s+4\s+-\s`).MatchString(out) {
		t.Errorf("status after an unlabeled publish:\n%s", out)
	}
	waitFor(t, "the guest on generation 4, unlabeled", func() bool {
		out, _ := leasefs(t, "guest", "status", dir)
		return strings.Contains(out, "4, since")
	})
}

// A guest started while its host agent is down (--retry, as the unit
// runs it) waits for it, backing off, and mounts once it is up.
func TestGuestWaitsForItsHost(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	t.Setenv("LEASEFS_RUN_DIR", filepath.Join(run, "guests"))
	sock := filepath.Join(run, "guest.sock")
	dir := t.TempDir()
	log := filepath.Join(run, "guest.log")
	done := make(chan error, 1)
	go func() {
		_, err := leasefs(t, "guest", "--retry", "--log", log, "--connect", "unix:"+sock, "--export", "mirror", "--device", dev, dir)
		done <- err
	}()
	t.Cleanup(func() { imgtest.Unmount(t, dir); waitGone(t, dir) })
	waitFor(t, "the guest trying again", func() bool {
		b, _ := os.ReadFile(log)
		return strings.Count(string(b), "cannot reach the host agent; trying again") >= 2
	})
	select {
	case err := <-done:
		t.Fatalf("the guest gave up without its host: %v", err)
	default:
	}
	h := &hostProc{control: "unix:" + filepath.Join(run, "control.sock"), guest: "unix:" + sock}
	runHostCmd(t, h, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", h.guest, "--control", h.control,
		"--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the guest: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the guest did not mount within 30 s of its host coming up")
	}
	if b, err := os.ReadFile(filepath.Join(dir, "hello")); err != nil || string(b) != "generation one\n" {
		t.Fatalf("read %q %v", b, err)
	}
}

// The host unit's CapabilityBoundingSet is all the agent needs: run with
// only those (setpriv), it publishes with expedited RCU, leases for a
// guest a file another user owns and only that user may read, and a host
// writer of that file waits for the guest's acknowledgement.
func TestHostRunsWithTheUnitsCapabilities(t *testing.T) {
	testenv.RequireTool(t, "setpriv")
	unit := unitKeys(t, filepath.Join(examples, "systemd/leasefs-host.service"))
	var caps []string
	var mask uint64
	for _, c := range strings.Fields(unit["CapabilityBoundingSet"]) {
		caps = append(caps, "+"+strings.ToLower(strings.TrimPrefix(c, "CAP_")))
		n, ok := map[string]uint{"CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_SYS_ADMIN": 21, "CAP_LEASE": 28}[c]
		if !ok {
			t.Fatalf("the unit names %s: add its number here", c)
		}
		mask |= 1 << n
	}
	mnt, dev := hostExport(t)
	private := filepath.Join(mnt, "private")
	if err := os.WriteFile(private, []byte("only its owner reads this"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(private, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	run := t.TempDir()
	h := &hostProc{control: "unix:" + filepath.Join(run, "control.sock"), guest: "unix:" + filepath.Join(run, "guest.sock"),
		wrap: []string{"setpriv", "--bounding-set", "-all," + strings.Join(caps, ","), "--"}}
	runHostCmd(t, h, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", h.guest, "--control", h.control,
		"--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", h.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("CapEff:\t%016x", mask); !strings.Contains(string(status), want) {
		t.Fatalf("the agent does not run with exactly the unit's capabilities (%s):\n%s", want, status)
	}
	dir := guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev)
	f, err := os.Open(filepath.Join(dir, "private"))
	if err != nil {
		t.Fatalf("a guest's open of another user's file: %v\n%s", err, h.Log)
	}
	defer f.Close()
	if b, err := io.ReadAll(f); err != nil || string(b) != "only its owner reads this" {
		t.Fatalf("read %q %v", b, err)
	}
	wrote := make(chan error, 1)
	go func() {
		w, err := os.OpenFile(private, os.O_WRONLY, 0)
		if err == nil {
			w.Close()
		}
		wrote <- err
	}()
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the writer still waits: the break did not reach the agent, or its guest's ack did not come back")
	}
	// Fenced: its reads are ESTALE once the guest has dropped the pages
	// it cached (after its ack; until then they give the old bytes).
	waitFor(t, "the guest's reads of the broken file ESTALE", func() bool {
		_, err := f.ReadAt(make([]byte, 4), 0)
		return errors.Is(err, syscall.ESTALE)
	})
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
		t.Fatalf("publish: %v %s", err, out)
	}
	for _, bad := range []string{"cannot expedite", "ERROR", "operation not permitted"} {
		if strings.Contains(h.Log.String(), bad) {
			t.Errorf("the agent's log says %q:\n%s", bad, h.Log)
		}
	}
}
