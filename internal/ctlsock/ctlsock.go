// Package ctlsock is the agents' local control sockets: one JSON request
// and one JSON reply per connection. The host agent's control socket and
// a guest mount's status socket speak it; who may connect (root and the
// agent's own user) is for the server to check.
package ctlsock

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/leasefs/leasefs/vsockproto"
)

// maxRequest bounds a request: they are a few words.
const maxRequest = 4096

// Answer reads one request on nc into req and writes what handle returns
// for it; handle is told if the request could not be read.
func Answer(nc net.Conn, timeout time.Duration, req any, handle func(bad error) any) {
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(timeout))
	var bad error
	if err := json.NewDecoder(io.LimitReader(nc, maxRequest)).Decode(req); err != nil {
		bad = fmt.Errorf("bad request: %w", err)
	}
	_ = json.NewEncoder(nc).Encode(handle(bad))
}

// Call sends req to the socket at addr and reads the reply, of at most
// limit bytes, into reply. A failure to connect is returned as it is, for
// the caller to say what runs there.
func Call(ctx context.Context, addr vsockproto.Addr, req, reply any, limit int64) error {
	nc, err := vsockproto.Dial(ctx, addr)
	if err != nil {
		return err
	}
	defer nc.Close()
	if d, ok := ctx.Deadline(); ok {
		_ = nc.SetDeadline(d)
	}
	if err := json.NewEncoder(nc).Encode(req); err != nil {
		return err
	}
	if err := json.NewDecoder(bufio.NewReader(io.LimitReader(nc, limit))).Decode(reply); err != nil {
		return fmt.Errorf("reading the reply: %w", err)
	}
	return nil
}
