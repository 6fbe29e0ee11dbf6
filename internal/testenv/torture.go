package testenv

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
)

// Torture is the consistency torture: a host writer replaces
// self-validating files (SelfValidating) in Dir continuously, a
// generation is published every second, and two readers in each of
// Readers — the same files as a guest sees them — read them
// continuously, as do the readers Remote starts elsewhere (in VMs). No
// read may be torn; a read may be ESTALE.
type Torture struct {
	Dir     string         // where the host writes the files
	Readers []string       // the same directory in each guest
	Files   int            // how many files
	Publish func() error   // publishes a generation
	For     time.Duration  // how long the load runs
	Pause   time.Duration  // between the writer's replacements
	Min     TortureResults // at least this much must happen (Torn is ignored)

	// Remote readers, each started at the beginning for tt.For and
	// returning what its reads found (Read, run elsewhere).
	Remote []func(time.Duration) (TortureResults, error)
}

// TortureResults counts what a Torture did.
type TortureResults struct {
	Replaced, Generations, Reads, Torn, Stale int64
}

// Populate writes the files the first time, before the first publish.
func (tt Torture) Populate(t testing.TB) {
	t.Helper()
	r := rand.New(rand.NewPCG(1, 2))
	for i := range tt.Files {
		if err := os.WriteFile(tt.name(tt.Dir, i), SelfValidating(r), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func (tt Torture) name(dir string, i int) string { return filepath.Join(dir, fmt.Sprint("f", i)) }

// Run runs the load for tt.For and fails t on a torn read, an error, or
// less happening than tt.Min.
func (tt Torture) Run(t testing.TB) TortureResults {
	t.Helper()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var replaced, gens atomic.Int64
	wg.Go(func() { // the writer
		r := rand.New(rand.NewPCG(3, 4))
		Until(stop, func(int) bool {
			name := tt.name(tt.Dir, r.IntN(tt.Files))
			if err := os.WriteFile(name+".tmp", SelfValidating(r), 0o644); err != nil {
				t.Error(err)
				return false
			}
			if err := os.Rename(name+".tmp", name); err != nil {
				t.Error(err)
				return false
			}
			replaced.Add(1)
			time.Sleep(tt.Pause) // continuous, but leaving the readers room
			return true
		})
	})
	wg.Go(func() { // publishing every second
		Until(stop, func(int) bool {
			select {
			case <-stop:
				return false
			case <-time.After(time.Second):
			}
			if err := tt.Publish(); err != nil {
				t.Errorf("publish: %v", err)
				return false
			}
			gens.Add(1)
			return true
		})
	})
	var reads, torn, stale atomic.Int64
	add := func(r TortureResults) {
		reads.Add(r.Reads)
		torn.Add(r.Torn)
		stale.Add(r.Stale)
	}
	wg.Go(func() { add(tt.Read(t, tt.For)) })
	for i, remote := range tt.Remote {
		wg.Go(func() {
			r, err := remote(tt.For)
			if err != nil {
				t.Errorf("remote reader %d: %v", i, err)
			}
			add(r)
		})
	}
	time.Sleep(tt.For)
	close(stop)
	wg.Wait()
	res := TortureResults{Replaced: replaced.Load(), Generations: gens.Load(), Reads: reads.Load(), Torn: torn.Load(), Stale: stale.Load()}
	t.Logf("%v: %d files replaced, %d generations, %d good reads, %d torn, %d stale",
		tt.For, res.Replaced, res.Generations, res.Reads, res.Torn, res.Stale)
	if res.Torn != 0 {
		t.Fatalf("%d torn reads", res.Torn)
	}
	if res.Reads < tt.Min.Reads || res.Generations < tt.Min.Generations || res.Replaced < tt.Min.Replaced {
		t.Fatalf("too little happened: %d reads, %d generations, %d replaced; want at least %+v", res.Reads, res.Generations, res.Replaced, tt.Min)
	}
	return res
}

// Read runs two readers in each of tt.Readers for d and counts what
// they read; an error other than ESTALE fails t.
func (tt Torture) Read(t testing.TB, d time.Duration) TortureResults {
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var reads, torn, stale atomic.Int64
	for gi, dir := range tt.Readers {
		for k := range 2 {
			wg.Go(func() {
				r := rand.New(rand.NewPCG(uint64(gi), uint64(k)))
				Until(stop, func(int) bool {
					b, err := os.ReadFile(tt.name(dir, r.IntN(tt.Files)))
					switch {
					case errors.Is(err, syscall.ESTALE):
						stale.Add(1)
					case err != nil:
						t.Errorf("guest %d: %v", gi, err)
						return false
					case !Valid(b):
						torn.Add(1)
					default:
						reads.Add(1)
					}
					return true
				})
			})
		}
	}
	time.Sleep(d)
	close(stop)
	wg.Wait()
	return TortureResults{Reads: reads.Load(), Torn: torn.Load(), Stale: stale.Load()}
}
