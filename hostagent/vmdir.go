package hostagent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/inotify"
	"github.com/leasefs/leasefs/vsockproto"
)

// ServeVMDir serves the VMs whose hybrid-vsock sockets are in dir
// (Firecracker's uds_path, Cloud Hypervisor's vsock socket), each while
// its socket exists: when VM's socket PATH appears, the agent listens on
// PATH_PORT — where the VMM delivers its guest's connections to PORT —
// and serves it as the VM PATH; when PATH goes, it stops listening,
// removes PATH_PORT and ends that VM's connections (its sessions keep
// their leases for the grace period, as after any disconnect). VMs come
// and go without touching the others or the agent. Entries that are not
// sockets (a symlink planted there among them) are never served. It
// returns when ctx ends, or the directory goes.
func (s *Server) ServeVMDir(ctx context.Context, dir string, port uint32, opt vsockproto.ListenOptions) error {
	if err := CheckVMDir(dir); err != nil {
		return err
	}
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return os.NewSyscallError("inotify_init1", err)
	}
	f := os.NewFile(uintptr(fd), "inotify")
	defer f.Close()
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_CREATE|unix.IN_DELETE|unix.IN_MOVED_FROM|unix.IN_MOVED_TO|
		unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_ONLYDIR); err != nil {
		return fmt.Errorf("watching %s: %w", dir, os.NewSyscallError("inotify_add_watch", err))
	}
	stop := context.AfterFunc(ctx, func() { f.Close() })
	defer stop()
	d := &vmDir{s: s, dir: dir, port: port, opt: opt, ctx: ctx, vms: map[string]*servedVM{}}
	defer d.stopAll()
	// Those there already, after the watch so that none is missed.
	if err := d.rescan(); err != nil {
		return err
	}
	s.log.Info("serving the VMs of a directory", "dir", dir, "port", port, "vms", len(d.vms))
	buf := make([]byte, 64<<10)
	for {
		// IN_DELETE_SELF comes only once nothing holds the directory, so
		// its being gone is also looked for every few seconds.
		_ = f.SetReadDeadline(time.Now().Add(vmDirCheck))
		n, err := f.Read(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("the VM directory %s is gone", dir)
			}
			if d.refused { // descriptors may have been freed elsewhere since
				d.refused = false
				_ = d.rescan()
			}
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("watching %s: %w", dir, err)
		}
		gone := false
		inotify.Each(buf[:n], func(_ int, mask uint32, name string) {
			switch {
			case mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_IGNORED) != 0:
				gone = true
			case mask&unix.IN_Q_OVERFLOW != 0:
				_ = d.rescan() // a directory gone shows at the next read
			case name != "":
				d.update(name)
			}
		})
		if gone {
			return fmt.Errorf("the VM directory %s is gone", dir)
		}
		if d.refused && d.freed {
			d.refused, d.freed = false, false
			_ = d.rescan()
		}
	}
}

// CheckVMDir refuses a VM directory that anyone but root (or the agent's
// user) could put a socket in: every socket there is served as a VM, and
// a planted one would take the agent's descriptors, or be where a VM's
// guest connects instead of the agent. So it must be a directory, owned
// by root or the agent's user, writable by its owner only (a sticky bit,
// as /tmp has, is not enough: others could still create entries), below
// directories no one else could replace it in (TrustedPath).
func CheckVMDir(dir string) error {
	if err := TrustedPath(dir, false); err != nil {
		return fmt.Errorf("%w: it holds VM sockets, and whoever can write it could plant some", err)
	}
	return nil
}

// vmFDs is what serving a VM costs in descriptors: its listening socket,
// and the directory it is in (kept to remove the socket by name, never
// following a symlink).
const vmFDs = 2

// vmDirCheck is how often a watched VM directory is looked for, and a
// VM refused for want of descriptors tried again.
const vmDirCheck = 2 * time.Second

// vmDir is what ServeVMDir serves; only its goroutine uses it.
type vmDir struct {
	s    *Server
	dir  string
	port uint32
	opt  vsockproto.ListenOptions
	ctx  context.Context
	vms  map[string]*servedVM // by socket name
	// refused: a VM was not served for want of descriptors; freed: one
	// stopped since. Then the directory is looked at again, and anyway
	// every vmDirCheck while one is refused.
	refused, freed bool
}

type servedVM struct {
	cancel context.CancelFunc
	done   sync.WaitGroup
}

// update serves name if it is a VM's socket and not yet served, and
// stops serving it if it is no longer one.
func (d *vmDir) update(name string) {
	if strings.HasSuffix(name, fmt.Sprintf("_%d", d.port)) {
		return // our own listener
	}
	var st unix.Stat_t
	isSock := unix.Lstat(filepath.Join(d.dir, name), &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFSOCK
	vm, served := d.vms[name]
	switch {
	case isSock && !served:
		d.start(name)
	case !isSock && served:
		d.stop(name, vm)
	}
}

// rescan brings what is served in line with the directory's sockets.
func (d *vmDir) rescan() error {
	entries, err := os.ReadDir(d.dir)
	if err != nil {
		return err
	}
	present := map[string]bool{}
	for _, e := range entries {
		present[e.Name()] = true
		d.update(e.Name())
	}
	for name, vm := range d.vms {
		if !present[name] {
			d.stop(name, vm)
		}
	}
	return nil
}

func (d *vmDir) start(name string) {
	path := filepath.Join(d.dir, name)
	// A VM's listener comes from the descriptors guests' files and
	// connections do: a directory filling with sockets cannot take them all.
	if !d.s.fds.TakeN(vmFDs) {
		d.refused = true
		if d.s.warn.Allow() {
			d.s.log.Error("cannot serve a VM: out of descriptors; it is served when another goes", "vm", path, "limit", d.s.fds.Limit())
		}
		return
	}
	opt := d.opt
	opt.VM = path
	l, err := vsockproto.Listen(vsockproto.Addr{Kind: vsockproto.KindHybrid, Path: path, Port: d.port}, opt)
	if err != nil {
		d.s.fds.GiveN(vmFDs)
		if d.s.warn.Allow() {
			d.s.log.Error("cannot serve a VM", "vm", path, "error", err)
		}
		return
	}
	ctx, cancel := context.WithCancel(d.ctx)
	vm := &servedVM{cancel: cancel}
	vm.done.Go(func() {
		if err := d.s.Serve(ctx, l); err != nil && !errors.Is(err, context.Canceled) {
			d.s.log.Error("serving a VM", "vm", path, "error", err)
		}
	})
	d.vms[name] = vm
	d.s.log.Info("VM appeared: serving it", "vm", path, "listen", fmt.Sprintf("%s_%d", path, d.port))
}

func (d *vmDir) stop(name string, vm *servedVM) {
	path := filepath.Join(d.dir, name)
	vm.cancel()
	vm.done.Wait()
	delete(d.vms, name)
	d.s.fds.GiveN(vmFDs)
	n := d.s.closeGuests(func(g *guest) bool { return g.peer.Kind == vsockproto.KindHybrid && g.peer.VM == path })
	d.s.log.Info("VM gone: stopped serving it", "vm", path, "connections_closed", n)
	d.freed = true
}

func (d *vmDir) stopAll() {
	for name, vm := range d.vms {
		vm.cancel()
		vm.done.Wait()
		delete(d.vms, name)
		d.s.fds.GiveN(vmFDs)
	}
}

// closeGuests ends the connections match picks and returns how many.
func (s *Server) closeGuests(match func(*guest) bool) int {
	gs := s.guests(match)
	for _, g := range gs {
		g.conn.Close()
	}
	return len(gs)
}

// guests returns the connected guests that match.
func (s *Server) guests(match func(*guest) bool) []*guest {
	s.mu.Lock()
	defer s.mu.Unlock()
	var gs []*guest
	for g := range s.conns {
		if match(g) {
			gs = append(gs, g)
		}
	}
	return gs
}
