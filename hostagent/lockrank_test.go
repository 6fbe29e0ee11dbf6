//go:build lockrank

package hostagent

import (
	"strings"
	"testing"
	"time"

	"github.com/leasefs/leasefs/lease"
)

// The lock-order inversion Server.retain had (served.mu held while it
// asked the coordinator about a session, while a handover takes
// Coordinator.mu and then served.mu) is caught the first time the path
// runs, without the deadlock it needed two goroutines to show.
func TestLockRankCatchesTheRetainInversion(t *testing.T) {
	_, e, _ := publishedFile(t)
	s, _ := serve(t, e, ServerOptions{Lease: lease.Config{AckTimeout: time.Second}})
	sv := s.export("test")
	defer func() {
		msg, _ := recover().(string)
		if !strings.Contains(msg, "Coordinator.mu (rank 20) taken while holding served.mu (rank 30)") {
			t.Fatalf("got %q, want the inversion reported", msg)
		}
		sv.mu.Unlock()
	}()
	sv.mu.Lock()
	sv.coord.HasSession(lease.Token{})
	t.Fatal("the inversion went unnoticed")
}
