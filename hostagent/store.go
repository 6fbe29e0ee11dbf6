package hostagent

import (
	"crypto/sha256"
	"sync"
)

// Hash names a block's content in the store.
type Hash [sha256.Size]byte

// Store keeps metadata blocks by content, each once however many
// generations share it, counted so that a block goes when the last
// generation holding it is dropped.
type Store struct {
	mu     sync.Mutex
	blocks map[Hash]*stored // guarded by mu
	bytes  int64            // guarded by mu
}

type stored struct {
	data []byte
	refs int
}

// NewStore returns an empty store.
func NewStore() *Store { return &Store{blocks: map[Hash]*stored{}} }

// put adds a reference to data's block, copying data if it is new.
func (s *Store) put(data []byte) Hash { return s.putHashed(Hash(sha256.Sum256(data)), data) }

// putHashed is put for data whose hash the caller has computed.
func (s *Store) putHashed(h Hash, data []byte) Hash {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b := s.blocks[h]; b != nil {
		b.refs++
		return h
	}
	s.blocks[h] = &stored{data: append([]byte(nil), data...), refs: 1}
	s.bytes += int64(len(data))
	return h
}

// ref adds a reference to a block already stored.
func (s *Store) ref(h Hash) {
	s.mu.Lock()
	s.blocks[h].refs++
	s.mu.Unlock()
}

// refAll adds a reference to the stored blocks named by m[b] for each b.
func (s *Store) refAll(m map[uint64]Hash, blocks []uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, b := range blocks {
		s.blocks[m[b]].refs++
	}
}

// unref drops a reference, and the block with the last one.
func (s *Store) unref(h Hash) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.blocks[h]
	if b.refs--; b.refs == 0 {
		delete(s.blocks, h)
		s.bytes -= int64(len(b.data))
	}
}

// get returns a block's bytes; they must not be modified.
func (s *Store) get(h Hash) []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b := s.blocks[h]; b != nil {
		return b.data
	}
	return nil
}

// Size returns the number of distinct blocks and their bytes.
func (s *Store) Size() (blocks int, bytes int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.blocks), s.bytes
}
