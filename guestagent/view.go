package guestagent

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/golang-lru/v2/simplelru"

	"github.com/leasefs/leasefs/vsockproto"
)

// metaCache is the guest's one cache of metadata blocks: a bounded LRU of
// the blocks of one generation, the one served. A switch drops what the
// announcements said changed and moves the rest to the new generation,
// at a cost that grows with the change, not with the cache. Blocks of
// other generations are never cached: an older view still in use (a
// directory listing begun before a switch) fetches what it reads, and a
// fetch for a generation that a switch left behind meanwhile is not
// added.
type metaCache struct {
	bs    int64
	limit int // blocks

	mu     sync.Mutex
	gen    uint64                         // guarded by mu
	lru    *simplelru.LRU[uint64, []byte] // guarded by mu
	hits   uint64                         // guarded by mu
	misses uint64                         // guarded by mu

	// The generation's digests by window (digests.go), those being
	// asked for, and how many blocks read from the device checked.
	wins      *simplelru.LRU[uint64, *digests] // guarded by mu
	asking    map[blockKey]*asking             // guarded by mu
	fromDev   uint64                           // guarded by mu
	unchecked uint64                           // guarded by mu
}

// asking is a window's digests being asked for: done closes when w is
// set (nil: not to be had).
type asking struct {
	done chan struct{}
	w    *digests
}

// newMetaCache caches up to bytes of blocks of size bs of generation gen.
func newMetaCache(bytes, bs int64, gen uint64) *metaCache {
	limit := int(max(bytes/bs, 16))
	lru, _ := simplelru.NewLRU[uint64, []byte](limit, nil) // errors only for size <= 0
	wins, _ := simplelru.NewLRU[uint64, *digests](digestWindows(bytes), nil)
	return &metaCache{bs: bs, limit: limit, gen: gen, lru: lru, wins: wins, asking: map[blockKey]*asking{}}
}

// window returns window win's digests of gen if cached; else the ask in
// flight for them; else (gen being the cached generation) a function the
// caller, who asks for them, calls with the answer.
func (c *metaCache) window(gen, win uint64) (*digests, *asking, func(*digests)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return nil, nil, nil
	}
	if w, ok := c.wins.Get(win); ok {
		return w, nil, nil
	}
	k := blockKey{gen, win}
	if a := c.asking[k]; a != nil {
		return nil, a, nil
	}
	a := &asking{done: make(chan struct{})}
	c.asking[k] = a
	return nil, nil, func(w *digests) {
		c.mu.Lock()
		delete(c.asking, k)
		if w != nil && gen == c.gen {
			c.wins.Add(win, w)
		}
		c.mu.Unlock()
		a.w = w
		close(a.done)
	}
}

// noteDevice counts blocks read from the device: good checked, bad not.
func (c *metaCache) noteDevice(good, bad int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.fromDev += uint64(good)
	c.unchecked += uint64(bad)
}

func (c *metaCache) get(gen, n uint64) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return nil, false
	}
	b, ok := c.lru.Get(n)
	if ok {
		c.hits++
	} else {
		c.misses++
	}
	return b, ok
}

// has reports whether block n of gen is cached, without counting or
// refreshing it.
func (c *metaCache) has(gen, n uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return gen == c.gen && c.lru.Contains(n)
}

// add caches block n of gen, if gen is still the cached generation, and
// reports whether it did.
func (c *metaCache) add(gen, n uint64, b []byte) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen == c.gen {
		c.lru.Add(n, b)
	}
	return gen == c.gen
}

// forget drops every block: what the host serves under a generation
// number may no longer be what was cached for it.
func (c *metaCache) forget() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen = noGeneration
	c.lru.Purge()
	c.wins.Purge()
}

// noGeneration is no generation's number.
const noGeneration = ^uint64(0)

// advance makes gen the cached generation: the blocks that changed go,
// the rest stay.
func (c *metaCache) advance(gen uint64, ch *changes) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen = gen
	if ch.all {
		c.lru.Purge()
		c.wins.Purge()
		return
	}
	for _, r := range ch.blocks {
		last := r.Start + uint64(r.Count) - 1
		removeRange(c.lru, r.Start, last)
		removeRange(c.wins, r.Start/digestWindow, last/digestWindow)
	}
}

// removeRange removes the keys from first to last: one by one, or by a
// look at every key when there are fewer of them than in the range.
func removeRange[V any](lru *simplelru.LRU[uint64, V], first, last uint64) {
	if last-first >= uint64(lru.Len()) {
		for _, k := range lru.Keys() {
			if k >= first && k <= last {
				lru.Remove(k)
			}
		}
		return
	}
	for k := first; k <= last; k++ {
		lru.Remove(k)
	}
}

// stats reports the cache's use against its bound.
func (c *metaCache) stats() CacheStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.lru.Len()
	return CacheStatus{Blocks: n, LimitBlocks: c.limit, Bytes: int64(n) * c.bs, LimitBytes: int64(c.limit) * c.bs,
		Hits: c.hits, Misses: c.misses, DigestWindows: c.wins.Len(), FromDevice: c.fromDev, Unchecked: c.unchecked}
}

// maxFetch is the most blocks one ReadMeta asks for.
const maxFetch = 64

// genView is one generation's metadata as ext4ro reads it: a BlockSource
// over the guest's cache, which fetches what it misses from the host.
type genView struct {
	c     *Client
	gen   uint64
	label string // what the host published it as, if anything
	bs    int64
	sb    []byte // the superblock's bytes, read at open: the generation's fingerprint
	// dead: the host no longer has this generation, and what it serves
	// under its number (another lineage's) must not be read for it.
	dead atomic.Bool

	// A generation not cached any more (a listing begun before a switch
	// still reads it) keeps the few blocks it fetches since.
	mu      sync.Mutex
	private *simplelru.LRU[uint64, []byte] // guarded by mu
}

// privateBlocks is how many blocks a generation no longer cached keeps.
const privateBlocks = 256

// has reports whether block n is in the view's cache (the shared one or
// its own), without counting or refreshing it.
func (v *genView) has(n uint64) bool {
	if v.c.cache.has(v.gen, n) {
		return true
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.private != nil && v.private.Contains(n)
}

func (v *genView) getPrivate(n uint64) ([]byte, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.private == nil {
		return nil, false
	}
	return v.private.Get(n)
}

func (v *genView) addPrivate(n uint64, b []byte) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.private == nil {
		v.private, _ = simplelru.NewLRU[uint64, []byte](privateBlocks, nil)
	}
	v.private.Add(n, b)
}

// superblockAt is where the superblock's bytes are, whatever the block
// size.
const superblockAt, superblockSize = 1024, 1024

// ReadBlock returns block n: cached, or fetched with the missing blocks
// after it, up to ahead, in one request. A block already being fetched
// (by a prefetch, or another miss) is waited for, not asked for again.
func (v *genView) ReadBlock(n, ahead uint64) ([]byte, error) {
	if v.dead.Load() {
		return nil, v.deadErr()
	}
	cache := v.c.cache
	if b, ok := cache.get(v.gen, n); ok {
		v.c.m.cacheHits.Inc()
		return b, nil
	}
	if b, ok := v.getPrivate(n); ok {
		return b, nil
	}
	if v.c.fetching.wait(v.gen, n) {
		if b, ok := cache.get(v.gen, n); ok {
			v.c.m.cacheHits.Inc()
			return b, nil
		}
	}
	v.c.m.cacheMisses.Inc()
	blocks := []uint64{n}
	for b := n + 1; b < n+min(ahead, maxFetch); b++ {
		if v.has(b) {
			break
		}
		blocks = append(blocks, b)
	}
	data, err := v.load(blocks)
	if err != nil {
		return nil, err
	}
	return data[:v.bs:v.bs], nil
}

// Prefetch fetches the blocks that are neither cached nor being fetched,
// in as few requests as the host takes, at once, and caches them: what a
// directory listing's entries and subdirectories will need next.
func (v *genView) Prefetch(blocks []uint64) {
	if v.dead.Load() || len(blocks) == 0 {
		return
	}
	slices.Sort(blocks)
	blocks = slices.Compact(blocks)
	var want []uint64
	for _, b := range blocks {
		if !v.has(b) && !v.c.fetching.busy(v.gen, b) {
			want = append(want, b)
		}
	}
	per := int(min(vsockproto.MaxMetaBlocks, vsockproto.MaxReply/v.bs))
	var wg sync.WaitGroup
	for len(want) > 0 {
		chunk := want[:min(per, len(want))]
		want = want[len(chunk):]
		wg.Go(func() { _, _ = v.load(chunk) })
	}
	wg.Wait()
}

// load fetches blocks (sorted) and caches them, marking them in flight
// meanwhile. It returns their bytes, in order.
func (v *genView) load(blocks []uint64) ([]byte, error) {
	done := v.c.fetching.start(v.gen, blocks)
	defer done()
	data, err := v.read(blocks)
	if err != nil {
		return nil, err
	}
	for i, b := range blocks {
		// A copy of its own: a block kept must not keep the whole reply
		// (up to a MiB) it came in, or the cache's bound would not be
		// what it holds.
		block := bytes.Clone(data[int64(i)*v.bs : int64(i+1)*v.bs])
		if !v.c.cache.add(v.gen, b, block) {
			v.addPrivate(b, block)
		}
	}
	return data, nil
}

// inFlight is the metadata blocks being fetched, so that a miss of one
// waits for its fetch instead of asking again.
type inFlight struct {
	mu     sync.Mutex
	blocks map[blockKey]chan struct{} // closed when the fetch ends; guarded by mu
}

type blockKey struct{ gen, block uint64 }

func newInFlight() *inFlight { return &inFlight{blocks: map[blockKey]chan struct{}{}} }

// start marks blocks of gen in flight (those not already) until done.
func (f *inFlight) start(gen uint64, blocks []uint64) (done func()) {
	ch := make(chan struct{})
	var mine []blockKey
	f.mu.Lock()
	for _, b := range blocks {
		k := blockKey{gen, b}
		if _, ok := f.blocks[k]; !ok {
			f.blocks[k] = ch
			mine = append(mine, k)
		}
	}
	f.mu.Unlock()
	return func() {
		f.mu.Lock()
		for _, k := range mine {
			delete(f.blocks, k)
		}
		f.mu.Unlock()
		close(ch)
	}
}

// busy reports whether block of gen is being fetched.
func (f *inFlight) busy(gen, block uint64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.blocks[blockKey{gen, block}]
	return ok
}

// wait waits for the fetch of block of gen, if one is in flight, and
// reports whether there was one.
func (f *inFlight) wait(gen, block uint64) bool {
	f.mu.Lock()
	ch, ok := f.blocks[blockKey{gen, block}]
	f.mu.Unlock()
	if ok {
		<-ch
	}
	return ok
}

// fetch reads blocks (sorted) of the view's generation from the host.
func (v *genView) fetch(blocks []uint64) ([]byte, error) {
	v.c.m.metaFetches.Inc()
	reply, err := v.c.call(nil, &vsockproto.ReadMeta{Generation: v.gen, Blocks: vsockproto.Ranges(blocks)})
	if err != nil {
		if errors.Is(err, vsockproto.ErrGone) {
			v.c.generationGone(v)
		}
		return nil, fmt.Errorf("generation %d: %w", v.gen, err)
	}
	if v.dead.Load() { // the request may have gone to another lineage's host
		return nil, v.deadErr()
	}
	data := reply.(*vsockproto.Meta).Data
	if int64(len(data)) != int64(len(blocks))*v.bs {
		return nil, fmt.Errorf("generation %d: the host sent %d bytes for %d blocks", v.gen, len(data), len(blocks))
	}
	v.c.m.metaBytes.Add(float64(len(data)))
	return data, nil
}

// ReadAt reads metadata bytes block by block, as ext4ro reads a
// superblock, a slow symlink or an xattr inode.
func (v *genView) ReadAt(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		b, err := v.ReadBlock(uint64(pos/v.bs), 1)
		if err != nil {
			return n, err
		}
		n += copy(p[n:], b[pos%v.bs:])
	}
	return n, nil
}

func (v *genView) deadErr() error {
	return fmt.Errorf("%w: generation %d is gone from the host", ErrStale, v.gen)
}
