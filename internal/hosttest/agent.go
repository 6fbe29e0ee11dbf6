package hosttest

import (
	"bufio"
	"cmp"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/testenv"
)

// An Agent is a host agent process a test starts, stops and starts
// again, as a supervisor would: Prog with Args, ready once it prints
// "ready" on stdout; its stderr is Log. Set the fields, then Start.
// (Each start prints "ready"; an upgraded agent prints it again, and
// the line is read on, so it never blocks writing.)
type Agent struct {
	Prog  string     // the program
	Args  []string   // its arguments
	Env   []string   // added to the environment of the next start, if set
	Extra []*os.File // descriptors 3… of the next start, if set: closed by it
	// Ready bounds the wait for "ready" (20 s), and StopWait that for
	// an exit after a signal (10 s), after which the agent is killed
	// and the test fails.
	Ready, StopWait time.Duration
	Log             *testenv.SyncBuffer // set by Start if nil

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan error
}

// Start runs the agent and waits until it is ready; t fails if it exits
// before, or takes longer than Ready (then it is killed).
func (a *Agent) Start(t testing.TB) {
	t.Helper()
	if a.Log == nil {
		a.Log = &testenv.SyncBuffer{}
	}
	cmd := exec.Command(a.Prog, a.Args...)
	cmd.Stderr = a.Log
	if a.Env != nil {
		cmd.Env = append(os.Environ(), a.Env...)
	}
	cmd.ExtraFiles = a.Extra
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	err = cmd.Start()
	for _, f := range a.Extra { // the agent's now; ours would keep what they are busy
		f.Close()
	}
	a.Extra = nil
	if err != nil {
		t.Fatal(err)
	}
	exited, ready := make(chan error, 1), make(chan struct{})
	go func() {
		sc := bufio.NewScanner(out)
		said := false
		for sc.Scan() {
			if sc.Text() == "ready" && !said {
				close(ready)
				said = true
			}
		}
		exited <- cmd.Wait()
	}()
	a.mu.Lock()
	a.cmd, a.exited = cmd, exited
	a.mu.Unlock()
	select {
	case <-ready:
	case err := <-exited:
		exited <- err // for Stop
		t.Fatalf("%s exited before it was ready: %v\n%s", a.Prog, err, a.Log)
	case <-time.After(cmp.Or(a.Ready, 20*time.Second)):
		_ = cmd.Process.Kill() // not left running by a caller with no Stop at its end
		t.Fatalf("%s not ready after %v:\n%s", a.Prog, cmp.Or(a.Ready, 20*time.Second), a.Log)
	}
}

// Pid is the running agent's process id (0: not running).
func (a *Agent) Pid() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return 0
	}
	return a.cmd.Process.Pid
}

// Signal sends the running agent sig.
func (a *Agent) Signal(sig syscall.Signal) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return os.ErrProcessDone
	}
	return a.cmd.Process.Signal(sig)
}

// Stop sends the agent sig and returns how it exited; if it does not
// within StopWait it is killed and t fails. An agent not running is
// left alone (nil).
func (a *Agent) Stop(t testing.TB, sig syscall.Signal) error {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return nil
	}
	defer func() { a.cmd = nil }()
	_ = a.cmd.Process.Signal(sig)
	wait := cmp.Or(a.StopWait, 10*time.Second)
	select {
	case err := <-a.exited:
		return err
	case <-time.After(wait):
		t.Errorf("%s did not exit on %v within %v; killing it\n%s", a.Prog, sig, wait, a.Log)
		_ = a.cmd.Process.Kill()
		return <-a.exited
	}
}

// StopAtEnd stops the agent with SIGTERM when t ends, and fails t if it
// does not exit cleanly. Cleanups registered before run after it.
func (a *Agent) StopAtEnd(t testing.TB) {
	t.Cleanup(func() {
		if err := a.Stop(t, syscall.SIGTERM); err != nil {
			t.Errorf("%s on SIGTERM: %v\n%s", a.Prog, err, a.Log)
		}
	})
}

// Exited says whether the agent started last has exited (on its own:
// Stop forgets it).
func (a *Agent) Exited() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return false
	}
	select {
	case err := <-a.exited:
		a.exited <- err // for Stop
		return true
	default:
		return false
	}
}
