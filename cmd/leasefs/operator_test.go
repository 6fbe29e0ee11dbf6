package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
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
	pid := fmt.Sprintf("pid %d", h.cmd.Process.Pid)
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
		{"one export twice", func() ([]string, string) {
			a, s := fresh()
			return append(a, "--export", "other="+otherDev+":"+otherMnt, "--export", "other="+dev+":"+mnt), s
		}, []string{"the name other is given twice"}},
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
		if err := h.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(5 * time.Second); !strings.Contains(h.log.String(), "SIGHUP"); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("no word of the SIGHUP:\n%s", h.log)
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
	if n := strings.Count(h.log.String(), "replaced a stale socket"); n != 2 {
		t.Errorf("%d stale sockets reported, want 2:\n%s", n, h.log)
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
