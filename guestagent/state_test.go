package guestagent

import (
	"errors"
	"testing"

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
