package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
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
