package guestagent

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/vsockproto"
)

// A lease granted by a session that ended, and that the next did not
// resume, before the open counted it is not held: the host no longer
// holds it, and the lost session's fence did not see it.
func TestLeaseOfALostSessionIsNotHeld(t *testing.T) {
	c := &Client{files: newOpenFiles()}
	c.sess.begin(&vsockproto.Conn{}, &vsockproto.Welcome{})
	granted := c.sess.epoch
	c.sess.begin(&vsockproto.Conn{}, &vsockproto.Welcome{}) // not resumed
	lf := &leasedFile{c: c, id: 7}
	if err := c.hold(lf, granted); !errors.Is(err, errLeaseLost) || c.files.holds(lf) {
		t.Fatalf("a lease of the lost session: %v, held %v", err, c.files.holds(lf))
	}
	c.sess.begin(&vsockproto.Conn{}, &vsockproto.Welcome{Resumed: true})
	if err := c.hold(lf, granted+1); err != nil || !c.files.holds(lf) {
		t.Fatalf("a lease of a session resumed since: %v, held %v", err, c.files.holds(lf))
	}
}

// Lease ids are a session's: a lease of a lost session, let go of
// (closed, or idle and expired), never releases another file's lease
// that the next session numbered the same.
func TestReleaseIsOfTheFileNotItsNumber(t *testing.T) {
	o := newOpenFiles()
	lost, now := &leasedFile{id: 3}, &leasedFile{id: 3}
	o.add(lost)
	if got := o.takeAll(); len(got) != 1 || got[0] != lost {
		t.Fatalf("takeAll: %v", got)
	}
	o.add(now)
	if o.remove(lost) {
		t.Fatal("the lost lease counted as held")
	}
	if !o.holds(now) {
		t.Fatal("letting go of the lost lease dropped the new one")
	}
}

// A host that lost the generation served marks every view dead: those
// served lately, those of .generations, and the one a switch is moving
// to, which may be numbered like one of the new host's.
func TestLostGenerationKillsEveryView(t *testing.T) {
	old, cur, moving, browsed := &genView{gen: 3}, &genView{gen: 4}, &genView{gen: 5}, &genView{gen: 2}
	s := switching{cur: cur, moving: moving, latest: 5, browse: map[uint64]servedView{2: {fs: new(ext4ro.FS), gen: browsed}}}
	forget := s.welcomed(&vsockproto.Welcome{Generation: 1}, false, []servedView{{gen: cur}, {gen: old}})
	for _, v := range []*genView{old, cur, moving, browsed} {
		if !v.dead.Load() {
			t.Errorf("generation %d's view is not dead", v.gen)
		}
	}
	if len(forget) != 1 || len(s.browse) != 0 {
		t.Errorf("forget %d readers of .generations, %d left", len(forget), len(s.browse))
	}
	if s.lineage != 1 || !s.force || s.latest != 1 || !s.pending.all {
		t.Errorf("after: lineage %d, force %v, latest %d, all %v", s.lineage, s.force, s.latest, s.pending.all)
	}
	// A host that has it changes nothing of the views.
	cur2 := &genView{gen: 1}
	s = switching{cur: cur2, latest: 1}
	s.welcomed(&vsockproto.Welcome{Generation: 3, Kept: true}, true, []servedView{{gen: cur2}})
	if cur2.dead.Load() || s.lineage != 0 || s.latest != 3 || !s.pending.all {
		t.Errorf("kept: dead %v, lineage %d, latest %d, all %v", cur2.dead.Load(), s.lineage, s.latest, s.pending.all)
	}
}

// The registry of recent views: the newest is served, a listing's tag
// finds its view while it is among the last keptViews (else the one
// served), and so does an open's reader.
func TestRecentViews(t *testing.T) {
	first := servedView{tag: 1, fs: new(ext4ro.FS), gen: &genView{gen: 1}}
	r := newRecentViews(first)
	var views []servedView
	for n := uint32(2); n <= keptViews+1; n++ {
		v := servedView{tag: n, fs: new(ext4ro.FS), gen: &genView{gen: uint64(n)}}
		if prev := r.serve(v); n == 2 && prev.fs != first.fs {
			t.Fatal("serve did not return the view it replaced")
		}
		views = append(views, v)
	}
	newest := views[len(views)-1]
	if r.current().fs != newest.fs {
		t.Fatal("the newest is not the one served")
	}
	if len(r.all()) != keptViews {
		t.Fatalf("%d views remembered, want %d", len(r.all()), keptViews)
	}
	if r.tagged(2).fs != views[0].fs || r.generationOf(views[0].fs) != views[0].gen {
		t.Fatal("a recent view is not found by its tag or its reader")
	}
	if r.tagged(1).fs != newest.fs || r.generationOf(first.fs) != nil {
		t.Fatal("a view no longer recent is still found")
	}
	if r.tagged(0).fs != newest.fs {
		t.Fatal("tag 0 (a new listing) is not the one served")
	}
}

// A switch overtaken by a host that lost the generation served (the
// lineage changed between the switch's start and its open) is dropped
// with errLineageChanged: nothing of the generation it moved to, whose
// number may now name another lineage's, is served, and no switch is
// left half made.
func TestSwitchOvertakenByANewLineage(t *testing.T) {
	h := startHost(t, 3*time.Second)
	h.Write(t, "v", "1")
	h.Publish(t)
	g := startGuestFollowing(t, h, h.Img, Follow{Manual: true})
	h.Write(t, "w", "new")
	target := h.Publish(t)
	c := g.c
	awaitAnnounced(t, c, target)
	c.mu.Lock()
	old, ch, lineage := c.sw.cur, c.sw.pending, c.sw.lineage
	c.sw.lineage++ // what a welcome from a host that lost old's generation does
	c.mu.Unlock()
	served := c.fs.View()
	if err := c.switchTo(old, target, "", lineage, &ch); !errors.Is(err, errLineageChanged) {
		t.Fatalf("a switch of the lineage before: %v, want errLineageChanged", err)
	}
	c.mu.Lock()
	cur, moving := c.sw.cur, c.sw.moving
	c.mu.Unlock()
	if cur != old || moving != nil || c.fs.View() != served {
		t.Fatalf("after the dropped switch: on %d (want %d), moving %v, reader changed %v", cur.gen, old.gen, moving != nil, c.fs.View() != served)
	}
	if _, err := os.Stat(filepath.Join(g.dir, "w")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the dropped switch's generation shows: %v", err)
	}
}

// An open that finds the view served dead waits for the switcher to
// serve another, as long as the open is not interrupted.
func TestOpenAwaitsTheSwitchFromADeadView(t *testing.T) {
	h := startHost(t, 3*time.Second)
	h.Write(t, "v", "1")
	h.Publish(t)
	g := startGuestFollowing(t, h, h.Img, Follow{Manual: true})
	c := g.c

	// Interrupted, it returns then, not at its deadline (10 s).
	cancel := make(chan struct{})
	interrupted := make(chan string, 1)
	go func() { interrupted <- c.awaitSwitchFrom(cancel, c.fs.View()) }()
	time.Sleep(50 * time.Millisecond)
	close(cancel)
	select {
	case why := <-interrupted:
		if why != "the open was interrupted" {
			t.Fatalf("an interrupted wait: %q", why)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the wait did not end when the open was interrupted")
	}

	h.Write(t, "w", "new")
	target := h.Publish(t)
	awaitAnnounced(t, c, target)
	served := c.fs.View()
	done := make(chan string)
	go func() { done <- c.awaitSwitchFrom(nil, served) }()
	c.Refresh()
	if why := <-done; why != "" || c.fs.View() == served {
		t.Fatalf("a wait across a switch: %q, reader changed %v", why, c.fs.View() != served)
	}
}

// awaitAnnounced waits until c has heard of generation gen.
func awaitAnnounced(t *testing.T, c *Client, gen uint64) {
	t.Helper()
	for i := 0; i < 500 && c.Status().Latest < gen; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if latest := c.Status().Latest; latest < gen {
		t.Fatalf("the guest heard of generation %d, not %d", latest, gen)
	}
}
