package testenv

import (
	"bytes"
	"crypto/sha256"
	"math/rand/v2"
	"sync"
)

// SyncBuffer is a bytes.Buffer that a process's output or a logger and
// the test may use at once.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// SelfValidating is the content of a file that carries the checksum of
// its own body (4 to 64 KiB of it): a torn or mixed read fails Valid.
func SelfValidating(r *rand.Rand) []byte {
	body := make([]byte, 4096+r.IntN(60000))
	for i := range body {
		body[i] = byte(r.Uint32())
	}
	sum := sha256.Sum256(body)
	return append(sum[:], body...)
}

// Valid reports whether b is whole SelfValidating content.
func Valid(b []byte) bool {
	if len(b) < sha256.Size {
		return false
	}
	sum := sha256.Sum256(b[sha256.Size:])
	return bytes.Equal(sum[:], b[:sha256.Size])
}
