package hostagent

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/lease"
)

// An upgrade hands the running agent's state to the binary it execs
// (cmd/leasefs host.go): per export, its locked mount and block store,
// the kept generations, and the lease coordinator's held files, whose
// sessions and leases the successor reads from the lease journal. Every
// descriptor is passed by number, kept open across the exec.

// ExportState is what an export hands its successor.
type ExportState struct {
	Device, Mount    string                 // what it exports: another export by its name is not taken over
	MountFD, StoreFD int                    // the export's locked root, the store's file
	Held             map[uint32]int         // the files guests hold, by inode
	On               map[lease.Token]uint64 // the generation each session is on, kept for it until it is back
	Pinned           map[lease.Token]bool   // the sessions that pinned theirs
	Next, Cur        uint64
	Label            string
	Slots            []SlotState
	Free             map[int][]int64
	End              int64
	Gens             []GenState
	Kept             []KeptState // the keeper's files
}

// CloseKept closes the keeper's descriptors of a state no export takes.
func (st *ExportState) CloseKept() {
	for _, k := range st.Kept {
		unix.Close(k.FD)
	}
	st.Kept = nil
}

// KeptState is a file the keeper holds (keep.go).
type KeptState struct {
	Ino, IGen   uint32
	FD          int
	Size        int64
	First, Last uint64
}

// SlotState is one stored block.
type SlotState struct {
	Hash      Hash
	Off       int64
	Size, Ref int
}

// GenState is one kept generation.
type GenState struct {
	Number    uint64
	BlockSize int
	Captured  time.Time
	Frozen    time.Duration
	Label     string
	Full      bool
	Blocks    map[uint64]Hash
	Deps      map[uint32][]uint64
	Tables    [][2]uint64 // start, used
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
	if err := e.store.flush(); err != nil {
		e.pub.Unlock()
		return nil, nil, err
	}
	st := &ExportState{Device: e.cfg.Device, Mount: e.cfg.Mount, MountFD: e.mountFD, StoreFD: int(e.store.file.Fd()), Label: e.label}
	s := e.store
	s.mu.Lock()
	for h, b := range s.blocks {
		st.Slots = append(st.Slots, SlotState{Hash: h, Off: b.off, Size: b.size, Ref: b.refs})
	}
	st.Free, st.End = maps.Clone(s.free), s.end
	s.mu.Unlock()
	e.mu.Lock()
	st.Next = e.next
	if e.cur != nil {
		st.Cur = e.cur.Number
	}
	for _, g := range e.gens {
		gs := GenState{Number: g.Number, BlockSize: g.BlockSize, Captured: g.Captured, Frozen: g.Frozen, Label: g.Label, Full: g.Full,
			Blocks: g.blocks, Deps: g.deps}
		for _, t := range g.tables {
			gs.Tables = append(gs.Tables, [2]uint64{t.start, t.used})
		}
		st.Gens = append(st.Gens, gs)
	}
	e.mu.Unlock()
	if e.keep != nil {
		st.Kept = e.keep.handover()
	}
	return st, e.pub.Unlock, nil
}

// takeOver opens the export from a predecessor's state (OpenExport).
func (e *Export) takeOver(st *ExportState) error {
	for _, fd := range []int{st.MountFD, st.StoreFD} {
		unix.CloseOnExec(fd)
	}
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
	hot, _ := simplelru.NewLRU[Hash, []byte](hotBlocks, nil)
	s := &Store{file: os.NewFile(uintptr(st.StoreFD), "leasefs-store"), blocks: make(map[Hash]*slot, len(st.Slots)),
		free: st.Free, end: st.End, hot: hot}
	if s.free == nil {
		s.free = map[int][]int64{}
	}
	for _, sl := range st.Slots {
		s.blocks[sl.Hash] = &slot{off: sl.Off, size: sl.Size, refs: sl.Ref}
		s.bytes += int64(sl.Size)
	}
	e.store = s
	e.next, e.label = st.Next, st.Label
	for _, gs := range st.Gens {
		g := &Generation{Number: gs.Number, BlockSize: gs.BlockSize, Captured: gs.Captured, Frozen: gs.Frozen, Label: gs.Label, Full: gs.Full,
			store: s, blocks: gs.Blocks, nblocks: len(gs.Blocks), deps: gs.Deps}
		for _, t := range gs.Tables {
			g.tables = append(g.tables, tableRange{start: t[0], used: t[1]})
		}
		for _, h := range g.blocks {
			if s.blocks[h] == nil {
				return fmt.Errorf("generation %d names a block the store does not have", g.Number)
			}
		}
		g.refs.Store(1)
		s.born(g)
		e.gens[g.Number] = g
	}
	e.cur = e.gens[st.Cur]
	// What changed while nobody watched is not known: the next publish
	// scans everything.
	e.needFull = true
	return nil
}
