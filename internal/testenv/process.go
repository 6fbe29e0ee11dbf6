package testenv

import (
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

// StderrOf is what a command that failed with err said on stderr, if
// it was run with Output.
func StderrOf(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return string(ee.Stderr)
	}
	return ""
}
