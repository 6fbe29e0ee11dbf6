package hostagent

import (
	"fmt"
	"sync"
)

// A store's generations, for the invariants build (make test runs this
// package so): each publish ends by checking that every block's
// reference count is the number of live generations that name it —
// neither a leak nor a block freed under one — and that no generation
// nobody holds keeps its blocks (one made and thrown away, as empty
// automatic publishes did, each keeping every block of the export).
type liveGens struct {
	mu    sync.Mutex // a debugging lock, outside the ranked ones
	alive map[*Generation]bool
	// Live generations nobody held at the last check: one still so at
	// the next was let go of without giving its blocks back (a release
	// under way when a check runs waits for it).
	unheld map[*Generation]bool
}

// born records g, whose references the store now counts.
func (s *Store) born(g *Generation) {
	if !checkInvariants {
		return
	}
	s.live.mu.Lock()
	defer s.live.mu.Unlock()
	if s.live.alive == nil {
		s.live.alive = map[*Generation]bool{}
	}
	s.live.alive[g] = true
}

// dying runs drop, which gives up g's references, as g leaves the live
// generations: a check never sees half of it.
func (s *Store) dying(g *Generation, drop func()) {
	if !checkInvariants {
		drop()
		return
	}
	s.live.mu.Lock()
	defer s.live.mu.Unlock()
	delete(s.live.alive, g)
	drop()
}

// checkRefs compares the store's reference counts with its live
// generations. Called with no capture under way (Export.pub held).
func (s *Store) checkRefs() error {
	s.live.mu.Lock()
	defer s.live.mu.Unlock()
	want := map[Hash]int{}
	unheld := map[*Generation]bool{}
	for g := range s.live.alive {
		if g.refs.Load() <= 0 {
			if s.live.unheld[g] {
				return fmt.Errorf("generation %d is held by nobody and still holds its %d blocks", g.Number, len(g.blocks))
			}
			unheld[g] = true
		}
		for _, h := range g.blocks {
			want[h]++
		}
	}
	s.live.unheld = unheld
	s.mu.Lock()
	defer s.mu.Unlock()
	for h, b := range s.blocks {
		if b.refs != want[h] {
			return fmt.Errorf("block %x has %d references; %d live generations name it", h[:6], b.refs, want[h])
		}
	}
	for h, n := range want {
		if s.blocks[h] == nil {
			return fmt.Errorf("block %x is gone; %d live generations name it", h[:6], n)
		}
	}
	return nil
}
