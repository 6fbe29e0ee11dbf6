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
		c := &Client{views: map[*ext4ro.FS]*genView{}}
		old, cur := &genView{c: c, gen: 4}, &genView{c: c, gen: 5}
		fOld, fCur := new(ext4ro.FS), new(ext4ro.FS)
		c.views[fOld], c.views[fCur] = old, cur
		c.cur, c.latest = cur, 5
		c.fs = &FileSystem{}
		c.fs.view.Store(fCur)
		c.fs.recent.Store(&[]taggedView{{5, fCur}, {4, fOld}})
		return c
	}
	if err := sound().switcherInvariants(); err != nil {
		t.Fatalf("a sound state: %v", err)
	}
	for _, c := range []struct {
		name, want string
		breakIt    func(*Client)
	}{
		{"newer than announced", "newer than the newest announced", func(c *Client) { c.latest = 4 }},
		{"pending once current", "changes still pending", func(c *Client) { c.pending.all = true }},
		{"pinned elsewhere", "pinned to generation 4", func(c *Client) { c.pinned = 4 }},
		{"kernel served another reader", "not generation 5's", func(c *Client) { c.fs.view.Store((*c.fs.recent.Load())[1].v) }},
		{"recent view mistagged", "tagged 3", func(c *Client) { (*c.fs.recent.Load())[1].tag = 3 }},
	} {
		cl := sound()
		c.breakIt(cl)
		err := cl.switcherInvariants()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
	// A view the host no longer has may be newer than what it announces
	// (a restarted host numbers afresh): not broken while the switch to
	// come is pending.
	c := sound()
	c.cur.dead.Store(true)
	c.latest, c.pending.all = 2, true
	if err := c.switcherInvariants(); err != nil {
		t.Errorf("a dead view awaiting its switch: %v", err)
	}
}
