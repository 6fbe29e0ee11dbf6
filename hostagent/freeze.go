package hostagent

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// ext4IocCheckpoint is EXT4_IOC_CHECKPOINT: _IOW('f', 43, __u32), and
// its flag that only checks the call (Linux 5.13 for both).
const (
	ext4IocCheckpoint        = 0x4004662B
	ext4CheckpointFlagDryRun = 0x4
)

// A freezer freezes one export for a capture. It is the one place that
// records a freeze as the agent's own, arms the watchdog, expedites RCU,
// and calls FIFREEZE and FITHAW; and it syncs and writes the journal
// home before, so that the freeze has little left to do.
type freezer struct {
	fd            int // the export's root
	mount, device string
	record        string // the state directory's record of a freeze of ours
	wd            *Watchdog
	budget        time.Duration
	expedite      bool
	// noCheckpoint: the kernel has no EXT4_IOC_CHECKPOINT (before 5.13),
	// so the freeze writes the journal home itself.
	noCheckpoint bool
	log          hclog.Logger
}

// newFreezer is the freezer of the export whose root is fd. It finds
// what the kernel lacks of what a freeze uses, and says so once: each
// lack only makes freezes longer.
func newFreezer(fd int, cfg ExportConfig, record string, log hclog.Logger) *freezer {
	f := &freezer{fd: fd, mount: cfg.Mount, device: cfg.Device, record: record, wd: cfg.Watchdog, budget: cfg.FreezeBudget, expedite: cfg.ExpediteRCU, log: log}
	err := unix.IoctlSetPointerInt(fd, ext4IocCheckpoint, ext4CheckpointFlagDryRun)
	if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
		f.noCheckpoint = true
		log.Warn("this kernel has no EXT4_IOC_CHECKPOINT (Linux 5.13): each freeze writes the journal home itself, and takes longer", "error", err)
	}
	if f.expedite && !canExpediteRCU() {
		log.Warn("cannot expedite RCU grace periods (" + rcuExpeditedPath + " is not writable): FIFREEZE takes tens of milliseconds")
	}
	return f
}

// thawLeftover thaws a freeze of ours that a run which died mid-publish
// recorded and left.
func (f *freezer) thawLeftover() {
	if _, err := os.Stat(f.record); err == nil {
		err := thawFS(f.fd)
		f.log.Warn("thawed a freeze recorded by an earlier run", "thaw_error", err)
		os.Remove(f.record)
	}
}

// checkpoint syncs the filesystem and writes the journal home: FIFREEZE
// does both, and doing them first keeps them out of the freeze
// (EXT4_IOC_CHECKPOINT, Linux 5.13; without it the freeze takes longer).
func (f *freezer) checkpoint() error {
	if err := unix.Syncfs(f.fd); err != nil {
		return fmt.Errorf("syncfs %s: %w", f.mount, err)
	}
	if !f.noCheckpoint {
		_ = unix.IoctlSetPointerInt(f.fd, ext4IocCheckpoint, 0)
	}
	return nil
}

// frozen runs fn with the export frozen: the freeze recorded as ours
// (durably, before FIFREEZE), the watchdog armed, RCU expedited for the
// moment, FIFREEZE, fn, FITHAW, and all of that undone. A freeze the
// watchdog had to thaw is ErrOverrun, and fn's work is to be thrown
// away.
func (f *freezer) frozen(ph *Phases, fn func() error) error {
	if err := WriteFileSync(f.record, f.mount+"\n"); err != nil {
		return err
	}
	defer os.Remove(f.record)
	if err := f.wd.arm(f.budget); err != nil {
		return err
	}
	defer f.wd.disarm()
	undoRCU := func() {}
	if f.expedite {
		undoRCU = expediteRCU()
	}
	defer undoRCU()
	start := time.Now()
	if err := freezeFS(f.fd); err != nil {
		if errors.Is(err, unix.EBUSY) {
			return ErrFrozenByOther
		}
		return fmt.Errorf("FIFREEZE %s: %w", f.mount, err)
	}
	ph.Freeze = time.Since(start)
	fnErr := fn()
	t := time.Now()
	thawErr := thawFS(f.fd)
	ph.Thaw, ph.Frozen = time.Since(t), time.Since(start)
	switch {
	case thawErr != nil && errors.Is(thawErr, unix.EINVAL):
		return fmt.Errorf("%w (%v)", ErrOverrun, ph.Frozen.Round(time.Millisecond))
	case thawErr != nil:
		return fmt.Errorf("FITHAW %s: %w", f.mount, thawErr)
	case fnErr != nil:
		return fmt.Errorf("scanning %s: %w", f.device, fnErr)
	}
	return nil
}
