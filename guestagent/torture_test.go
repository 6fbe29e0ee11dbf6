package guestagent

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/testenv"
)

// The consistency torture: a host writer replaces ~1,000 self-validating
// files continuously and publishes every second, while readers in both
// guests read them continuously. No read may be torn.
func TestTortureNoTornReads(t *testing.T) {
	d := time.Minute
	if v := os.Getenv("LEASEFS_TORTURE"); v != "" {
		var err error
		if d, err = time.ParseDuration(v); err != nil {
			t.Fatal(err)
		}
	}
	const files = 1000
	h := startHost(t, 3*time.Second)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range files {
		if err := os.WriteFile(filepath.Join(h.mnt, fmt.Sprint("f", i)), testenv.SelfValidating(r), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	h.publish(t)
	guests := []*guestMount{startGuest(t, h, h.img), startGuest(t, h, "")}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var reads, torn, stale, replaced, gens atomic.Int64
	wg.Go(func() { // the writer
		r := rand.New(rand.NewPCG(3, 4))
		for {
			select {
			case <-stop:
				return
			default:
			}
			name := filepath.Join(h.mnt, fmt.Sprint("f", r.IntN(files)))
			if err := os.WriteFile(name+".tmp", testenv.SelfValidating(r), 0o644); err != nil {
				t.Error(err)
				return
			}
			if err := os.Rename(name+".tmp", name); err != nil {
				t.Error(err)
				return
			}
			replaced.Add(1)
			time.Sleep(time.Millisecond) // continuous, but leaving the readers room
		}
	})
	wg.Go(func() { // publishing every second
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Second):
			}
			if _, err := h.srv.Publish("test"); err != nil {
				t.Errorf("publish: %v", err)
				return
			}
			gens.Add(1)
		}
	})
	for gi, g := range guests {
		for k := range 2 {
			wg.Go(func() {
				r := rand.New(rand.NewPCG(uint64(gi), uint64(k)))
				for {
					select {
					case <-stop:
						return
					default:
					}
					b, err := os.ReadFile(filepath.Join(g.dir, fmt.Sprint("f", r.IntN(files))))
					switch {
					case errors.Is(err, syscall.ESTALE):
						stale.Add(1)
					case err != nil:
						t.Errorf("guest %d: %v", gi, err)
						return
					case !testenv.Valid(b):
						torn.Add(1)
					default:
						reads.Add(1)
					}
				}
			})
		}
	}
	time.Sleep(d)
	close(stop)
	wg.Wait()
	t.Logf("%v: %d files replaced, %d generations, %d good reads, %d torn, %d stale",
		d, replaced.Load(), gens.Load(), reads.Load(), torn.Load(), stale.Load())
	if torn.Load() != 0 {
		t.Fatalf("%d torn reads", torn.Load())
	}
	if reads.Load() < 100 || gens.Load() < int64(d/time.Second)/2 {
		t.Fatalf("too little happened: %d reads, %d generations", reads.Load(), gens.Load())
	}
}
