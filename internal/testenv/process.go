package testenv

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// StartReady starts cmd, its stderr going to log, and waits up to within
// for it to print the line "ready" on stdout; it fails t if cmd exits
// before or takes longer. When t ends, cmd is sent SIGTERM and must
// exit cleanly within stop (else it is killed, and t fails). Cleanups
// registered before StartReady run after that.
func StartReady(t testing.TB, cmd *exec.Cmd, log *SyncBuffer, within, stop time.Duration) {
	t.Helper()
	cmd.Stderr = log
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if sc.Text() == "ready" {
				close(ready)
				break
			}
		}
		for sc.Scan() { // the rest, so that cmd never blocks writing it
		}
		exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("%s: %v\n%s", cmd.Path, err, log)
			}
		case <-time.After(stop):
			t.Errorf("%s did not stop on SIGTERM within %v; killing it\n%s", cmd.Path, stop, log)
			_ = cmd.Process.Kill()
		}
	})
	select {
	case <-ready:
	case err := <-exited:
		exited <- err // for the cleanup
		t.Fatalf("%s exited before it was ready: %v\n%s", cmd.Path, err, log)
	case <-time.After(within):
		t.Fatalf("%s not ready after %v:\n%s", cmd.Path, within, log)
	}
}

// Stop stops process pid with SIGSTOP and returns once every one of its
// threads has stopped: kill(2) returns before they have, and on a busy
// machine (or a VM's vCPU the host does not run) a thread can go on for
// a while, long enough to answer what a test sends it next. When t ends
// the process is continued, if t has not done so.
func Stop(t testing.TB, pid int) {
	t.Helper()
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGCONT) })
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); !allStopped(pid); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			running := runningThreads(pid)
			// Continued at once: what the test defers (a close of a
			// file it serves) would otherwise wait for it for ever.
			_ = syscall.Kill(pid, syscall.SIGCONT)
			t.Fatalf("process %d has threads still running 10s after SIGSTOP: %s", pid, running)
		}
	}
}

// runningThreads describes pid's threads that are not stopped: their
// state and the kernel function they wait in.
func runningThreads(pid int) string {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, _ := os.ReadDir(dir)
	var out []string
	for _, task := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, task.Name(), "stat"))
		i := bytes.LastIndexByte(b, ')')
		if err != nil || i < 0 || i+2 >= len(b) || b[i+2] == 'T' {
			continue
		}
		wchan, _ := os.ReadFile(filepath.Join(dir, task.Name(), "wchan"))
		stack, _ := os.ReadFile(filepath.Join(dir, task.Name(), "stack"))
		out = append(out, fmt.Sprintf("thread %s state %c in %s %q", task.Name(), b[i+2], wchan, bytes.TrimSpace(stack)))
	}
	return strings.Join(out, "; ")
}

// allStopped reports whether every thread of pid is in state T (stopped).
func allStopped(pid int) bool {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil || len(tasks) == 0 {
		return false
	}
	for _, task := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, task.Name(), "stat"))
		if err != nil {
			return false
		}
		// pid (comm) state ...: comm may hold spaces and parentheses.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 || i+2 >= len(b) || b[i+2] != 'T' {
			return false
		}
	}
	return true
}
