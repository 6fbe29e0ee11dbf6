package guestagent

import (
	"context"
	"errors"
)

// An application's request that waits for the host — an open that needs
// a lease, a read while the host is down — ends when the application is
// interrupted: the kernel tells the FUSE server (INTERRUPT), which closes
// the request's cancel channel, and the wait answers EINTR. Without it a
// process reading a file while the host is down could not even be killed
// (--down hard): the kernel waits out a request the server already has.
// A cancel channel that is nil is never closed.

// errInterrupted: the application's request was interrupted while it
// waited for the host.
var errInterrupted = errors.New("interrupted while waiting for the host")

// interrupted reports whether cancel is closed.
func interrupted(cancel <-chan struct{}) bool {
	select {
	case <-cancel:
		return true
	default:
		return false
	}
}

// wakeOn wakes the waiters on c.changed when cancel closes, until stop.
// Called with or without c.mu held.
func (c *Client) wakeOn(cancel <-chan struct{}) (stop func()) {
	if cancel == nil {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		select {
		case <-cancel:
			c.mu.Lock()
			c.changed.Broadcast()
			c.mu.Unlock()
		case <-done:
		}
	}()
	return func() { close(done) }
}

// withInterrupt is ctx, also ended when cancel closes.
func withInterrupt(ctx context.Context, cancel <-chan struct{}) (context.Context, context.CancelFunc) {
	ctx, end := context.WithCancel(ctx)
	if cancel != nil {
		go func() {
			select {
			case <-cancel:
				end()
			case <-ctx.Done():
			}
		}()
	}
	return ctx, end
}
