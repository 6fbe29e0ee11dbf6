//go:build lockrank

package lockrank

import (
	"bytes"
	"fmt"
	"runtime"
	"strconv"
	"sync"
)

// Enabled reports whether this build checks lock ranks.
const Enabled = true

type held struct {
	lock any
	rank int
	name string
}

var (
	mu      sync.Mutex
	holding = map[uint64][]held{} // goroutine → the ranked locks it holds; guarded by mu
	owner   = map[any]uint64{}    // lock → the goroutine holding it; guarded by mu
)

func before(lock any, rank int, name string) {
	g := goid()
	mu.Lock()
	var bad *held
	for i, h := range holding[g] {
		if h.rank >= rank {
			bad = &holding[g][i]
			break
		}
	}
	mu.Unlock()
	if bad != nil {
		panic(fmt.Sprintf("lockrank: %s (rank %d) taken while holding %s (rank %d)", name, rank, bad.name, bad.rank))
	}
}

func after(lock any, rank int, name string) {
	g := goid()
	mu.Lock()
	defer mu.Unlock()
	holding[g] = append(holding[g], held{lock, rank, name})
	owner[lock] = g
}

func released(lock any) {
	mu.Lock()
	defer mu.Unlock()
	g, ok := owner[lock]
	if !ok {
		return
	}
	delete(owner, lock)
	hs := holding[g]
	for i := range hs {
		if hs[i].lock == lock {
			hs = append(hs[:i], hs[i+1:]...)
			break
		}
	}
	if len(hs) == 0 {
		delete(holding, g)
	} else {
		holding[g] = hs
	}
}

// goid is the calling goroutine's id, from its stack header
// ("goroutine 18 [running]:"): slow, and for this debug build only.
func goid() uint64 {
	var buf [64]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b = bytes.TrimPrefix(b, []byte("goroutine "))
	if i := bytes.IndexByte(b, ' '); i > 0 {
		b = b[:i]
	}
	n, err := strconv.ParseUint(string(b), 10, 64)
	if err != nil {
		panic("lockrank: cannot tell the goroutine: " + err.Error())
	}
	return n
}
