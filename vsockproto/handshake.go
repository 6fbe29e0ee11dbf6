package vsockproto

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"
)

// Client runs the guest's side of the handshake on nc and returns the
// connection. hello's Version and MaxFrame are filled in from this
// package and opt. If the host answers with an Error, that is the error.
// nc is closed on failure.
func Client(ctx context.Context, nc net.Conn, hello Hello, h Handler, opt Options) (*Conn, *Welcome, error) {
	opt = opt.withDefaults()
	hello.Version = Version
	hello.MaxFrame = opt.MaxFrame
	if hello.Export == "" || len(hello.Export) > MaxExportName {
		nc.Close()
		return nil, nil, fmt.Errorf("vsockproto: export name must be 1 to %d bytes", MaxExportName)
	}
	sent := time.Now()
	m, err := exchange(ctx, nc, opt, func() error {
		_, err := nc.Write(AppendFrame(nil, 1, &hello))
		return err
	}, func(h Header) error {
		if h.ID != 1 || (h.Type != TypeWelcome && h.Type != TypeError) {
			return Errorf(CodeProtocol, "expected Welcome to request 1, got %v id %d", h.Type, h.ID)
		}
		return nil
	})
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	w := m.(*Welcome)
	if w.Version > Version {
		nc.Close()
		return nil, nil, Errorf(CodeVersion, "host answered version %d to our %d", w.Version, Version)
	}
	c := newConn(nc, opt, w.MaxFrame, w.Features&hello.Features, h)
	c.confirmed.Store(sent.UnixNano()) // the host had the session when it answered the Hello
	return c, w, nil
}

// Accept decides on a guest's Hello: it returns the Welcome (whose
// Version, MaxFrame and Features this package completes) and the handler
// for the guest's requests, or an error, which is sent to the guest
// (an *Error as it is, anything else as internal).
type Accept func(*Hello) (*Welcome, Handler, error)

// Server runs the host's side of the handshake on nc. The features in the
// Welcome are those accept offers that the guest asked for. nc is closed
// on failure.
func Server(ctx context.Context, nc net.Conn, accept Accept, opt Options) (*Conn, *Hello, error) {
	opt = opt.withDefaults()
	m, err := exchange(ctx, nc, opt, nil, func(h Header) error {
		if h.ID != 1 || h.Type != TypeHello {
			return Errorf(CodeProtocol, "expected Hello with request id 1, got %v id %d", h.Type, h.ID)
		}
		return nil
	})
	if err != nil {
		var pe *Error
		if errors.As(err, &pe) {
			_ = nc.SetWriteDeadline(time.Now().Add(time.Second))
			_, _ = nc.Write(AppendFrame(nil, 0, pe))
		}
		nc.Close()
		return nil, nil, err
	}
	hello := m.(*Hello)
	w, h, err := accept(hello)
	if err != nil {
		var e *Error
		if !errors.As(err, &e) {
			e = &Error{Code: CodeInternal, Message: err.Error()}
		}
		_ = nc.SetWriteDeadline(time.Now().Add(opt.WriteTimeout))
		_, _ = nc.Write(AppendFrame(nil, 1, e))
		nc.Close()
		return nil, hello, err
	}
	w.Version = min(hello.Version, Version)
	w.MaxFrame = opt.MaxFrame
	w.Features &= hello.Features
	_ = nc.SetWriteDeadline(time.Now().Add(opt.WriteTimeout))
	if _, err := nc.Write(AppendFrame(nil, 1, w)); err != nil {
		nc.Close()
		return nil, hello, fmt.Errorf("vsockproto: sending Welcome: %w", err)
	}
	return newConn(nc, opt, hello.MaxFrame, w.Features, h), hello, nil
}

// exchange optionally writes, then reads one handshake frame, all within
// the handshake timeout (and ctx).
func exchange(ctx context.Context, nc net.Conn, opt Options, write func() error, check func(Header) error) (Message, error) {
	deadline := time.Now().Add(opt.HandshakeTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := nc.SetDeadline(deadline); err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if write != nil {
		if err := write(); err != nil {
			return nil, fmt.Errorf("vsockproto: handshake: %w", err)
		}
	}
	h, p, err := ReadFrame(nc, HandshakeFrame)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("vsockproto: handshake: %w", err)
	}
	if err := check(h); err != nil {
		return nil, err
	}
	m, err := Decode(h.Type, p)
	if err != nil {
		return nil, err
	}
	if e, ok := m.(*Error); ok {
		return nil, e
	}
	return m, nil
}
