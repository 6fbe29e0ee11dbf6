package guestagent

import "sync"

// nodes counts the kernel's references to the nodes it was given: each
// LOOKUP reply and READDIRPLUS entry with a node id adds one, FORGET
// takes its count away, and a node at zero is dropped. So it holds
// exactly what the kernel holds (its inode cache), and shrinks when the
// kernel does. For each node it keeps the directory and name it was last
// given under, which is how a switch that cannot say what changed finds
// the names the kernel may have cached, and how a log line names a path.
type nodes struct {
	mu   sync.Mutex
	m    map[uint64]nodeRef // guarded by mu
	peak int                // len(m) since m was made; guarded by mu
}

type nodeRef struct {
	refs   uint64
	parent uint64
	name   string
}

func newNodes() *nodes { return &nodes{m: map[uint64]nodeRef{}} }

// add records one more kernel reference to id, as the entry name of
// directory parent.
func (t *nodes) add(id, parent uint64, name string) {
	t.mu.Lock()
	r := t.m[id]
	r.refs++
	if r.parent != parent || r.name != name {
		r.parent, r.name = parent, name
	}
	t.m[id] = r
	t.peak = max(t.peak, len(t.m))
	t.mu.Unlock()
}

// forget drops n references to id, and id with the last.
func (t *nodes) forget(id, n uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	r, ok := t.m[id]
	if !ok {
		return
	}
	if r.refs > n {
		r.refs -= n
		t.m[id] = r
		return
	}
	delete(t.m, id)
	// Go maps never give their buckets back: once the kernel has let go
	// of most of what it held, move what is left to a map its size.
	if t.peak > 4096 && len(t.m) < t.peak/4 {
		m := make(map[uint64]nodeRef, len(t.m))
		for k, v := range t.m {
			m[k] = v
		}
		t.m, t.peak = m, len(m)
	}
}

// has reports whether the kernel holds id. The root always is.
func (t *nodes) has(id uint64) bool {
	if id == fuseRoot {
		return true
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.m[id]
	return ok
}

// len is how many nodes the kernel holds, besides the root.
func (t *nodes) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}

// entry is a node the kernel holds, with the name it was given under.
type entry struct {
	id, parent uint64
	name       string
}

// entries returns every node the kernel holds (not the root).
func (t *nodes) entries() []entry {
	t.mu.Lock()
	defer t.mu.Unlock()
	es := make([]entry, 0, len(t.m))
	for id, r := range t.m {
		es = append(es, entry{id, r.parent, r.name})
	}
	return es
}

// path names id as the kernel was last told of it, from the root of the
// mount ("/dir/file"), or "" if that is not known.
func (t *nodes) path(id uint64) string {
	if id == fuseRoot {
		return "/"
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	p := ""
	for range 256 { // deeper than that is a loop, or not worth a log line
		r, ok := t.m[id]
		if !ok {
			return ""
		}
		p = "/" + r.name + p
		if r.parent == fuseRoot {
			return p
		}
		id = r.parent
	}
	return ""
}
