package guestagent

import (
	"errors"
	"fmt"
)

// switcherInvariants checks the switching state against itself, c.mu
// held. Built with the invariants tag (make test runs the package so),
// it runs after every change to that state (checkSwitcher) and a
// failure panics where it is found.
//
//   - The generation served is never newer than the newest announced,
//     unless the host no longer has it (dead: a restarted host may
//     number afresh).
//   - Once the served generation is the newest announced, nothing is
//     pending for a switch.
//   - A mount pinned to a generation serves it.
//   - The kernel is served the reader of the generation served (the
//     newest of the one registry of recent views, views.go, is cur's,
//     or the one a switch is moving to),
//     and each recent view's tag is its generation's number (but a
//     static view's, tagged 0).
func (c *Client) switcherInvariants() error {
	cur := c.sw.cur
	if cur == nil {
		return nil // not started
	}
	var errs []error
	live := !cur.dead.Load()
	if live && cur.gen > c.sw.latest {
		errs = append(errs, fmt.Errorf("serves generation %d, newer than the newest announced %d", cur.gen, c.sw.latest))
	}
	if p := c.sw.pending; live && cur.gen == c.sw.latest && (p.all || len(p.blocks) > 0 || len(p.inodes) > 0) {
		errs = append(errs, fmt.Errorf("serves the newest generation %d with changes still pending (all %v, %d ranges, %d inodes)", cur.gen, p.all, len(p.blocks), len(p.inodes)))
	}
	if live && c.sw.pinned != 0 && cur.gen != c.sw.pinned {
		errs = append(errs, fmt.Errorf("pinned to generation %d, serves %d", c.sw.pinned, cur.gen))
	}
	if c.fs != nil {
		if v := c.fs.views.current().gen; live && v != cur && v != c.sw.moving {
			errs = append(errs, fmt.Errorf("the kernel is served a reader that is not generation %d's (%v)", cur.gen, v))
		}
		for _, v := range c.fs.views.all() {
			if v.gen != nil && v.tag != uint32(v.gen.gen)%maxTag {
				errs = append(errs, fmt.Errorf("a recent view is tagged %d, its reader is generation %d's", v.tag, v.gen.gen))
			}
		}
	}
	return errors.Join(errs...)
}

// checkSwitcher panics if the switching state is broken, in a build with
// the invariants tag; c.mu held.
func (c *Client) checkSwitcher() {
	if !checkInvariants {
		return
	}
	if err := c.switcherInvariants(); err != nil {
		panic("guestagent: switcher invariants broken: " + err.Error())
	}
}
