package guestagent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

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
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
	var req controlRequest
	var reply controlReply
	if err := json.NewDecoder(io.LimitReader(nc, 4096)).Decode(&req); err != nil {
		reply.Error = "bad request: " + err.Error()
	} else if req.Op == "status" {
		reply.Status = c.Status()
	} else {
		reply.Error = fmt.Sprintf("unknown op %q", req.Op)
	}
	_ = json.NewEncoder(nc).Encode(reply)
}

// GetStatus asks the guest agent serving the status socket at addr.
func GetStatus(ctx context.Context, addr vsockproto.Addr) (*Status, error) {
	nc, err := vsockproto.Dial(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("the guest agent's status socket %s: %w (is the mount served by 'leasefs guest', and are you root?)", addr, err)
	}
	defer nc.Close()
	if d, ok := ctx.Deadline(); ok {
		_ = nc.SetDeadline(d)
	}
	if err := json.NewEncoder(nc).Encode(controlRequest{Op: "status"}); err != nil {
		return nil, err
	}
	var reply controlReply
	if err := json.NewDecoder(bufio.NewReader(io.LimitReader(nc, 1<<20))).Decode(&reply); err != nil {
		return nil, fmt.Errorf("reading the guest agent's reply: %w", err)
	}
	if reply.Error != "" {
		return nil, errors.New(reply.Error)
	}
	return reply.Status, nil
}
