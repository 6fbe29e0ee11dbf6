package hostagent

import (
	"encoding/binary"
	"errors"
	"maps"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/internal/lockrank"
	"github.com/leasefs/leasefs/lease"
)

// A keeper keeps the files of the generations guests may be on: it holds
// an O_PATH descriptor on the inode of every regular file of each kept
// generation, taken by handle as the generation has it. A file the
// writer then replaces (a rename over it) or deletes is only unlinked:
// its inode and blocks stay, and a guest still on that generation opens
// and reads it (by handle, as any file) with its bytes, until no kept
// generation has it and its descriptor is closed. The writer sees
// nothing of this but the space such files keep using. A file rewritten
// in place is the same inode with other bytes: keeping cannot help it,
// and the lease coordinator's check refuses it (lease.Request).
//
// Its lock is a leaf.
type keeper struct {
	mountFD int
	max     int        // files held at most
	fds     *lease.FDs // the host's budget of descriptors, shared with leases: the keeper takes at most half
	charged int        // of the descriptors held, those taken from fds; guarded by mu

	mu    lockrank.Mutex[lockrank.Keeper]
	held  map[handle]*keptFile // guarded by mu
	byIno map[uint32][]uint32  // the i_generations held of each inode number; guarded by mu
	gone  map[handle]*keptFile // those held that the current generation no longer has; guarded by mu
	bytes int64                // their size; guarded by mu
	full  bool                 // max was reached; guarded by mu
}

type handle struct{ ino, igen uint32 }

type keptFile struct {
	fd   int
	size int64
	// first is the generation the file was taken in; last the newest
	// that has it, 0 while the current one does. A file is held while a
	// kept generation lies between them.
	first, last uint64
}

func newKeeper(mountFD, max int) *keeper {
	// Until a budget is set (SetFDs), at most half the process's limit.
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &rl) == nil {
		max = min(max, int(rl.Cur/2))
	}
	return &keeper{mountFD: mountFD, max: max, held: map[handle]*keptFile{}, byIno: map[uint32][]uint32{}, gone: map[handle]*keptFile{}}
}

// SetFDs makes the export's keeper take its descriptors from fds, the
// budget its leases use too; it takes at most half of it.
func (e *Export) SetFDs(fds *lease.FDs) {
	if e.keep == nil {
		return
	}
	e.keep.mu.Lock()
	defer e.keep.mu.Unlock()
	e.keep.fds = fds
	if n := len(e.keep.held); n > 0 && fds.TakeN(n) { // what it held before, if the budget has room
		e.keep.charged = n
	}
}

// publish takes the files of g, just published: all of them if all, else
// those of the inodes that changed. A file of an inode that changed and
// is no longer in g (another incarnation, or none) is marked as last in
// prev. What cannot be opened any more (the writer deleted it since the
// freeze) is not kept. Its cost grows with what changed, not with what
// is held.
func (k *keeper) publish(g *Generation, prev uint64, all bool) error {
	view, err := g.FS()
	if err != nil {
		return err
	}
	cur := map[handle]bool{}
	visit := func(ino uint32) error {
		in, err := view.Inode(ino)
		if errors.Is(err, ext4ro.ErrNotExist) || errors.Is(err, ext4ro.ErrInvalid) {
			return nil
		}
		if err != nil {
			return err
		}
		if in.IsRegular() && in.Nlink > 0 {
			cur[handle{ino, in.Generation}] = true
			k.take(handle{ino, in.Generation}, int64(in.Size), g.Number)
		}
		return nil
	}
	if all {
		if err := eachInode(view, visit); err != nil {
			return err
		}
	} else {
		for _, ino := range g.ChangedInodes {
			if err := visit(ino); err != nil {
				return err
			}
		}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	leave := func(h handle) {
		if f := k.held[h]; f.last == 0 && !cur[h] {
			f.last = prev
			k.gone[h] = f
			k.bytes += f.size
		}
	}
	if all {
		for h := range k.held {
			leave(h)
		}
		return nil
	}
	for _, ino := range g.ChangedInodes {
		for _, igen := range k.byIno[ino] {
			leave(handle{ino, igen})
		}
	}
	return nil
}

// take holds the file h of generation n, unless it is held or max files
// are.
func (k *keeper) take(h handle, size int64, n uint64) {
	k.mu.Lock()
	f := k.held[h]
	if f != nil {
		if f.last != 0 { // back in the current generation (a link made again)
			f.last = 0
			delete(k.gone, h)
			k.bytes -= f.size
		}
		k.mu.Unlock()
		return
	}
	if len(k.held) >= k.max || k.fds != nil && (k.fds.Used() >= k.fds.Limit()/2 || !k.fds.Take()) {
		k.full = true
		k.mu.Unlock()
		return
	}
	fds := k.fds
	k.mu.Unlock()
	var b [8]byte
	binary.NativeEndian.PutUint32(b[0:], h.ino)
	binary.NativeEndian.PutUint32(b[4:], h.igen)
	fd, err := unix.OpenByHandleAt(k.mountFD, unix.NewFileHandle(1 /* FILEID_INO32_GEN */, b[:]), unix.O_PATH|unix.O_CLOEXEC)
	if err != nil { // gone since the freeze: not kept
		if fds != nil {
			fds.Give()
		}
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.held[h] != nil {
		unix.Close(fd)
		if fds != nil {
			fds.Give()
		}
		return
	}
	if fds != nil {
		k.charged++
	}
	k.held[h] = &keptFile{fd: fd, size: size, first: n}
	k.byIno[h.ino] = append(k.byIno[h.ino], h.igen)
}

// release lets go of the files that no generation of kept (sorted) has:
// none lies between their first and last.
func (k *keeper) release(kept []uint64) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for h, f := range k.gone {
		i, _ := slices.BinarySearch(kept, f.first)
		if i == len(kept) || kept[i] > f.last {
			k.let(h, f)
		}
	}
}

// handover lists the files held, for a successor (ExportState.Kept).
func (k *keeper) handover() []KeptState {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]KeptState, 0, len(k.held))
	for h, f := range k.held {
		out = append(out, KeptState{Ino: h.ino, IGen: h.igen, FD: f.fd, Size: f.size, First: f.first, Last: f.last})
	}
	return out
}

// adopt holds the files a predecessor held (its descriptors, kept open
// across the exec), before the first publish.
func (k *keeper) adopt(kept []KeptState) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, s := range kept {
		unix.CloseOnExec(s.FD)
		h := handle{s.Ino, s.IGen}
		if k.held[h] != nil {
			unix.Close(s.FD)
			continue
		}
		f := &keptFile{fd: s.FD, size: s.Size, first: s.First, last: s.Last}
		k.held[h] = f
		k.byIno[h.ino] = append(k.byIno[h.ino], h.igen)
		if f.last != 0 {
			k.gone[h] = f
			k.bytes += f.size
		}
	}
}

// close lets go of every file.
func (k *keeper) close() {
	k.mu.Lock()
	defer k.mu.Unlock()
	for h, f := range k.held {
		k.let(h, f)
	}
	k.full = false
}

// let closes f's descriptor and forgets it; k.mu held.
func (k *keeper) let(h handle, f *keptFile) {
	unix.Close(f.fd)
	delete(k.held, h)
	if f.last != 0 {
		delete(k.gone, h)
		k.bytes -= f.size
	}
	igens := slices.DeleteFunc(k.byIno[h.ino], func(g uint32) bool { return g == h.igen })
	if len(igens) == 0 {
		delete(k.byIno, h.ino)
	} else {
		k.byIno[h.ino] = igens
	}
	if k.fds != nil && k.charged > 0 {
		k.fds.Give()
		k.charged--
	}
}

// floor is the oldest generation whose replaced files fit in the
// budget (files and bytes; 0: none) with those of every newer one: the
// generations before it must go. 0 if all fit.
func (k *keeper) floor(maxFiles int, maxBytes int64) uint64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	if (maxFiles <= 0 || len(k.gone) <= maxFiles) && (maxBytes <= 0 || k.bytes <= maxBytes) {
		return 0
	}
	type tally struct {
		files int
		bytes int64
	}
	by := map[uint64]*tally{}
	for _, f := range k.gone {
		t := by[f.last]
		if t == nil {
			t = &tally{}
			by[f.last] = t
		}
		t.files++
		t.bytes += f.size
	}
	lasts := slices.Sorted(maps.Keys(by))
	files, bytes := 0, int64(0)
	for i := len(lasts) - 1; i >= 0; i-- {
		t := by[lasts[i]]
		if maxFiles > 0 && files+t.files > maxFiles || maxBytes > 0 && bytes+t.bytes > maxBytes {
			return lasts[i] + 1
		}
		files, bytes = files+t.files, bytes+t.bytes
	}
	return 0
}

// KeptStats is what a keeper holds.
type KeptStats struct {
	Files int   // held, for every kept generation
	Gone  int   // of those, no longer in the current generation: kept for older ones only
	Bytes int64 // the size of those
	Full  bool  // the limit on files held was reached: some are not kept
}

// KeptFiles says what the export holds to keep its generations whole.
func (e *Export) KeptFiles() KeptStats {
	if e.keep == nil {
		return KeptStats{}
	}
	return e.keep.stats()
}

// keepGenerations is ExportConfig.KeepGenerations, at least 1.
func (e *Export) keepGenerations() uint64 { return uint64(max(e.cfg.KeepGenerations, 1)) }

// keepFloor is the oldest generation the budget for replaced files
// lets the export keep; 0 if it keeps them all.
func (e *Export) keepFloor() uint64 {
	if e.keep == nil {
		return 0
	}
	return e.keep.floor(e.cfg.KeepReplaced, e.cfg.KeepBytes)
}

func (k *keeper) stats() KeptStats {
	k.mu.Lock()
	defer k.mu.Unlock()
	return KeptStats{Files: len(k.held), Gone: len(k.gone), Bytes: k.bytes, Full: k.full}
}

// eachInode calls fn for every inode number of view's inode tables that
// may be in use.
func eachInode(view *ext4ro.FS, fn func(ino uint32) error) error {
	sb := view.Superblock()
	groups := (sb.InodesCount + sb.InodesPerGroup - 1) / sb.InodesPerGroup
	for g := range groups {
		_, used, err := view.InodeTable(g)
		if err != nil {
			return err
		}
		n := min(uint64(sb.InodesPerGroup), used*uint64(sb.BlockSize)/uint64(sb.InodeSize))
		for i := range uint32(n) {
			ino := g*sb.InodesPerGroup + i + 1
			if ino < sb.FirstIno {
				continue
			}
			if err := fn(ino); err != nil {
				return err
			}
		}
	}
	return nil
}
