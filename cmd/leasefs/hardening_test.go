package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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
			t.Fatalf("metrics: %v\n%s\nagent:\n%s", err, out, h.log)
		}
		if out, err := leasefs(t, "status", "--control", h.control); err != nil {
			t.Fatalf("status: %v\n%s", err, out)
		}
	}
	if h.cmd.ProcessState != nil {
		t.Fatalf("the agent exited:\n%s", h.log)
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
