package hostagent

import (
	"context"
	"sync"
	"time"

	"github.com/leasefs/leasefs/internal/lockrank"
	"github.com/leasefs/leasefs/vsockproto"
)

// ctlGate lets an upgrade exec with no control request half answered:
// it counts the requests being answered, and while it is closed the
// control socket's accept loop stops taking connections. Those wait in
// the socket's backlog, and the socket goes to the successor with them.
type ctlGate struct {
	mu      lockrank.Mutex[lockrank.CtlGate]
	changed sync.Cond // on mu
	l       *vsockproto.Listener
	busy    int  // requests being answered
	closed  int  // Quiesce calls not yet resumed
	parked  bool // the accept loop waits for the gate to open
}

func (g *ctlGate) init() { g.changed.L = &g.mu }

// serve records l as the listener the accept loop takes from.
func (g *ctlGate) serve(l *vsockproto.Listener) {
	g.mu.Lock()
	g.l = l
	g.mu.Unlock()
}

// enter and leave bracket the answering of one request.
func (g *ctlGate) enter() {
	g.mu.Lock()
	g.busy++
	g.mu.Unlock()
}

func (g *ctlGate) leave() {
	g.mu.Lock()
	g.busy--
	g.changed.Broadcast()
	g.mu.Unlock()
}

// wait holds the accept loop while the gate is closed; false if ctx
// ended meanwhile.
func (g *ctlGate) wait(ctx context.Context) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed == 0 {
		return true
	}
	stop := context.AfterFunc(ctx, func() {
		g.mu.Lock()
		g.changed.Broadcast()
		g.mu.Unlock()
	})
	defer stop()
	g.parked = true
	g.changed.Broadcast()
	for g.closed > 0 && ctx.Err() == nil {
		g.changed.Wait()
	}
	g.parked = false
	return ctx.Err() == nil
}

// Quiesce stops taking control connections and waits, at most for
// within, until the requests being answered are answered. It reports
// whether they were; reopen takes connections again (for an upgrade
// that did not happen).
func (s *Server) Quiesce(within time.Duration) (drained bool, reopen func()) {
	g := &s.gate
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closed++
	if g.l != nil {
		_ = g.l.SetDeadline(time.Unix(1, 0)) // an Accept under way returns
	}
	timer := time.AfterFunc(within, func() {
		g.mu.Lock()
		g.changed.Broadcast()
		g.mu.Unlock()
	})
	defer timer.Stop()
	deadline := time.Now().Add(within)
	for (g.l != nil && !g.parked || g.busy > 0) && time.Now().Before(deadline) {
		g.changed.Wait()
	}
	drained = (g.l == nil || g.parked) && g.busy == 0
	var once sync.Once
	return drained, func() {
		once.Do(func() {
			g.mu.Lock()
			defer g.mu.Unlock()
			g.closed--
			if g.closed == 0 && g.l != nil {
				_ = g.l.SetDeadline(time.Time{})
			}
			g.changed.Broadcast()
		})
	}
}
