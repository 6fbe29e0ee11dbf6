package hostagent

import (
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// FIFREEZE takes the filesystem's three percpu write locks, and taking
// each waits for an RCU grace period unless one just passed: about 35 ms
// in all on this machine (docs/benchmarks.md), against 0.3 ms
// with expedited grace periods. /sys/kernel/rcu_expedited switches the
// whole kernel to those, at the price of IPIs to every CPU per grace
// period; ExportConfig.ExpediteRCU sets it for the moment of the freeze
// only, and puts back what was there.

const rcuExpeditedPath = "/sys/kernel/rcu_expedited"

var rcuExpedite struct {
	sync.Mutex
	holders int
	old     []byte
}

// canExpediteRCU reports whether expediteRCU can do anything here.
func canExpediteRCU() bool {
	return unix.Access(rcuExpeditedPath, unix.W_OK) == nil
}

// expediteRCU turns expedited grace periods on until the returned
// function is called. Failing to (no sysfs, not root) only costs time.
func expediteRCU() (undo func()) {
	e := &rcuExpedite
	e.Lock()
	defer e.Unlock()
	if e.holders == 0 {
		old, err := os.ReadFile(rcuExpeditedPath)
		if err != nil || os.WriteFile(rcuExpeditedPath, []byte("1\n"), 0) != nil {
			return func() {}
		}
		e.old = old
	}
	e.holders++
	return func() {
		e.Lock()
		defer e.Unlock()
		if e.holders--; e.holders == 0 {
			_ = os.WriteFile(rcuExpeditedPath, e.old, 0)
		}
	}
}
