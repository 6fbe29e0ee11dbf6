package testenv

import (
	"bufio"
	"os/exec"
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
