package guestagent

import (
	"context"
	"fmt"
	"strings"

	"github.com/leasefs/leasefs/vsockproto"
)

// A NotKeptError is a pin (ClientConfig.Pin, PinLabel) to a generation
// the host does not keep.
type NotKeptError struct {
	Export, Want, Kept string // the generation asked for, and those kept, as said to a person
}

func (e *NotKeptError) Error() string {
	return fmt.Sprintf("export %s: the host does not keep %s; it keeps %s", e.Export, e.Want, e.Kept)
}

// pinnedFrom is the generation (and its label) the first Welcome pinned
// for ClientConfig.Pin or PinLabel, or an error that says what the host
// keeps instead.
func (c *Client) pinnedFrom(w *vsockproto.Welcome) (uint64, string, error) {
	want := fmt.Sprintf("generation %d", c.cfg.Pin)
	if c.cfg.Pin == 0 {
		want = fmt.Sprintf("a generation labelled %q", c.cfg.PinLabel)
	}
	c.mu.Lock()
	conn := c.sess.conn
	c.mu.Unlock()
	if conn == nil || !conn.Features().Has(vsockproto.FeaturePin) || !conn.Features().Has(vsockproto.FeatureKept) {
		return 0, "", fmt.Errorf("export %s: cannot pin %s: the host agent is too old to keep generations for guests", c.cfg.Export, want)
	}
	list, err := c.kept(conn)
	if err != nil {
		return 0, "", fmt.Errorf("export %s: listing the generations the host keeps: %w", c.cfg.Export, err)
	}
	if w.Pinned == 0 {
		return 0, "", &NotKeptError{c.cfg.Export, want, describeKept(list)}
	}
	label := ""
	for _, g := range list {
		if g.Number == w.Pinned {
			label = g.Label
		}
	}
	c.mu.Lock()
	c.sw.pinned = w.Pinned
	c.mu.Unlock()
	c.log.Info("pinned", "generation", w.Pinned, "label", label, "current", w.Generation)
	return w.Pinned, label, nil
}

// kept asks the host which generations it keeps.
func (c *Client) kept(conn *vsockproto.Conn) ([]vsockproto.KeptGeneration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), callDeadline)
	defer cancel()
	reply, err := conn.Call(ctx, &vsockproto.ListGens{})
	if err != nil {
		return nil, err
	}
	return reply.(*vsockproto.Generations).List, nil
}

// describeKept says which generations list holds: "3, 5 (r42), 6".
func describeKept(list []vsockproto.KeptGeneration) string {
	if len(list) == 0 {
		return "none"
	}
	var b strings.Builder
	for i, g := range list {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%d", g.Number)
		if g.Label != "" {
			fmt.Fprintf(&b, " (%s)", g.Label)
		}
	}
	return b.String()
}

// unpin: the host is about to drop the generation the mount is pinned
// to. The mount moves on to the newest, and says so.
func (c *Client) unpin(m *vsockproto.Unpin) {
	c.mu.Lock()
	was := c.sw.pinned
	if was == m.Generation {
		c.sw.pinned, c.sw.force = 0, true
	}
	c.mu.Unlock()
	if was != m.Generation {
		return
	}
	c.log.Error("the host drops the generation this mount is pinned to; moving to its newest", "generation", was, "why", m.Why)
	c.noteError(fmt.Errorf("unpinned from generation %d: %s", was, m.Why))
	c.wake()
}
