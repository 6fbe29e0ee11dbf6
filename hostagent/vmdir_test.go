package hostagent

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
)

// VMs' listeners come from the descriptor budget, two descriptors each:
// with room for one, a second VM's socket is not served until the first
// VM goes.
func TestVMDirListenersAreBudgeted(t *testing.T) {
	s, err := NewServer(nil, ServerOptions{FDs: lease.NewFDsLimit(vmFDs + 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	dir := t.TempDir()
	vm := func(name string) net.Listener {
		l, err := net.Listen("unix", filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		return l
	}
	served := func(name string) bool { _, err := os.Lstat(filepath.Join(dir, name+"_5000")); return err == nil }
	until := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("after 10s: %s", what)
			}
		}
	}
	a := vm("a")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.ServeVMDir(ctx, dir, 5000, vsockproto.ListenOptions{}) }()
	defer func() { cancel(); <-done }()
	until("a served", func() bool { return served("a") })
	vm("b")
	time.Sleep(200 * time.Millisecond) // the event is in; b must stay unserved
	if served("b") {
		t.Fatal("a VM beyond the descriptor budget is served")
	}
	if used := s.fds.Used(); used != vmFDs {
		t.Fatalf("%d descriptors of the budget used, want %d", used, vmFDs)
	}
	a.Close() // a goes: b takes its place
	until("b served once a went", func() bool { return served("b") && !served("a") })
	if used := s.fds.Used(); used != vmFDs {
		t.Fatalf("%d descriptors of the budget used, want %d", used, vmFDs)
	}
}
