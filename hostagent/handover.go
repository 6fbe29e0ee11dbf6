package hostagent

import (
	"errors"
	"fmt"
	"maps"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/lease"
)

// An upgrade hands the running agent's state to the binary it execs
// (cmd/leasefs host.go): per export, its locked mount and block store,
// the kept generations, and the lease coordinator's held files, whose
// sessions and leases the successor reads from the lease journal. Every
// descriptor is passed by number, kept open across the exec.

// ExportState is what an export hands its successor. Each part is its
// owner's: the store's (store.go), the generations' (generation.go), the
// keeper's (keep.go) and the lease coordinator's.
type ExportState struct {
	Device, Mount string                 // what it exports: another export by its name is not taken over
	MountFD       int                    // the export's locked root
	Store         StoreState             // the block store, its file by descriptor
	Gens          []GenState             // the kept generations
	Next, Cur     uint64                 // the next generation's number, the current one's
	Label         string                 // the current label
	Held          map[uint32]int         // the files guests hold, by inode
	On            map[lease.Token]uint64 // the generation each session is on, kept for it until it is back
	Pinned        map[lease.Token]bool   // the sessions that pinned theirs
	Kept          []KeptState            // the keeper's files
}

// CloseKept closes the keeper's descriptors of a state no export takes.
func (st *ExportState) CloseKept() {
	for _, k := range st.Kept {
		unix.Close(k.FD)
	}
	st.Kept = nil
}

// Descriptors lists every descriptor st names, which must stay open
// across the exec.
func (st *ExportState) Descriptors() []int {
	fds := []int{st.MountFD, st.Store.FD}
	for _, fd := range st.Held {
		fds = append(fds, fd)
	}
	for _, k := range st.Kept {
		fds = append(fds, k.FD)
	}
	return fds
}

// KeptState is a file the keeper holds (keep.go).
type KeptState struct {
	Ino, IGen   uint32
	FD          int
	Size        int64
	First, Last uint64
}

// Handover stops every change to every export — publishes and lease
// changes, until release (if the exec fails) or the exec — and returns
// their states, descriptors included, by name.
func (s *Server) Handover() (map[string]*ExportState, func(), error) {
	var undo []func()
	release := func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	out := map[string]*ExportState{}
	for name, sv := range s.all() {
		st, rel, err := sv.exp.handover()
		if err != nil {
			release()
			return nil, nil, fmt.Errorf("export %s: %w", name, err)
		}
		undo = append(undo, rel)
		held, rel := sv.coord.Handover()
		undo = append(undo, rel)
		st.Held = held
		sv.mu.Lock()
		st.On, st.Pinned = maps.Clone(sv.on), maps.Clone(sv.pins)
		sv.mu.Unlock()
		out[name] = st
	}
	return out, release, nil
}

// handedOn is the generation each session was on, and which sessions
// pinned theirs, as handed over.
func (e *Export) handedOn() (map[lease.Token]uint64, map[lease.Token]bool) {
	on, pins := map[lease.Token]uint64{}, map[lease.Token]bool{}
	if e.cfg.Inherit != nil {
		maps.Copy(on, e.cfg.Inherit.On)
		maps.Copy(pins, e.cfg.Inherit.Pinned)
	}
	return on, pins
}

// handover waits for a publish in flight, writes out the store and
// returns the export's state; publishing waits until release.
func (e *Export) handover() (*ExportState, func(), error) {
	e.pub.Lock()
	store, err := e.store.state()
	if err != nil {
		e.pub.Unlock()
		return nil, nil, err
	}
	st := &ExportState{Device: e.cfg.Device, Mount: e.cfg.Mount, MountFD: e.mountFD, Store: store, Label: e.pl.label}
	e.gens.state(st)
	if e.keep != nil {
		st.Kept = e.keep.handover()
	}
	return st, e.pub.Unlock, nil
}

// takeOver opens the export from a predecessor's state (OpenExport).
func (e *Export) takeOver(st *ExportState) error {
	unix.CloseOnExec(st.MountFD)
	var a, b unix.Stat_t
	if err := unix.Fstat(st.MountFD, &a); err != nil {
		return err
	}
	if err := unix.Stat(e.cfg.Mount, &b); err != nil {
		return err
	}
	if a.Dev != b.Dev || a.Ino != b.Ino {
		return errors.New("the export handed over is another directory")
	}
	if err := lockFD(st.MountFD, "export "+e.cfg.Name+" ("+e.cfg.Mount+")"); err != nil {
		return err
	}
	e.mountFD = st.MountFD
	e.store = storeFromState(st.Store)
	e.pl.label = st.Label
	if err := e.gens.fromState(st, e.store); err != nil {
		return err
	}
	// What changed while nobody watched is not known: the next publish
	// scans everything.
	e.pl.needFull = true
	return nil
}
