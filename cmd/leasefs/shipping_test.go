package main

// What an operator meets shipping the agent: the export's mount made
// read-only by the unit's hardening, the settings checked and reloaded
// with an outcome, what systemd and the journal are told, an export
// that vanishes, and the guest's messages.

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/hosttest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// ProtectSystem=strict makes the export's mount read-only in the
// service's mount namespace while its filesystem stays read-write: the
// agent serves it (it only reads it). A filesystem mounted read-only is
// still refused.
func TestExportReadOnlyInTheAgentsNamespace(t *testing.T) {
	testenv.RequireTool(t, "unshare")
	mnt, dev := hostExport(t)
	run := t.TempDir()
	h := &hostProc{control: "unix:" + filepath.Join(run, "control.sock"), guest: "unix:" + filepath.Join(run, "guest.sock"),
		wrap: []string{"unshare", "-m", "--propagation", "slave", "sh", "-c", `mount -o remount,bind,ro "$0" && exec "$@"`, mnt}}
	runHostCmd(t, h, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", h.guest,
		"--control", h.control, "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	if err := os.WriteFile(filepath.Join(mnt, "hello"), []byte("generation two\n"), 0o644); err != nil {
		t.Fatal(err) // the writer, outside, still writes
	}
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	g := guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev)
	if b, err := os.ReadFile(filepath.Join(g, "hello")); err != nil || string(b) != "generation two\n" {
		t.Fatalf("through the guest: %q %v", b, err)
	}

	ro, rodev := hostExport(t)
	if out, err := exec.Command("mount", "-o", "remount,ro", ro).CombinedOutput(); err != nil {
		t.Fatalf("remount ro: %v %s", err, out)
	}
	out, err := leasefs(t, "host", "--check-config", "--config", "", "--export", "ro="+rodev+":"+ro, "--listen", "unix:"+filepath.Join(run, "x.sock"))
	if err == nil || !strings.Contains(out, "is read-only") {
		t.Fatalf("a read-only filesystem: %v\n%s", err, out)
	}
}

// --check-config checks a file without an agent, and with one says what
// a reload would change; --reload applies it and fails, exit 1, when the
// agent refuses it, which keeps its settings; a setting on both the
// command line and in the file is an error at start and at reload.
func TestCheckConfigAndReloadOutcome(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	conf := filepath.Join(run, "host.toml")
	control := "unix:" + filepath.Join(run, "control.sock")
	guest1, guest2 := "unix:"+filepath.Join(run, "g1.sock"), "unix:"+filepath.Join(run, "g2.sock")
	settings := func(listen ...string) {
		hostConfig(t, conf, fmt.Sprintf("state_dir = %q", filepath.Join(run, "state")), fmt.Sprintf("control = %q", control),
			`auto_publish = "off"`, `listen = ["`+strings.Join(listen, `", "`)+`"]`,
			"[export.mirror]", fmt.Sprintf("device = %q", dev), fmt.Sprintf("mount = %q", mnt))
	}
	settings(guest1)
	out, err := leasefs(t, "host", "--check-config", "--config", conf)
	if err != nil || !strings.Contains(out, "settings are valid") || !strings.Contains(out, "no host agent answers") ||
		!strings.Contains(out, "export mirror: "+dev) {
		t.Fatalf("--check-config without an agent: %v\n%s", err, out)
	}
	hostConfig(t, filepath.Join(run, "bad.toml"), `listen = ["unix:/x"]`, "[export.m]", `device = "/dev/null"`, fmt.Sprintf("mount = %q", mnt))
	if out, err := leasefs(t, "host", "--check-config", "--config", filepath.Join(run, "bad.toml")); err == nil || !strings.Contains(out, "/dev/null is not a block device") {
		t.Fatalf("--check-config of a wrong device: %v\n%s", err, out)
	}
	// The same setting in both places, at start.
	if out, err := leasefs(t, "host", "--config", conf, "--auto-publish", "quiet=1s"); err == nil || !strings.Contains(out, "give each setting in one place") {
		t.Fatalf("a setting in both places at start: %v\n%s", err, out)
	}

	h := &hostProc{control: control, guest: guest1}
	runHostCmd(t, h, mnt, "host", "--config", conf, "--max-leases-per-guest", "100")
	settings(guest1, guest2)
	out, err = leasefs(t, "host", "--check-config", "--config", conf)
	if err != nil || !strings.Contains(out, "listen "+guest2+": added") {
		t.Fatalf("--check-config with the agent running: %v\n%s", err, out)
	}
	if exists(strings.TrimPrefix(guest2, "unix:")) {
		t.Fatal("--check-config changed the agent")
	}
	out, err = leasefs(t, "host", "--reload", "--control", control)
	if err != nil || !strings.Contains(out, "reloaded: listen "+guest2+": added") || !exists(strings.TrimPrefix(guest2, "unix:")) {
		t.Fatalf("--reload: %v\n%s", err, out)
	}
	for _, bad := range [][]string{
		{"listen = 5"},
		{`max_leases_per_guest = 7`, `listen = ["` + guest1 + `"]`, "[export.mirror]", fmt.Sprintf("device = %q", dev), fmt.Sprintf("mount = %q", mnt)},
	} {
		hostConfig(t, conf, append([]string{fmt.Sprintf("state_dir = %q", filepath.Join(run, "state")), fmt.Sprintf("control = %q", control), `auto_publish = "off"`}, bad...)...)
		out, err = leasefs(t, "host", "--reload", "--control", control)
		if err == nil || !strings.Contains(out, "reload refused") {
			t.Errorf("--reload of %v: %v\n%s", bad, err, out)
		}
		if !exists(strings.TrimPrefix(guest2, "unix:")) {
			t.Fatalf("a refused reload changed the agent")
		}
	}
	if !strings.Contains(h.Log.String(), "give each setting in one place") {
		t.Errorf("the conflicting reload was not logged as such:\n%s", h.Log)
	}
}

// A labelled publish takes the changes an automatic publish was waiting
// for: no empty generation follows it, and the label stays.
func TestNoEmptyAutomaticPublish(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	control := "unix:" + filepath.Join(run, "control.sock")
	h := &hostProc{control: control, guest: "unix:" + filepath.Join(run, "guest.sock")}
	runHostCmd(t, h, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", h.guest,
		"--control", control, "--state-dir", filepath.Join(run, "state"), "--auto-publish", "quiet=1s,max=2s")
	if err := os.WriteFile(filepath.Join(mnt, "hello"), []byte("a new version\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := leasefs(t, "publish", "--control", control, "--label", "r1", "mirror"); err != nil || !strings.Contains(out, "generation 2") {
		t.Fatalf("publish --label: %v\n%s", err, out)
	}
	time.Sleep(3 * time.Second) // past quiet and max
	out, err := leasefs(t, "status", "--control", control)
	if err != nil || !regexpMatch(`mirror\s+2\s+r1\s`, out) {
		t.Fatalf("after the quiet period, want generation 2 labelled r1:\n%s%v\n%s", out, err, h.Log)
	}
	// A change after it is published on its own.
	if err := os.WriteFile(filepath.Join(mnt, "other"), []byte("x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the automatic publish of a real change", func() bool {
		out, _ := leasefs(t, "status", "--control", control)
		return regexpMatch(`mirror\s+3\s`, out)
	})
}

// The export's filesystem goes away under the agent (umount -l): within
// seconds the agent stops publishing and serving it and says so in the
// log, status, metrics and to systemd; its guests' open files answer
// ESTALE, never other bytes; mounted again, a reload serves it again.
func TestExportVanishes(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	sd := newFakeSystemd(t)
	control := "unix:" + filepath.Join(run, "control.sock")
	conf := filepath.Join(run, "host.toml")
	hostConfig(t, conf, fmt.Sprintf("state_dir = %q", filepath.Join(run, "state")), fmt.Sprintf("control = %q", control),
		`auto_publish = "quiet=500ms,max=1s"`, `listen = ["unix:`+filepath.Join(run, "guest.sock")+`"]`,
		"[export.mirror]", fmt.Sprintf("device = %q", dev), fmt.Sprintf("mount = %q", mnt))
	a := &hostProc{t: t, mnt: mnt, Agent: &hosttest.Agent{}}
	prog, argv, env, extra := sd.Start(leasefsBin, []string{"host", "--config", conf}, true)
	a.Prog, a.Args, a.Env, a.Extra = prog, argv, env, extra
	a.start()
	t.Cleanup(func() {
		if a.Pid() != 0 {
			a.stop(syscall.SIGTERM)
		}
	})
	g := guestMount(t, "--connect", "unix:"+filepath.Join(run, "guest.sock"), "--export", "mirror", "--device", dev)
	f, err := os.Open(filepath.Join(g, "hello"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if out, err := exec.Command("umount", "-l", mnt).CombinedOutput(); err != nil {
		t.Fatalf("umount -l: %v %s", err, out)
	}
	lost := time.Now()
	waitFor(t, "the export lost in status", func() bool {
		out, _ := leasefs(t, "status", "--control", control)
		return strings.Contains(out, "export mirror LOST")
	})
	if d := time.Since(lost); d > 3*time.Second {
		t.Errorf("noticed after %v", d)
	}
	if !strings.Contains(a.Log.String(), "export lost") {
		t.Errorf("no log line:\n%s", a.Log)
	}
	if m, _ := leasefs(t, "metrics", "--control", control); !strings.Contains(m, `leasefs_export_lost{export="mirror"} 1`) {
		t.Errorf("metrics:\n%s", m)
	}
	waitFor(t, "systemd's status saying so", func() bool { return strings.Contains(sd.Status(), "mirror LOST") })
	b := make([]byte, 64)
	if n, err := f.ReadAt(b, 0); !errors.Is(err, syscall.ESTALE) {
		t.Errorf("the open file of the lost export read %q, %v; want ESTALE", b[:n], err)
	}
	// The writer's files now land on the directory beneath; nothing is
	// published.
	if err := os.WriteFile(filepath.Join(mnt, "stray"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := leasefs(t, "publish", "--control", control, "mirror"); err == nil {
		t.Errorf("a publish of the lost export: %s", out)
	}
	// Mounted again, and reloaded: served again.
	if out, err := exec.Command("mount", dev, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount again: %v %s", err, out)
	}
	if out, err := leasefs(t, "host", "--reload", "--control", control); err != nil || !strings.Contains(out, "export mirror: lost; tried again") {
		t.Fatalf("reload: %v\n%s", err, out)
	}
	out, err := leasefs(t, "status", "--control", control)
	if err != nil || strings.Contains(out, "LOST") || !regexpMatch(`(?m)^mirror\s+\d+`, out) {
		t.Fatalf("after the reload:\n%s%v", out, err)
	}
	os.Remove(filepath.Join(mnt, "stray"))
}

// An agent out of descriptors cannot read the mount table: that is no
// reason to give its export up (CI once lost one to the hostile guest's
// descriptor exhaustion). It says so, and goes on serving.
func TestExportKeptWhileUnsure(t *testing.T) {
	testenv.RequireTool(t, "prlimit")
	mnt, dev := hostExport(t)
	run := t.TempDir()
	control := "unix:" + filepath.Join(run, "control.sock")
	a := newAgent(t, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--control", control,
		"--listen", "unix:"+filepath.Join(run, "guest.sock"), "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	pid := strconv.Itoa(a.Pid())
	out, err := exec.Command("prlimit", "--pid", pid, "--nofile", "--noheadings", "--output", "SOFT,HARD").Output()
	lim := strings.Fields(string(out))
	if err != nil || len(lim) != 2 {
		t.Fatalf("prlimit: %v %q", err, out)
	}
	// No descriptor below its limit is free: each open fails (EMFILE).
	free := 0
	for exists(fmt.Sprintf("/proc/%s/fd/%d", pid, free)) {
		free++
	}
	if out, err := exec.Command("prlimit", "--pid", pid, fmt.Sprintf("--nofile=%d:%s", free, lim[1])).CombinedOutput(); err != nil {
		t.Fatalf("prlimit: %v %s", err, out)
	}
	waitFor(t, "the agent saying it cannot check", func() bool { return strings.Contains(a.Log.String(), "cannot check an export's mount") })
	time.Sleep(1500 * time.Millisecond) // another check or two
	if out, err := exec.Command("prlimit", "--pid", pid, "--nofile="+lim[0]+":"+lim[1]).CombinedOutput(); err != nil {
		t.Fatalf("prlimit: %v %s", err, out)
	}
	if strings.Contains(a.Log.String(), "export lost") {
		t.Errorf("the export was given up:\n%s", a.Log)
	}
	if out, err := leasefs(t, "publish", "--control", control, "mirror"); err != nil {
		t.Errorf("publish after: %v\n%s", err, out)
	}
	if out, _ := leasefs(t, "status", "--control", control); strings.Contains(out, "LOST") {
		t.Errorf("status:\n%s", out)
	}
}

// The agent tells systemd what it does: READY=1 with a status line,
// RELOADING=1 then READY=1 around a reload, STOPPING=1 at the end. An
// upgrade in place keeps $NOTIFY_SOCKET for the next binary, which then
// takes the fd store and notifies in turn. Under the journal, each line
// carries its priority.
func TestSystemdNotificationsAndJournal(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	sd := newFakeSystemd(t)
	control := "unix:" + filepath.Join(run, "control.sock")
	a := &hostProc{t: t, mnt: mnt, Agent: &hosttest.Agent{}}
	stream, err := os.Create(filepath.Join(run, "journal-stream"))
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(stream.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	prog, argv, env, extra := sd.Start(leasefsBin, []string{"host", "--config", "", "--export", "mirror=" + dev + ":" + mnt,
		"--listen", "unix:" + filepath.Join(run, "guest.sock"), "--control", control, "--state-dir", filepath.Join(run, "state"),
		"--auto-publish", "off"}, false) // --fd-store: the flag, as the unit gives it
	// Its stderr is the stream, as under systemd.
	a.Prog, a.Args = "/bin/sh", append([]string{"-c", `f=$1; shift; exec 2>>"$f"; exec "$@"`, "sh", stream.Name(), prog}, argv...)
	a.Env, a.Extra = append(env, fmt.Sprintf("JOURNAL_STREAM=%d:%d", st.Dev, st.Ino)), extra
	a.start()
	t.Cleanup(func() {
		if a.Pid() != 0 {
			a.stop(syscall.SIGTERM)
		}
	})
	waitFor(t, "READY=1 with a status", func() bool { return strings.Contains(sd.Messages(), "READY=1\nSTATUS=serving mirror generation 1") })

	_ = a.Signal(syscall.SIGHUP)
	waitFor(t, "RELOADING=1 then READY=1", func() bool {
		m := sd.Messages()
		i := strings.Index(m, "RELOADING=1\nMONOTONIC_USEC=")
		return i >= 0 && strings.Contains(m[i:], "READY=1")
	})

	// An upgrade: the new binary must be able to notify (and so take
	// the fd store, which needs $NOTIFY_SOCKET).
	before := strings.Count(sd.Messages(), "READY=1")
	if out, err := leasefs(t, "host", "--upgrade", "--control", control); err != nil {
		t.Fatalf("upgrade: %v\n%s\n%s", err, out, a.Log)
	}
	waitFor(t, "READY=1 from the upgraded run", func() bool { return strings.Count(sd.Messages(), "READY=1") > before })

	a.stop(syscall.SIGTERM)
	if m := sd.Messages(); !strings.Contains(m, "STOPPING=1") {
		t.Errorf("no STOPPING=1:\n%s", m)
	}
	// Under the journal: priorities, no timestamps, start and stop lines.
	b, err := os.ReadFile(stream.Name())
	if err != nil {
		t.Fatal(err)
	}
	log := string(b) + a.Log.String()
	for _, want := range []string{"<6>leasefs-host: starting", "<6>leasefs-host: ready", "<6>leasefs-host: stopping", "<6>leasefs-host: stopped"} {
		if !strings.Contains(log, want) {
			t.Errorf("no %q in the journal's stream:\n%s", want, log)
		}
	}
	if regexpMatch(`(?m)^\d{4}-\d\d-\d\dT`, log) {
		t.Errorf("timestamps in the journal's stream:\n%s", log)
	}
}

// The guest's messages for what an operator gets wrong name the path and
// what to do; a second mount over a leasefs mount is refused; a detached
// mount says why its open files now fail.
func TestGuestMessages(t *testing.T) {
	h, _, dev := startHostCmd(t)
	missing := filepath.Join(t.TempDir(), "nowhere")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--connect", h.guest, "--export", "mirror", missing}, "mount point " + missing + " does not exist: create it first"},
		{[]string{"--connect", h.guest, "--export", "mirror", "--device", "/dev/no-such-disk", t.TempDir()}, "--device /dev/no-such-disk: no such file or directory"},
	} {
		if out, err := leasefs(t, append([]string{"guest"}, c.args...)...); err == nil || !strings.Contains(out, c.want) {
			t.Errorf("guest %v: %v\n%s\nwant %q", c.args, err, out, c.want)
		}
	}
	log := filepath.Join(t.TempDir(), "guest.log")
	g := guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev, "--log", log)
	if out, err := leasefs(t, "guest", "--connect", h.guest, "--export", "mirror", g); err == nil || !strings.Contains(out, "is already a leasefs mount") {
		t.Errorf("a second mount over the first: %v\n%s", err, out)
	}
	f, err := os.Open(filepath.Join(g, "hello"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if out, err := exec.Command("umount", "-l", g).CombinedOutput(); err != nil {
		t.Fatalf("umount -l: %v %s", err, out)
	}
	waitFor(t, "the guest's log saying the mount was detached", func() bool {
		b, _ := os.ReadFile(log)
		return strings.Contains(string(b), "the mount was detached")
	})
	if _, err := io.ReadAll(f); err == nil {
		t.Error("the detached mount's open file still reads")
	}
}

func regexpMatch(re, s string) bool { return regexp.MustCompile(re).MatchString(s) }
