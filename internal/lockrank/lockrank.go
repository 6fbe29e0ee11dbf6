// Package lockrank is a mutex whose rank is part of its type, so that a
// debug build can check that locks are only ever taken in their
// documented order.
//
// A Mutex[R] is a sync.Mutex; R (a type with a Rank method) says where
// it stands. Built with the lockrank tag, every Lock checks, before it
// waits, that the goroutine holds no lock of the same or a higher rank,
// and panics naming both if it does: an inversion is reported where it
// happens, the first time the code path runs, not when two goroutines
// happen to deadlock on it. Without the tag a Mutex is a sync.Mutex and
// costs nothing more.
//
// Leaves share one rank: holding one, no other may be taken. A lock may
// be unlocked by another goroutine than the one that took it (a handover
// returns a function that lets go later); it is then no longer counted
// as the first one's.
package lockrank

import "sync"

// A Ranker names a rank: lower ranks are taken first.
type Ranker interface {
	Rank() (rank int, name string)
}

// Mutex is a sync.Mutex of rank R. The zero value is unlocked.
type Mutex[R Ranker] struct {
	mu sync.Mutex
}

// Lock locks m, after checking (with the lockrank tag) that no lock of
// its rank or higher is held by this goroutine.
func (m *Mutex[R]) Lock() {
	var r R
	rank, name := r.Rank()
	before(m, rank, name)
	m.mu.Lock()
	after(m, rank, name)
}

// Unlock unlocks m.
func (m *Mutex[R]) Unlock() {
	released(m)
	m.mu.Unlock()
}
