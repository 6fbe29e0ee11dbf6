package lease

import (
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// One guest releasing a file while another acquires it (a FUSE release
// arrives after the next open) never makes the acquire fail.
func TestAcquireRacingTheLastRelease(t *testing.T) {
	dir, path := oneFile(t, "content")
	os.Link(path, filepath.Join(dir, "second"))
	c := coordinator(t, dir, Config{})
	r := requestFor(t, path)
	a, b := session(t, c, "a", newBreaks().sink), session(t, c, "b", newBreaks().sink)
	for i := range 3000 {
		id := mustAcquire(t, a, r)
		var wg sync.WaitGroup
		var err error
		wg.Go(func() { a.Release(id) })
		wg.Go(func() {
			var id2 ID
			if id2, err = b.Acquire(r); err == nil {
				b.Release(id2)
			}
		})
		wg.Wait()
		if err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
	}
}
