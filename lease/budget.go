package lease

import (
	"fmt"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// FDs is the budget of file descriptors for what guests cause: the files
// held open for their leases and, when the host agent counts them here,
// their connections. It is the process's fd limit less a reserve for
// everything else (listeners, the control socket, logs, the watchdog's
// pipe, inotify), so no guest can take the descriptors the agent needs
// to keep working. Several coordinators (exports) share one.
type FDs struct {
	limit int64
	used  atomic.Int64
}

// NewFDs is the budget of the process's fd limit (RLIMIT_NOFILE) less
// reserve.
func NewFDs(reserve int) (*FDs, error) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return nil, err
	}
	n := int64(rl.Cur) - int64(reserve)
	if n < 1 {
		return nil, fmt.Errorf("lease: the fd limit %d leaves nothing after a reserve of %d", rl.Cur, reserve)
	}
	return &FDs{limit: n}, nil
}

// NewFDsLimit is a budget of n descriptors.
func NewFDsLimit(n int) *FDs { return &FDs{limit: int64(n)} }

// Take takes one descriptor from the budget, if one is left.
func (b *FDs) Take() bool { return b.TakeN(1) }

// TakeN takes n descriptors from the budget, if n are left.
func (b *FDs) TakeN(n int) bool {
	if b.used.Add(int64(n)) > b.limit {
		b.used.Add(-int64(n))
		return false
	}
	return true
}

// Give gives one back.
func (b *FDs) Give() { b.GiveN(1) }

// GiveN gives n back.
func (b *FDs) GiveN(n int) { b.used.Add(-int64(n)) }

// Used is how many are taken.
func (b *FDs) Used() int64 { return b.used.Load() }

// Limit is the budget.
func (b *FDs) Limit() int64 { return b.limit }
