package hostagent

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"os"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/lockrank"
)

// Hash names a block's content in the store.
type Hash [sha256.Size]byte

// Store keeps metadata blocks by content, each once however many
// generations share it, counted so that a block goes when the last
// generation holding it is dropped.
//
// The blocks live in a file (unlinked: a crash leaves nothing behind)
// under the state directory, which the kernel caches and pages as it
// likes; the agent's memory holds only the index, the blocks added by
// the capture under way (written out by flush, after the thaw: a freeze
// does no writes) and a small cache of the blocks read last. So the
// agent's memory does not grow with the exported filesystem's metadata.
type Store struct {
	file *os.File

	mu           lockrank.Mutex[lockrank.Store]
	blocks       map[Hash]*slot               // guarded by mu
	pending      []*slot                      // added and not written yet; guarded by mu
	pendingBytes int64                        // guarded by mu
	free         map[int][]int64              // free offsets by block size; guarded by mu
	end          int64                        // the file's used length; guarded by mu
	hot          *simplelru.LRU[Hash, []byte] // guarded by mu
	bytes        int64                        // guarded by mu

	live liveGens // with the invariants tag only
}

// slot is where a block is in the file, and its bytes until written.
type slot struct {
	off  int64
	size int
	refs int
	data []byte // set until flush writes it
}

// hotBlocks is how many blocks the store keeps in memory once written:
// those read last (the superblock, group descriptors and whatever guests
// walk now). A miss is a pread from the page cache, a few µs against a
// guest's round trip of tens: the cache is small.
const hotBlocks = 512

// NewStore returns an empty store keeping its blocks in a file under dir.
func NewStore(dir string) (*Store, error) {
	f, err := os.OpenFile(dir, os.O_RDWR|unix.O_TMPFILE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		// Some filesystems lack O_TMPFILE: make a file and unlink it.
		f, err = os.CreateTemp(dir, ".leasefs-store-*")
		if err != nil {
			return nil, fmt.Errorf("block store in %s: %w", dir, err)
		}
		os.Remove(f.Name())
	}
	hot, _ := simplelru.NewLRU[Hash, []byte](hotBlocks, nil)
	return &Store{file: f, blocks: map[Hash]*slot{}, free: map[int][]int64{}, hot: hot}, nil
}

// Close closes the store's file.
func (s *Store) Close() error { return s.file.Close() }

// StoreState is a store as handed to a successor (ExportState.Store):
// its file by descriptor, and its index.
type StoreState struct {
	FD    int
	Slots []SlotState
	Free  map[int][]int64
	End   int64
}

// SlotState is one stored block.
type SlotState struct {
	Hash      Hash
	Off       int64
	Size, Ref int
}

// state writes out the blocks not yet written and returns the store's
// state. Nothing may add blocks meanwhile (the export's pub is held).
func (s *Store) state() (StoreState, error) {
	if err := s.flush(); err != nil {
		return StoreState{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	st := StoreState{FD: int(s.file.Fd()), Free: maps.Clone(s.free), End: s.end}
	for h, b := range s.blocks {
		st.Slots = append(st.Slots, SlotState{Hash: h, Off: b.off, Size: b.size, Ref: b.refs})
	}
	return st, nil
}

// storeFromState is the store a predecessor handed over; it owns st.FD.
func storeFromState(st StoreState) *Store {
	unix.CloseOnExec(st.FD)
	hot, _ := simplelru.NewLRU[Hash, []byte](hotBlocks, nil)
	s := &Store{file: os.NewFile(uintptr(st.FD), "leasefs-store"), blocks: make(map[Hash]*slot, len(st.Slots)),
		free: st.Free, end: st.End, hot: hot}
	if s.free == nil {
		s.free = map[int][]int64{}
	}
	for _, sl := range st.Slots {
		s.blocks[sl.Hash] = &slot{off: sl.Off, size: sl.Size, refs: sl.Ref}
		s.bytes += int64(sl.Size)
	}
	return s
}

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
	b := &slot{size: len(data), refs: 1, data: append([]byte(nil), data...)}
	if free := s.free[b.size]; len(free) > 0 {
		b.off, s.free[b.size] = free[len(free)-1], free[:len(free)-1]
	} else {
		b.off, s.end = s.end, s.end+int64(b.size)
	}
	s.blocks[h] = b
	s.pending = append(s.pending, b)
	s.pendingBytes += int64(b.size)
	s.bytes += int64(len(data))
	return h
}

// flush writes the blocks added since the last flush to the file. Until
// it has, they are kept in memory, so a failure loses nothing; the
// publish that needed them fails.
func (s *Store) flush() error {
	s.mu.Lock()
	pending := s.pending
	s.pending, s.pendingBytes = nil, 0
	s.mu.Unlock()
	var errs []error
	var left []*slot
	for _, b := range pending {
		s.mu.Lock()
		data := b.data
		s.mu.Unlock()
		if data == nil { // dropped meanwhile
			continue
		}
		if _, err := s.file.WriteAt(data, b.off); err != nil {
			errs = append(errs, err)
			left = append(left, b)
			continue
		}
		s.mu.Lock()
		if b.refs > 0 {
			b.data = nil
		}
		s.mu.Unlock()
	}
	if len(left) > 0 {
		s.mu.Lock()
		s.pending = append(s.pending, left...)
		for _, b := range left {
			s.pendingBytes += int64(b.size)
		}
		s.mu.Unlock()
		return fmt.Errorf("writing %d blocks to the block store: %w", len(left), errors.Join(errs...))
	}
	return nil
}

// unwritten returns the bytes of the blocks added and not written yet.
func (s *Store) unwritten() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pendingBytes
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
	if b.refs--; b.refs > 0 {
		return
	}
	delete(s.blocks, h)
	s.hot.Remove(h)
	s.bytes -= int64(b.size)
	b.data = nil
	s.free[b.size] = append(s.free[b.size], b.off)
}

// has reports whether the block is stored.
func (s *Store) has(h Hash) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.blocks[h] != nil
}

// get returns a block's bytes, which must not be modified; the caller
// holds a reference to it (through a generation or a capture), so its
// place in the file is not reused under the read.
func (s *Store) get(h Hash) ([]byte, error) {
	s.mu.Lock()
	b := s.blocks[h]
	if b == nil {
		s.mu.Unlock()
		return nil, errors.New("not in the store")
	}
	if b.data != nil {
		s.mu.Unlock()
		return b.data, nil
	}
	if p, ok := s.hot.Get(h); ok {
		s.mu.Unlock()
		return p, nil
	}
	off, size := b.off, b.size
	s.mu.Unlock()
	p := make([]byte, size)
	if _, err := s.file.ReadAt(p, off); err != nil {
		return nil, fmt.Errorf("reading the block store: %w", err)
	}
	s.mu.Lock()
	if s.blocks[h] == b {
		s.hot.Add(h, p)
	}
	s.mu.Unlock()
	return p, nil
}

// Size returns the number of distinct blocks and their bytes.
func (s *Store) Size() (blocks int, bytes int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.blocks), s.bytes
}
