package upgrade

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
)

// Env names the memfd holding the Document, in the environment of the
// binary an upgrade execs; FDsEnv lists the descriptors it keeps open
// for it, so that they can be closed when the document cannot be read.
const (
	Env    = "LEASEFS_HANDOVER"
	FDsEnv = "LEASEFS_HANDOVER_FDS"
)

// Inherited is what a run takes over from the one before it: everything,
// from an agent that exec'd it (an upgrade); or the files guests hold,
// from systemd's fd store (a restart, a crash). The agent asks it for
// each thing it would otherwise open afresh — the state directory's
// lock, the control socket, each listener and export — and what it does
// not ask for is let go by Rest. Its methods are called one at a time.
type Inherited struct {
	doc    *Document                 // nil unless an upgrade's run
	store  *FDStore                  // nil without one
	stored map[string]map[uint32]int // the fd store's held files, by export and inode
	log    hclog.Logger
}

// Take reads what this run inherits: the Document an upgrade handed
// over (Env), and, with store, the held files systemd's store gave
// back. A document that cannot be read is logged, the descriptors
// handed over with it are closed (the state directory's and the
// exports' locks with them), and this run starts afresh.
func Take(store *FDStore, log hclog.Logger) *Inherited {
	in := &Inherited{store: store, log: log}
	if store != nil {
		in.stored = storedFiles(log)
	}
	v, ok := os.LookupEnv(Env)
	fds := os.Getenv(FDsEnv)
	os.Unsetenv(FDsEnv)
	if !ok {
		return in
	}
	os.Unsetenv(Env)
	doc, err := readDocument(v)
	if err != nil {
		n := closeHandedOver(fds)
		log.Error("an upgrade handed over state that cannot be read; starting afresh", "error", err, "descriptors_closed", n)
		return in
	}
	log.Info("taking over from the agent before the upgrade", "from", doc.From)
	for _, pid := range doc.Reap {
		go func() { _, _ = unix.Wait4(pid, nil, 0, nil) }()
	}
	in.doc = doc
	return in
}

// closeHandedOver closes the descriptors list names that an exec kept
// open (not close-on-exec, as every descriptor this process opens is),
// and says how many.
func closeHandedOver(list string) int {
	n := 0
	for _, f := range strings.Split(list, ",") {
		fd, err := strconv.Atoi(f)
		if err != nil || fd < 3 {
			continue
		}
		if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && flags&unix.FD_CLOEXEC == 0 {
			unix.Close(fd)
			n++
		}
	}
	return n
}

func readDocument(v string) (*Document, error) {
	fd, err := strconv.Atoi(v)
	if err != nil {
		return nil, fmt.Errorf("%s=%q: %w", Env, v, err)
	}
	f := os.NewFile(uintptr(fd), "leasefs-handover")
	defer f.Close()
	return Decode(f)
}

// Upgraded reports whether this run is an upgrade's.
func (in *Inherited) Upgraded() bool { return in.doc != nil }

// StateLock locks the state directory dir, or takes its lock over.
func (in *Inherited) StateLock(dir string) (*os.File, error) {
	if in.doc != nil && in.doc.StateLock >= 0 {
		fd := in.doc.StateLock
		in.doc.StateLock = -1
		return hostagent.AdoptStateLock(fd, dir)
	}
	return hostagent.LockStateDir(dir)
}

// Control listens on addr for control requests, on the socket handed
// over if it is addr's.
func (in *Inherited) Control(addr vsockproto.Addr, opt vsockproto.ListenOptions) (*vsockproto.Listener, error) {
	if in.doc != nil && in.doc.Control >= 0 {
		fd := in.doc.Control
		in.doc.Control = -1
		if in.doc.ControlAddr == addr.String() {
			f := os.NewFile(uintptr(fd), addr.String())
			defer f.Close()
			return vsockproto.FileListener(addr, f, opt)
		}
		unix.Close(fd)
	}
	return vsockproto.Listen(addr, opt)
}

// Listener listens on addr for guests, on the socket handed over if
// there is one.
func (in *Inherited) Listener(addr vsockproto.Addr, opt vsockproto.ListenOptions) (*vsockproto.Listener, error) {
	if in.doc != nil {
		if fd, ok := in.doc.Listeners[addr.String()]; ok {
			delete(in.doc.Listeners, addr.String())
			f := os.NewFile(uintptr(fd), addr.String())
			defer f.Close()
			return vsockproto.FileListener(addr, f, opt)
		}
	}
	return vsockproto.Listen(addr, opt)
}

// Export sets what export ec takes over: its state handed over by an
// upgrade, if it had the same name, device and mount point; with an fd
// store, the store as its keeper and the files it kept for it.
func (in *Inherited) Export(ec *hostagent.ExportConfig) {
	if in.doc != nil {
		if st := in.doc.Exports[ec.Name]; st != nil && st.Device == ec.Device && st.Mount == ec.Mount {
			ec.Inherit = st
			delete(in.doc.Exports, ec.Name)
		}
	}
	if in.store != nil {
		ec.Keeper, ec.Held = in.store.keeper(ec.Name), in.stored[ec.Name]
		delete(in.stored, ec.Name)
	}
}

// KeepOnly lets go, before anything is opened, of the exports handed
// over that keep does not name as they were (their locks would stand
// in the way of opening the same mount afresh).
func (in *Inherited) KeepOnly(keep func(name, device, mount string) bool) {
	if in.doc == nil {
		return
	}
	for name, st := range in.doc.Exports {
		if !keep(name, st.Device, st.Mount) {
			in.letGo(name, st)
			delete(in.doc.Exports, name)
		}
	}
}

// Rest lets go of everything not taken: exports and listeners the
// settings no longer have, and files the fd store kept for exports no
// longer served.
func (in *Inherited) Rest() {
	for export, held := range in.stored {
		in.log.Warn("the fd store holds files of an export no longer served; letting them go", "export", export, "files", len(held))
		lease.LetGo(held, in.store.keeper(export))
	}
	in.stored = nil
	if in.doc == nil {
		return
	}
	for name, st := range in.doc.Exports {
		in.letGo(name, st)
	}
	for key, fd := range in.doc.Listeners {
		unix.Close(fd)
		removeSocket(key)
	}
	if in.doc.Control >= 0 {
		unix.Close(in.doc.Control)
	}
	in.doc.Exports, in.doc.Listeners, in.doc.Control = nil, nil, -1
}

// letGo closes what an export handed over, its held files' leases
// dropped and, if systemd's store keeps them, removed from it.
func (in *Inherited) letGo(name string, st *hostagent.ExportState) {
	st.CloseKept()
	unix.Close(st.MountFD)
	unix.Close(st.Store.FD)
	var k lease.Keeper
	if in.store != nil {
		k = in.store.keeper(name)
	}
	lease.LetGo(st.Held, k)
}

// removeSocket removes the socket file of a listen address nobody
// serves any longer, if it has one.
func removeSocket(key string) {
	a, err := vsockproto.ParseAddr(key)
	if err != nil || (a.Kind != vsockproto.KindUnix && a.Kind != vsockproto.KindHybrid) {
		return
	}
	path := a.Path
	if a.Kind == vsockproto.KindHybrid {
		path = fmt.Sprintf("%s_%d", a.Path, a.Port)
	}
	var st unix.Stat_t
	if unix.Lstat(path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFSOCK {
		os.Remove(path)
	}
}
