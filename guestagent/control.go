package guestagent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/leasefs/leasefs/internal/ctlsock"
	"github.com/leasefs/leasefs/vsockproto"
)

// The status socket of a mount speaks one JSON request and one JSON
// reply per connection: {"op":"status"}. Only root and the agent's own
// user may use it.

type controlRequest struct {
	Op string `json:"op"`
}

type controlReply struct {
	Error  string  `json:"error,omitempty"`
	Status *Status `json:"status,omitempty"`
}

// ServeStatus answers status requests on l until ctx ends.
func (c *Client) ServeStatus(ctx context.Context, l *vsockproto.Listener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		nc, peer, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		if peer.UID != 0 && int(peer.UID) != os.Geteuid() {
			nc.Close()
			continue
		}
		go c.answer(nc)
	}
}

func (c *Client) answer(nc net.Conn) {
	var req controlRequest
	ctlsock.Answer(nc, 10*time.Second, &req, func(bad error) any {
		switch {
		case bad != nil:
			return controlReply{Error: bad.Error()}
		case req.Op == "status":
			return controlReply{Status: c.Status()}
		}
		return controlReply{Error: fmt.Sprintf("unknown op %q", req.Op)}
	})
}

// GetStatus asks the guest agent serving the status socket at addr.
func GetStatus(ctx context.Context, addr vsockproto.Addr) (*Status, error) {
	var reply controlReply
	if err := ctlsock.Call(ctx, addr, controlRequest{Op: "status"}, &reply, 1<<20); err != nil {
		return nil, fmt.Errorf("the guest agent's status socket %s: %w (is the mount served by 'leasefs guest', and are you root?)", addr, err)
	}
	if reply.Error != "" {
		return nil, errors.New(reply.Error)
	}
	return reply.Status, nil
}
