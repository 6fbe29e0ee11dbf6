package ext4ro

import (
	lru "github.com/hashicorp/golang-lru/v2"
)

// blockCache is a bounded LRU of metadata blocks, split into shards so
// that concurrent FUSE requests rarely meet on one lock. Cached slices are
// shared and read-only.
type blockCache struct {
	shards [cacheShards]*lru.Cache[uint64, []byte]
}

const cacheShards = 16

func newBlockCache(blocks int) *blockCache {
	c := &blockCache{}
	per := max(blocks/cacheShards, 4)
	for i := range c.shards {
		c.shards[i], _ = lru.New[uint64, []byte](per) // errors only for size <= 0
	}
	return c
}

func (c *blockCache) shard(n uint64) *lru.Cache[uint64, []byte] {
	return c.shards[(n^n>>7)%cacheShards]
}

func (c *blockCache) get(n uint64) ([]byte, bool) { return c.shard(n).Get(n) }

func (c *blockCache) add(n uint64, b []byte) { c.shard(n).Add(n, b) }
