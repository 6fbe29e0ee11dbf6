package agent

import (
	"context"
	"time"

	"github.com/leasefs/leasefs/hostagent/upgrade"
	"github.com/leasefs/leasefs/vsockproto"
)

// Upgrade checks the binary at the agent's path (upgrade.Check) and
// returns what execs it in place (hostagent.ServerOptions.Upgrade,
// SIGUSR2). The exec hands everything over; if it fails, the agent goes
// on as it was.
func (a *Agent) Upgrade() (func(), error) {
	v, err := upgrade.Check(a.opt.Binary, a.opt.Args)
	if err != nil {
		return nil, err
	}
	a.log.Info("upgrading in place", "binary", a.opt.Binary, "to", v)
	return func() {
		// Control requests being answered are answered first; those
		// that come meanwhile wait in the socket for the successor.
		drained, reopen := a.srv.Quiesce(controlDrain)
		defer reopen() // if the exec does not happen
		if !drained {
			a.log.Warn("control requests still unanswered; upgrading anyway (their clients see the connection end)", "waited", controlDrain)
		}
		// systemd sees a reload until the new run says it is ready.
		a.notify(Reloading, "upgrading in place to "+v)
		a.mu.Lock()
		defer a.mu.Unlock()
		if err := a.execSuccessor(); err != nil {
			a.log.Error("the upgrade failed; this agent goes on", "error", err)
			a.notify(Ready, a.srv.Status().Summary())
		}
	}, nil
}

// controlDrain bounds how long an upgrade waits for the control
// requests being answered (a publish of a large export takes seconds).
const controlDrain = 30 * time.Second

// execSuccessor hands everything over and execs the binary; it returns
// only if that failed, having taken everything back. a.mu held.
func (a *Agent) execSuccessor() error {
	h := upgrade.Handing{From: a.opt.Version, Server: a.srv, StateLock: a.lock, Control: a.ctl,
		Listeners: map[string]*vsockproto.Listener{}, Log: a.log, Signals: a.opt.Signals}
	for name, r := range a.exports {
		if r.auto != nil {
			// Publishing on its own stops across the exec.
			r.auto.stop()
			defer func() { // Exec returned: publishing goes on
				r.auto = a.start(func(ctx context.Context) error { return a.srv.AutoPublish(ctx, name) })
			}()
		}
		h.Reap = append(h.Reap, r.wd.Pid())
	}
	for key, r := range a.listens {
		if r.l != nil { // a VM directory's: the successor binds its sockets again
			h.Listeners[key] = r.l
		}
	}
	return upgrade.Exec(a.opt.Binary, a.opt.Argv, h)
}
