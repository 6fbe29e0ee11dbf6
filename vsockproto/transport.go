package vsockproto

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"
)

// Peer is who is on the other end of an accepted connection, as the
// transport (not the peer) says.
type Peer struct {
	Kind string
	CID  uint32 // vsock: the guest's CID, set by the hypervisor
	VM   string // hvsock: the VM whose socket the connection came in on
	PID  int32  // unix: SO_PEERCRED
	UID  uint32
	GID  uint32
}

func (p Peer) String() string {
	switch p.Kind {
	case KindVsock:
		return fmt.Sprintf("cid %d", p.CID)
	case KindHybrid:
		return "vm " + p.VM
	case KindUnix:
		if p.VM != "" {
			return fmt.Sprintf("vm %s (pid %d uid %d)", p.VM, p.PID, p.UID)
		}
		return fmt.Sprintf("pid %d uid %d", p.PID, p.UID)
	}
	return "unknown peer"
}

// Guest is who the peer is for quotas: what the transport says and the
// peer cannot change. The VM for vsock (its CID) and hybrid vsock (its
// socket); on a Unix socket, the VM its listener serves (ListenOptions.VM)
// or else the user: a process that forks is the same guest.
func (p Peer) Guest() string {
	switch {
	case p.Kind == KindVsock:
		return fmt.Sprintf("cid %d", p.CID)
	case p.VM != "":
		return "vm " + p.VM
	case p.Kind == KindUnix:
		return fmt.Sprintf("uid %d", p.UID)
	}
	return "unknown"
}

// ListenOptions configure Listen.
type ListenOptions struct {
	// VM names the VM a hybrid-vsock socket belongs to: the identity of
	// every connection accepted on it. Default: the socket's path. On a
	// Unix socket it makes the socket a per-VM one: its connections are
	// that VM, not their user.
	VM string
	// TrustUID is a user besides root and ourselves that may own the
	// directory a Unix or hybrid socket is made in (a jailed VMM's user).
	TrustUID uint32
	// Mode of the socket file; default 0660. The socket is given to the
	// directory's owner, so a jailed VMM can connect to it.
	Mode os.FileMode
	// Stale, if set, hears of a socket file nobody served (left by a run
	// that died) that Listen replaced. One that is served is never
	// replaced: Listen fails with ErrInUse.
	Stale func(path string)
}

// Listener accepts connections on one address.
type Listener struct {
	l     net.Listener
	sock  *os.File // a vsock listener's socket, for File
	addr  Addr
	peer  func(net.Conn) (Peer, error)
	close func()
	once  sync.Once
}

// Listen listens on a: vsock:PORT or vsock:CID:PORT, hvsock:PATH:PORT (on
// the Unix socket PATH_PORT) or unix:PATH. A Unix socket is created with
// no-follow operations relative to its directory: a stale socket is
// replaced, anything else in its place (a planted symlink) is refused, and
// so is a directory that others may write to or that someone untrusted
// owns.
func Listen(a Addr, opt ListenOptions) (*Listener, error) {
	if opt.Mode == 0 {
		opt.Mode = 0o660
	}
	switch a.Kind {
	case KindVsock:
		// The socket is made here, not by vsock.Listen, so that it can be
		// handed to a successor (File).
		fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("listen %v: %w", a, err)
		}
		f := os.NewFile(uintptr(fd), a.String())
		defer f.Close()
		if err := unix.Bind(fd, &unix.SockaddrVM{CID: a.CID, Port: a.Port}); err != nil {
			return nil, fmt.Errorf("listen %v: %w", a, err)
		}
		if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
			return nil, fmt.Errorf("listen %v: %w", a, err)
		}
		return FileListener(a, f, opt)
	case KindHybrid:
		vm := opt.VM
		if vm == "" {
			vm = a.Path
		}
		path := fmt.Sprintf("%s_%d", a.Path, a.Port)
		l, cleanup, err := listenUnix(path, opt)
		if err != nil {
			return nil, fmt.Errorf("listen %v: %w", a, err)
		}
		peer := func(net.Conn) (Peer, error) { return Peer{Kind: KindHybrid, VM: vm}, nil }
		return &Listener{l: l, addr: a, peer: peer, close: cleanup}, nil
	case KindUnix:
		l, cleanup, err := listenUnix(a.Path, opt)
		if err != nil {
			return nil, fmt.Errorf("listen %v: %w", a, err)
		}
		peer := unixPeer
		if opt.VM != "" {
			peer = func(nc net.Conn) (Peer, error) {
				p, err := unixPeer(nc)
				p.VM = opt.VM
				return p, err
			}
		}
		return &Listener{l: l, addr: a, peer: peer, close: cleanup}, nil
	}
	if a.Kind == KindVMDir {
		return nil, fmt.Errorf("listen %v: a directory of VM sockets is served by the host agent, one listener per VM", a)
	}
	return nil, fmt.Errorf("listen: invalid address %+v", a)
}

// FileListener makes a Listener of f, a listening socket for a (one a
// predecessor handed over: File), in the state Listen leaves it. f is
// not used after; the caller closes it.
func FileListener(a Addr, f *os.File, opt ListenOptions) (*Listener, error) {
	switch a.Kind {
	case KindVsock:
		l, err := vsock.FileListener(f)
		if err != nil {
			return nil, fmt.Errorf("listen %v: %w", a, err)
		}
		// vsock.Listener does not give its socket out: keep our own
		// descriptor of it, for File.
		sock, err := dupFile(f)
		if err != nil {
			l.Close()
			return nil, err
		}
		return &Listener{l: l, addr: a, peer: vsockPeer, sock: sock, close: func() { sock.Close() }}, nil
	case KindUnix, KindHybrid:
		nl, err := net.FileListener(f)
		if err != nil {
			return nil, fmt.Errorf("listen %v: %w", a, err)
		}
		ul, ok := nl.(*net.UnixListener)
		if !ok {
			nl.Close()
			return nil, fmt.Errorf("listen %v: the descriptor handed over is not a Unix socket", a)
		}
		ul.SetUnlinkOnClose(false)
		path := a.Path
		peer := unixPeer
		if a.Kind == KindHybrid {
			path = fmt.Sprintf("%s_%d", a.Path, a.Port)
			vm := cmp.Or(opt.VM, a.Path)
			peer = func(net.Conn) (Peer, error) { return Peer{Kind: KindHybrid, VM: vm}, nil }
		}
		// The socket file at path is this listener's now: remove it on
		// Close only if it still is.
		var mine unix.Stat_t
		_ = unix.Lstat(path, &mine)
		cleanup := func() {
			var now unix.Stat_t
			if unix.Lstat(path, &now) == nil && now.Ino == mine.Ino && now.Dev == mine.Dev && now.Mode&unix.S_IFMT == unix.S_IFSOCK {
				_ = os.Remove(path)
			}
		}
		return &Listener{l: ul, addr: a, peer: peer, close: cleanup}, nil
	}
	return nil, fmt.Errorf("listen %v: cannot take over this kind of address", a)
}

// File returns a duplicate of the listening socket, to hand to a
// successor (FileListener); it is closed on exec like any other.
func (l *Listener) File() (*os.File, error) {
	if f, ok := l.l.(interface{ File() (*os.File, error) }); ok {
		return f.File()
	}
	if l.sock != nil {
		return dupFile(l.sock)
	}
	return nil, errors.ErrUnsupported
}

// dupFile duplicates f's descriptor without touching its blocking mode
// (f.Fd would make it blocking, for every copy).
func dupFile(f *os.File) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	d := -1
	var derr error
	if err := rc.Control(func(fd uintptr) { d, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, derr
	}
	return os.NewFile(uintptr(d), f.Name()), nil
}

// Accept waits for the next connection and says who it is from.
func (l *Listener) Accept() (net.Conn, Peer, error) {
	for {
		nc, err := l.l.Accept()
		if err != nil {
			return nil, Peer{}, err
		}
		p, err := l.peer(nc)
		if err != nil {
			nc.Close() // a peer we cannot name is not served
			continue
		}
		return nc, p, nil
	}
}

// SetDeadline sets a deadline for Accept.
func (l *Listener) SetDeadline(t time.Time) error {
	if d, ok := l.l.(interface{ SetDeadline(time.Time) error }); ok {
		return d.SetDeadline(t)
	}
	return errors.ErrUnsupported
}

// Addr returns the address listened on.
func (l *Listener) Addr() Addr { return l.addr }

// Close stops listening and removes a Unix socket it created.
func (l *Listener) Close() error {
	err := l.l.Close()
	l.once.Do(l.close)
	return err
}

// NetListener returns l as a net.Listener, for servers (HTTP) that do not
// ask who connects. Closing it closes l.
func (l *Listener) NetListener() net.Listener { return netListener{l} }

type netListener struct{ l *Listener }

func (n netListener) Accept() (net.Conn, error) {
	nc, _, err := n.l.Accept()
	return nc, err
}
func (n netListener) Close() error   { return n.l.Close() }
func (n netListener) Addr() net.Addr { return n.l.l.Addr() }

func vsockPeer(nc net.Conn) (Peer, error) {
	a, ok := nc.RemoteAddr().(*vsock.Addr)
	if !ok {
		return Peer{}, fmt.Errorf("not a vsock connection")
	}
	return Peer{Kind: KindVsock, CID: a.ContextID}, nil
}

func unixPeer(nc net.Conn) (Peer, error) {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return Peer{}, fmt.Errorf("not a Unix connection")
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return Peer{}, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Peer{}, err
	}
	if cerr != nil {
		return Peer{}, cerr
	}
	return Peer{Kind: KindUnix, PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}, nil
}

// listenUnix makes a listening Unix socket at path without following a
// symlink at its name (see Listen).
func listenUnix(path string, opt ListenOptions) (net.Listener, func(), error) {
	dir, name := filepath.Split(filepath.Clean(path))
	if name == "" || name == "." || name == ".." {
		return nil, nil, fmt.Errorf("%q names no socket", path)
	}
	if dir == "" {
		dir = "."
	}
	dfd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	ok := false
	defer func() {
		if !ok {
			unix.Close(dfd)
		}
	}()
	var st unix.Stat_t
	if err := unix.Fstat(dfd, &st); err != nil {
		return nil, nil, err
	}
	if st.Uid != 0 && st.Uid != uint32(os.Geteuid()) && st.Uid != opt.TrustUID {
		return nil, nil, fmt.Errorf("directory %s is owned by uid %d, not by root, us or the trusted uid", dir, st.Uid)
	}
	if st.Mode&0o022 != 0 && st.Mode&unix.S_ISVTX == 0 {
		return nil, nil, fmt.Errorf("directory %s (mode %#o) is writable by others", dir, st.Mode&0o7777)
	}
	var old unix.Stat_t
	switch err := unix.Fstatat(dfd, name, &old, unix.AT_SYMLINK_NOFOLLOW); {
	case errors.Is(err, unix.ENOENT):
	case err != nil:
		return nil, nil, &os.PathError{Op: "stat", Path: path, Err: err}
	case old.Mode&unix.S_IFMT != unix.S_IFSOCK:
		return nil, nil, fmt.Errorf("%s exists and is not a socket (mode %#o): refusing to replace it", path, old.Mode)
	case socketServed(fmt.Sprintf("/proc/self/fd/%d/%s", dfd, name)):
		return nil, nil, fmt.Errorf("%s is being served by another process: %w", path, ErrInUse)
	default: // a stale socket from an earlier run
		if err := unix.Unlinkat(dfd, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return nil, nil, &os.PathError{Op: "remove stale socket", Path: path, Err: err}
		}
		if opt.Stale != nil {
			opt.Stale(path)
		}
	}
	// Bind through the directory fd, so no component is looked up again.
	at := fmt.Sprintf("/proc/self/fd/%d/%s", dfd, name)
	if len(at) >= len(unix.RawSockaddrUnix{}.Path) {
		return nil, nil, fmt.Errorf("socket name %q is too long", name)
	}
	l, err := net.Listen("unix", at)
	if err != nil {
		return nil, nil, err
	}
	ul := l.(*net.UnixListener)
	ul.SetUnlinkOnClose(false)
	var mine unix.Stat_t
	if err := unix.Fstatat(dfd, name, &mine, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		l.Close()
		return nil, nil, err
	}
	// The mode while it is still ours (a change after giving it away
	// would need CAP_FOWNER), then to the directory's owner.
	if err := unix.Fchmodat(dfd, name, uint32(opt.Mode.Perm()), 0); err != nil {
		l.Close()
		return nil, nil, err
	}
	_ = unix.Fchownat(dfd, name, int(st.Uid), int(st.Gid), unix.AT_SYMLINK_NOFOLLOW)
	ok = true
	cleanup := func() {
		// Remove the socket only if it is still ours.
		var now unix.Stat_t
		if unix.Fstatat(dfd, name, &now, unix.AT_SYMLINK_NOFOLLOW) == nil && now.Ino == mine.Ino && now.Dev == mine.Dev {
			_ = unix.Unlinkat(dfd, name, 0)
		}
		unix.Close(dfd)
	}
	return l, cleanup, nil
}

// DialTimeout bounds a dial whose context has no deadline, including the
// hybrid-vsock CONNECT exchange.
const DialTimeout = 5 * time.Second

// maxOKLine bounds the VMM's answer to CONNECT.
const maxOKLine = 64

// Dial connects to a: vsock:CID:PORT, hvsock:PATH:PORT (through the VMM's
// CONNECT handshake) or unix:PATH.
func Dial(ctx context.Context, a Addr) (net.Conn, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DialTimeout)
		defer cancel()
	}
	switch a.Kind {
	case KindVsock:
		if a.CID == AnyCID {
			return nil, fmt.Errorf("dial %v: a dial needs a CID (vsock:CID:PORT)", a)
		}
		c, err := vsock.DialContext(ctx, a.CID, a.Port, nil)
		if err != nil {
			return nil, fmt.Errorf("dial %v: %w", a, err)
		}
		return c, nil
	case KindUnix:
		var d net.Dialer
		return d.DialContext(ctx, "unix", a.Path)
	case KindHybrid:
		var d net.Dialer
		nc, err := d.DialContext(ctx, "unix", a.Path)
		if err != nil {
			return nil, fmt.Errorf("dial %v: %w", a, err)
		}
		if err := hybridConnect(ctx, nc, a.Port); err != nil {
			nc.Close()
			return nil, fmt.Errorf("dial %v: %w", a, err)
		}
		return nc, nil
	}
	if a.Kind == KindVMDir {
		return nil, fmt.Errorf("dial %v: a directory of VM sockets is for a host agent to listen on; dial one VM's socket", a)
	}
	return nil, fmt.Errorf("dial: invalid address %+v", a)
}

// hybridConnect asks the VMM for the guest's port and reads its answer,
// "OK <port>\n", a byte at a time so nothing after it is consumed.
func hybridConnect(ctx context.Context, nc net.Conn, port uint32) error {
	deadline, _ := ctx.Deadline()
	if err := nc.SetDeadline(deadline); err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := fmt.Fprintf(nc, "CONNECT %d\n", port); err != nil {
		return fmt.Errorf("CONNECT: %w", err)
	}
	line := make([]byte, 0, maxOKLine)
	var b [1]byte
	for {
		if _, err := nc.Read(b[:]); err != nil {
			return fmt.Errorf("waiting for OK after %q: %w", line, err)
		}
		line = append(line, b[0])
		if b[0] == '\n' {
			break
		}
		if len(line) == maxOKLine {
			return fmt.Errorf("answer to CONNECT longer than %d bytes: %q", maxOKLine, line)
		}
	}
	rest, ok := bytes.CutPrefix(line[:len(line)-1], []byte("OK "))
	if !ok {
		return fmt.Errorf("VMM answered %q to CONNECT %d", line, port)
	}
	if _, err := parseU32(string(rest)); err != nil {
		return fmt.Errorf("VMM answered %q to CONNECT %d: not a port", line, port)
	}
	return nc.SetDeadline(time.Time{})
}

// DialHello dials a and runs the guest's handshake.
func DialHello(ctx context.Context, a Addr, hello Hello, h Handler, opt Options) (*Conn, *Welcome, error) {
	nc, err := Dial(ctx, a)
	if err != nil {
		return nil, nil, err
	}
	return Client(ctx, nc, hello, h, opt)
}

// ErrInUse: another process serves the socket path asked to listen on.
var ErrInUse = errors.New("address in use")

// socketServed reports whether someone accepts connections on the Unix
// socket at path: a socket nobody listens on refuses them at once.
func socketServed(path string) bool {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return !errors.Is(err, unix.ECONNREFUSED) && !errors.Is(err, unix.ENOENT)
	}
	c.Close()
	return true
}
