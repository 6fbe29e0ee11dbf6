package hostagent

import (
	"maps"
	"slices"
	"time"

	"github.com/leasefs/leasefs/internal/lockrank"
	"github.com/leasefs/leasefs/vsockproto"
)

// registry is an export's kept generations: the current one, and the
// older ones kept for guests that still read or pin them. It numbers
// each publish. Its lock (ExportGenerations) is held for a map
// operation only; a generation it lets go of is released after.
type registry struct {
	mu   lockrank.Mutex[lockrank.ExportGenerations]
	gens map[uint64]*Generation // guarded by mu
	cur  *Generation            // guarded by mu
	next uint64                 // the next publish's number; guarded by mu
}

func newRegistry() *registry { return &registry{gens: map[uint64]*Generation{}, next: 1} }

// current returns the newest generation, or nil before the first.
func (r *registry) current() *Generation {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cur
}

// acquire returns generation n referenced, or nil if it is not kept.
func (r *registry) acquire(n uint64) *Generation {
	r.mu.Lock()
	defer r.mu.Unlock()
	if g := r.gens[n]; g != nil && g.acquire() {
		return g
	}
	return nil
}

func (r *registry) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.gens)
}

func (r *registry) has(n uint64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.gens[n] != nil
}

// list lists the generations kept, oldest first.
func (r *registry) list() []vsockproto.KeptGeneration {
	r.mu.Lock()
	defer r.mu.Unlock()
	var list []vsockproto.KeptGeneration
	for _, n := range slices.Sorted(maps.Keys(r.gens)) {
		g := r.gens[n]
		list = append(list, vsockproto.KeptGeneration{Number: n, Published: g.Captured, Label: g.Label})
	}
	return list
}

// labeled is the newest kept generation published with label; 0 if none.
func (r *registry) labeled(label string) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	var n uint64
	for k, g := range r.gens {
		if g.Label == label {
			n = max(n, k)
		}
	}
	return n
}

// numbersBut lists the generations kept that keep does not say to keep.
func (r *registry) numbersBut(keep func(n uint64) bool) []uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []uint64
	for k := range r.gens {
		if !keep(k) {
			out = append(out, k)
		}
	}
	return out
}

// remove forgets generation n, unless it is the current one, and
// returns it (for the caller to release) and the numbers still kept.
func (r *registry) remove(n uint64) (*Generation, []uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	g := r.gens[n]
	if g == nil || g == r.cur {
		return nil, nil
	}
	delete(r.gens, n)
	return g, slices.Sorted(maps.Keys(r.gens))
}

// add numbers g, published after a freeze of frozen, and makes it
// current; it returns the number of the one it replaces (0: none).
func (r *registry) add(g *Generation, frozen time.Duration) (prev uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cur != nil {
		prev = r.cur.Number
	}
	g.Number, g.Frozen, g.Captured = r.next, frozen, time.Now()
	r.next++
	r.gens[g.Number] = g
	r.cur = g
	return prev
}

// state is the registry as a handover document has it (ExportState).
func (r *registry) state(st *ExportState) {
	r.mu.Lock()
	defer r.mu.Unlock()
	st.Next = r.next
	if r.cur != nil {
		st.Cur = r.cur.Number
	}
	for _, g := range r.gens {
		st.Gens = append(st.Gens, g.state())
	}
}

// fromState refills an empty registry from a handover document.
// The generations are made first: that takes the store's lock, which
// is never taken with the registry's.
func (r *registry) fromState(st *ExportState, store *Store) error {
	gens := map[uint64]*Generation{}
	for _, gs := range st.Gens {
		g, err := generationFromState(gs, store)
		if err != nil {
			return err
		}
		gens[g.Number] = g
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.next, r.gens, r.cur = st.Next, gens, gens[st.Cur]
	return nil
}

// setNext numbers the next publish n (from the state directory).
func (r *registry) setNext(n uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.next = n
}
