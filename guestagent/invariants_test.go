package guestagent

import (
	"strings"
	"testing"

	"github.com/leasefs/leasefs/ext4ro"
)

// TestSwitcherInvariantsCatchBrokenStates: each broken state the
// invariants name is found, and a sound one passes. (make test runs the
// package with the invariants tag, which checks them after every change
// to the switching state, in every test.)
func TestSwitcherInvariantsCatchBrokenStates(t *testing.T) {
	sound := func() *Client {
		c := &Client{}
		old, cur := &genView{c: c, gen: 4}, &genView{c: c, gen: 5}
		c.sw.cur, c.sw.latest = cur, 5
		c.fs = &FileSystem{views: newRecentViews(servedView{tag: 4, fs: new(ext4ro.FS), gen: old})}
		c.fs.views.serve(servedView{tag: 5, fs: new(ext4ro.FS), gen: cur})
		return c
	}
	if err := sound().switcherInvariants(); err != nil {
		t.Fatalf("a sound state: %v", err)
	}
	for _, c := range []struct {
		name, want string
		breakIt    func(*Client)
	}{
		{"newer than announced", "newer than the newest announced", func(c *Client) { c.sw.latest = 4 }},
		{"pending once current", "changes still pending", func(c *Client) { c.sw.pending.all = true }},
		{"pinned elsewhere", "pinned to generation 4", func(c *Client) { c.sw.pinned = 4 }},
		{"kernel served another reader", "not generation 5's", func(c *Client) { c.fs.views.serve(c.fs.views.all()[1]) }},
		{"recent view mistagged", "tagged 3", func(c *Client) { c.fs.views.all()[1].tag = 3 }},
	} {
		cl := sound()
		c.breakIt(cl)
		err := cl.switcherInvariants()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
	// Mid-switch, the kernel is served the view the switch moves to.
	c := sound()
	next := &genView{c: c, gen: 6}
	c.sw.latest, c.sw.pending.all, c.sw.moving = 6, true, next
	c.fs.views.serve(servedView{tag: 6, fs: new(ext4ro.FS), gen: next})
	if err := c.switcherInvariants(); err != nil {
		t.Errorf("mid-switch: %v", err)
	}
	// A view the host no longer has may be newer than what it announces
	// (a restarted host numbers afresh): not broken while the switch to
	// come is pending.
	c = sound()
	c.sw.cur.dead.Store(true)
	c.sw.latest, c.sw.pending.all = 2, true
	if err := c.switcherInvariants(); err != nil {
		t.Errorf("a dead view awaiting its switch: %v", err)
	}
}
