package guestagent

import "sync"

// nodes counts the kernel's references to the nodes it was given: each
// LOOKUP reply and READDIRPLUS entry with a node id adds one, FORGET
// takes its count away, and a node at zero is dropped. So it holds
// exactly what the kernel holds (its inode cache), and shrinks when the
// kernel does. For each node it keeps the directory and name it was last
// given under, which is how a switch that cannot say what changed finds
// the names the kernel may have cached, and how a log line names a path.
//
// A guest walking a large tree holds a node for each of its inodes, so
// they are kept small and free of pointers (the collector never scans
// them): names live in one arena, compacted when mostly garbage.
type nodes struct {
	mu    sync.Mutex
	m     map[uint64]nodeRef // guarded by mu
	peak  int                // len(m) since m was made; guarded by mu
	names []byte             // the arena; guarded by mu
	live  int                // bytes of names still used; guarded by mu
}

type nodeRef struct {
	refs    uint64
	parent  uint64
	nameOff uint32
	nameLen uint8 // ext4 names are at most 255 bytes
}

func newNodes() *nodes { return &nodes{m: map[uint64]nodeRef{}} }

func (t *nodes) name(r nodeRef) string {
	return string(t.names[r.nameOff : r.nameOff+uint32(r.nameLen)])
}

// add records one more kernel reference to id, as the entry name of
// directory parent.
func (t *nodes) add(id, parent uint64, name string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	r, ok := t.m[id]
	r.refs++
	if !ok || r.parent != parent || string(t.names[r.nameOff:r.nameOff+uint32(r.nameLen)]) != name {
		if ok {
			t.live -= int(r.nameLen)
		}
		r.parent, r.nameOff, r.nameLen = parent, uint32(len(t.names)), uint8(min(len(name), 255))
		t.names = append(t.names, name[:r.nameLen]...)
		t.live += int(r.nameLen)
	}
	t.m[id] = r
	t.peak = max(t.peak, len(t.m))
	if len(t.names) > 2*t.live+1<<20 { // names given again and again
		t.compact()
	}
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
	t.live -= int(r.nameLen)
	// Go maps never give their buckets back, and the arena only grows:
	// once the kernel has let go of most of what it held, move what is
	// left to a map and an arena its size.
	if t.peak > 4096 && len(t.m) < t.peak/4 {
		t.compact()
	}
}

// compact rebuilds the map and the arena. Called with t.mu held.
func (t *nodes) compact() {
	m := make(map[uint64]nodeRef, len(t.m))
	names := make([]byte, 0, t.live)
	for id, r := range t.m {
		off := uint32(len(names))
		names = append(names, t.names[r.nameOff:r.nameOff+uint32(r.nameLen)]...)
		r.nameOff = off
		m[id] = r
	}
	t.m, t.names, t.peak = m, names, len(m)
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

// nameOf returns the directory and name id was last given under.
func (t *nodes) nameOf(id uint64) (parent uint64, name string, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	r, ok := t.m[id]
	if !ok {
		return 0, "", false
	}
	return r.parent, t.name(r), true
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
		es = append(es, entry{id, r.parent, t.name(r)})
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
		p = "/" + t.name(r) + p
		if r.parent == fuseRoot {
			return p
		}
		id = r.parent
	}
	return ""
}
