// Package vsockproto is the wire protocol between a leasefs guest and
// its host: message types, framing, the handshake, a connection that
// carries many requests at once in both directions, and the transports
// (AF_VSOCK, hybrid vsock over a Unix socket, plain Unix sockets).
// docs/protocol.md is the specification; this package follows it and
// knows nothing of ext4, leases or FUSE.
//
// # Messages
//
// Each message is a Go type implementing Message. Decode checks a payload
// completely — every count against the bytes that are left before
// anything is allocated, every range, no trailing bytes — so a peer can
// make us allocate at most the frame limit. Errors are *Error values
// carrying a protocol code; errors.Is matches them against ErrStale,
// ErrBusy and the other sentinels.
//
// # Connections
//
// Client and Server run the handshake and return a *Conn. Conn.Call sends
// a request and waits for its reply; replies may come in any order. The
// peer's requests go to a Handler, each in its own goroutine, at most
// Options.MaxInFlight at once (more are answered with a quota error, so
// that the reader never stalls and replies keep flowing). Ping is
// answered by the Conn itself, and sent after Options.KeepAlive without
// traffic.
//
// A connection ends on the first protocol violation, on a read that
// stalls (no frame for three keepalive intervals, or a payload that does
// not follow its header in time) and on a write that does not complete
// in Options.WriteTimeout — so a peer that stops reading cannot hold a
// writer, and the goroutines serving other peers never wait on it.
//
// # Lock order
//
// Conn.wmu (frame writes), then Conn.mu: a write holding wmu takes mu
// briefly to see whether the connection has failed, so that nothing
// follows the frame saying why it ended. fail takes mu, sets the error
// and releases it, and only then takes wmu to say goodbye; a failed
// write releases wmu before it calls fail.
//
// # Transports
//
// ParseAddr is the one place addresses are parsed; Listen and Dial take
// the result. Listener.Accept names the peer from the transport: its CID,
// the configured VM of a hybrid socket, or SO_PEERCRED.
package vsockproto
