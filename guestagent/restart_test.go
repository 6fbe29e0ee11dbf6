package guestagent

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// A read through the host that is waiting for a connection when the host
// agent comes back without the guest's session: the reconnect fences the
// file, the read ends with ESTALE, and the mount goes on answering. (The
// reconnect used to fence while holding the lock the read waited on, and
// both hung.)
func TestReadWaitingForTheHostAcrossARestart(t *testing.T) {
	for _, device := range []bool{false, true} {
		t.Run(fmt.Sprintf("device=%v", device), func(t *testing.T) {
			h := startHost(t, 3*time.Second)
			h.write(t, "f", strings.Repeat("the bytes ", 800000)) // 8 MB
			h.write(t, "other", "still readable")
			h.publish(t)
			dev := ""
			if device {
				dev = h.img
			}
			g := startGuest(t, h, dev)
			f := openInGuests(t, []*guestMount{g}, "f")[0]
			if _, err := f.ReadAt(make([]byte, 3), 0); err != nil {
				t.Fatal(err)
			}
			h.shutdown()
			read := make(chan error, 1)
			go func() {
				_, err := f.ReadAt(make([]byte, 4), 7<<20) // far past what the kernel read ahead
				read <- err
			}()
			time.Sleep(300 * time.Millisecond) // the read is waiting for a connection
			gen := h.startServing(t, true)
			select {
			case err := <-read:
				if err != nil && !errors.Is(err, syscall.ESTALE) {
					t.Fatalf("the read in flight: %v, want its bytes or ESTALE", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the read in flight across the restart hangs")
			}
			g.waitFor(t, gen)
			if got := g.read(t, "other"); got != "still readable" {
				t.Fatalf("after the restart: %q", got)
			}
			if _, err := f.ReadAt(make([]byte, 4), 0); !errors.Is(err, syscall.ESTALE) {
				t.Fatalf("the file open across the restart: %v, want ESTALE", err)
			}
		})
	}
}

// The host agent restarts again and again while guests read, on both
// data paths, and the host replaces the file they read between restarts
// and publishes: every read gives the bytes of one version, or ESTALE;
// none hangs, none gives other bytes, and the mount keeps answering.
func TestReadsAcrossHostRestarts(t *testing.T) {
	h := startHost(t, 3*time.Second)
	const size = 2 << 20
	version := func(v int) []byte { return bytes.Repeat([]byte{byte('A' + v)}, size) }
	if err := os.WriteFile(filepath.Join(h.mnt, "big"), version(0), 0o644); err != nil {
		t.Fatal(err)
	}
	h.publish(t)
	guests := []*guestMount{startGuest(t, h, h.img), startGuest(t, h, "")}

	var mu sync.Mutex
	written := map[byte]bool{'A': true}
	var (
		reads, stale int
		failures     []string
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, g := range guests {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), 7))
			buf := make([]byte, 256<<10)
			for {
				select {
				case <-stop:
					return
				default:
				}
				f, err := os.Open(filepath.Join(g.dir, "big"))
				for err == nil {
					off := rng.Int64N(size - int64(len(buf)))
					done := make(chan struct{})
					var n int
					go func() { n, err = f.ReadAt(buf, off); close(done) }()
					select {
					case <-done:
					case <-time.After(45 * time.Second):
						mu.Lock()
						failures = append(failures, fmt.Sprintf("guest %d: a read hangs", i))
						mu.Unlock()
						return
					}
					if err != nil {
						break
					}
					mu.Lock()
					reads++
					if n != len(buf) || bytes.Count(buf, buf[:1]) != n || !written[buf[0]] {
						failures = append(failures, fmt.Sprintf("guest %d: %d bytes at %d, not one version", i, n, off))
					}
					mu.Unlock()
					if rng.IntN(8) == 0 {
						break // open it again
					}
				}
				if f != nil {
					f.Close()
				}
				mu.Lock()
				switch {
				case err == nil:
				case errors.Is(err, syscall.ESTALE):
					stale++
				default:
					failures = append(failures, fmt.Sprintf("guest %d: %v", i, err))
				}
				mu.Unlock()
			}
		}()
	}
	for round := 1; round <= 6; round++ {
		mu.Lock()
		written[byte('A'+round)] = true
		mu.Unlock()
		h.replace(t, "big", string(version(round)))
		h.publish(t)
		time.Sleep(150 * time.Millisecond)
		h.shutdown()
		time.Sleep(time.Duration(round%3) * 200 * time.Millisecond)
		gen := h.startServing(t, true)
		for _, g := range guests {
			g.waitFor(t, gen)
			start := time.Now()
			if _, err := os.Stat(filepath.Join(g.dir, "big")); err != nil && !errors.Is(err, syscall.ESTALE) {
				t.Errorf("round %d: stat: %v", round, err)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("round %d: the mount took %v to answer a stat", round, d)
			}
		}
	}
	close(stop)
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	t.Logf("%d reads, %d ESTALE", reads, stale)
	for _, f := range failures {
		t.Error(f)
	}
	if reads < 100 {
		t.Fatalf("only %d reads", reads)
	}
	for i, g := range guests {
		if got := g.read(t, "big"); got != string(version(6)) {
			t.Fatalf("guest %d does not read the last version", i)
		}
	}
}
