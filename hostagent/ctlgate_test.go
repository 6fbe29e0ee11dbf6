package hostagent

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/leasefs/leasefs/vsockproto"
)

// While the gate is closed, a control request waits in the socket and
// is answered once it opens again; Quiesce waits for a request being
// answered, and says so if it is not answered in time.
func TestQuiesceHoldsControlRequests(t *testing.T) {
	s, err := NewServer(nil, ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	addr, _ := vsockproto.ParseAddr("unix:" + filepath.Join(t.TempDir(), "control.sock"))
	l, err := vsockproto.Listen(addr, vsockproto.ListenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- s.ServeControl(ctx, l) }()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("ServeControl: %v", err)
		}
	}()
	status := func() <-chan error {
		done := make(chan error, 1)
		go func() {
			_, _, err := Control(context.Background(), addr, ControlRequest{Op: "status"})
			done <- err
		}()
		return done
	}
	if err := <-status(); err != nil {
		t.Fatal(err)
	}

	drained, reopen := s.Quiesce(5 * time.Second)
	if !drained {
		t.Fatal("nothing was being answered, yet Quiesce did not drain")
	}
	held := status()
	select {
	case err := <-held:
		t.Fatalf("a request was answered while the gate was closed (%v)", err)
	case <-time.After(300 * time.Millisecond):
	}
	reopen()
	reopen() // once only
	select {
	case err := <-held:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the held request was not answered once the gate opened")
	}

	// A request being answered is waited for, within the bound.
	s.gate.enter()
	start := time.Now()
	drained, reopen = s.Quiesce(200 * time.Millisecond)
	if drained || time.Since(start) < 200*time.Millisecond {
		t.Fatalf("Quiesce with a request unanswered: drained %v after %v", drained, time.Since(start))
	}
	reopen()
	go func() { time.Sleep(100 * time.Millisecond); s.gate.leave() }()
	drained, reopen = s.Quiesce(5 * time.Second)
	reopen()
	if !drained {
		t.Fatal("Quiesce did not see the request answered")
	}
	if err := <-status(); err != nil {
		t.Fatal(err)
	}
}
