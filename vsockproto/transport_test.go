package vsockproto

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseAddr(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Addr
		err  string
	}{
		{in: "vsock:5000", want: Addr{Kind: KindVsock, CID: AnyCID, Port: 5000}},
		{in: "vsock:2:5000", want: Addr{Kind: KindVsock, CID: 2, Port: 5000}},
		{in: "hvsock:/run/fc/v.sock:52", want: Addr{Kind: KindHybrid, Path: "/run/fc/v.sock", Port: 52}},
		{in: "hvsock:/odd:dir/v.sock:52", want: Addr{Kind: KindHybrid, Path: "/odd:dir/v.sock", Port: 52}},
		{in: "hvsock-dir:/srv/vms:5000", want: Addr{Kind: KindVMDir, Path: "/srv/vms", Port: 5000}},
		{in: "hvsock-dir:/srv/vms", err: "want hvsock-dir:PATH:PORT"},
		{in: "unix:/run/leasefs.sock", want: Addr{Kind: KindUnix, Path: "/run/leasefs.sock"}},
		{in: "unix:rel:ative", want: Addr{Kind: KindUnix, Path: "rel:ative"}},
		{in: "vsock:", err: "want vsock:PORT"},
		{in: "vsock:-1", err: "bad port"},
		{in: "vsock:4294967296", err: "bad port"},
		{in: "vsock:+5", err: "bad port"},
		{in: "vsock:4294967295:1", err: "bad CID"},
		{in: "vsock:2:", err: "bad port"},
		{in: "hvsock:/x", err: "want hvsock:PATH:PORT"},
		{in: "hvsock::5", err: "want hvsock:PATH:PORT"},
		{in: "hvsock:/x:p", err: "bad port"},
		{in: "tcp:1.2.3.4:5", err: "unknown transport"},
		{in: "/run/x.sock", err: "want vsock:PORT"},
	} {
		got, err := ParseAddr(c.in)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%q: got %+v, %v; want error %q", c.in, got, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%q: got %+v, %v; want %+v", c.in, got, err, c.want)
		}
		if got.String() != c.in {
			t.Errorf("%q: String() = %q", c.in, got.String())
		}
	}
}

func mustAddr(t *testing.T, s string) Addr {
	t.Helper()
	a, err := ParseAddr(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// unixPair listens on a fresh Unix socket, dials it, and returns the
// accepted end and the peer the listener named.
func unixPair(t *testing.T) (net.Conn, Peer) {
	t.Helper()
	a := mustAddr(t, "unix:"+filepath.Join(t.TempDir(), "s"))
	l, err := Listen(a, ListenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	nc, err := Dial(context.Background(), a)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	sc, peer, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sc.Close() })
	return sc, peer
}

func TestUnixPeerIsCredentials(t *testing.T) {
	_, peer := unixPair(t)
	if peer.Kind != KindUnix || int(peer.PID) != os.Getpid() || int(peer.UID) != os.Geteuid() {
		t.Fatalf("peer %+v, want pid %d uid %d", peer, os.Getpid(), os.Geteuid())
	}
}

// The hygiene of a listening Unix socket: a stale socket is replaced, a
// planted symlink or file is refused and left alone, a directory others
// can write to is refused, and Close removes only our own socket.
func TestUnixSocketHygiene(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "v.sock_5000")
	a := mustAddr(t, "hvsock:"+filepath.Join(dir, "v.sock")+":5000")

	// A stale socket from an earlier run.
	stale, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()
	l, err := Listen(a, ListenOptions{VM: "vm1"})
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil || st.Mode&0o777 != 0o660 {
		t.Fatalf("socket mode %#o, %v", st.Mode&0o777, err)
	}
	// A live socket is never taken over: a second agent is refused, and
	// the first keeps its socket.
	if l2, err := Listen(a, ListenOptions{VM: "vm1"}); !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), path) {
		if l2 != nil {
			l2.Close()
		}
		t.Fatalf("over a live socket: %v, want ErrInUse naming it", err)
	}
	if c, err := net.Dial("unix", path); err != nil {
		t.Fatalf("the first listener lost its socket: %v", err)
	} else {
		c.Close()
	}
	l.Close()
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}

	// A planted symlink to a file the agent must never touch.
	victim := filepath.Join(dir, "victim")
	os.WriteFile(victim, []byte("keep"), 0o600)
	if err := os.Symlink(victim, path); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(a, ListenOptions{}); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("over a symlink: %v", err)
	}
	if b, err := os.ReadFile(victim); err != nil || string(b) != "keep" {
		t.Fatalf("victim changed: %q %v", b, err)
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("planted symlink was touched: %v %v", fi, err)
	}
	os.Remove(path)

	// Our socket replaced by someone else's file is not removed on Close.
	l, err = Listen(a, ListenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(path)
	os.WriteFile(path, []byte("theirs"), 0o600)
	l.Close()
	if b, _ := os.ReadFile(path); string(b) != "theirs" {
		t.Fatal("Close removed a file that was not our socket")
	}
	os.Remove(path)

	// A directory anyone can write to.
	open := filepath.Join(dir, "open")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777)
	if _, err := Listen(mustAddr(t, "unix:"+filepath.Join(open, "s")), ListenOptions{}); err == nil || !strings.Contains(err.Error(), "writable by others") {
		t.Fatalf("in a world-writable directory: %v", err)
	}
	// A directory owned by an untrusted user.
	if os.Geteuid() == 0 {
		other := filepath.Join(dir, "other")
		os.Mkdir(other, 0o755)
		os.Chown(other, 4242, 4242)
		if _, err := Listen(mustAddr(t, "unix:"+filepath.Join(other, "s")), ListenOptions{}); err == nil || !strings.Contains(err.Error(), "owned by uid 4242") {
			t.Fatalf("in another user's directory: %v", err)
		}
		l, err := Listen(mustAddr(t, "unix:"+filepath.Join(other, "s")), ListenOptions{TrustUID: 4242})
		if err != nil {
			t.Fatalf("with TrustUID: %v", err)
		}
		var st unix.Stat_t
		if unix.Lstat(filepath.Join(other, "s"), &st) != nil || st.Uid != 4242 {
			t.Fatalf("socket owner %d, want the directory's owner 4242", st.Uid)
		}
		l.Close()
	}
}

// Guest to host over hybrid vsock: Firecracker delivers a guest's
// connection to port P by connecting to <uds>_P; this test plays
// Firecracker, and the host sees the configured VM as the peer.
func TestHybridGuestToHost(t *testing.T) {
	dir := t.TempDir()
	a := mustAddr(t, "hvsock:"+filepath.Join(dir, "v.sock")+":5000")
	l, err := Listen(a, ListenOptions{VM: "vm7"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	done := make(chan error, 1)
	go func() {
		nc, peer, err := l.Accept()
		if err != nil {
			done <- err
			return
		}
		if peer.Kind != KindHybrid || peer.VM != "vm7" || peer.String() != "vm vm7" {
			done <- fmt.Errorf("peer %+v", peer)
			return
		}
		c, hello, err := Server(context.Background(), nc, welcome(nil), Options{})
		if err == nil {
			defer c.Close()
			if hello.Export != "x" {
				err = fmt.Errorf("hello %+v", hello)
			}
		}
		done <- err
	}()
	// Firecracker's side: connect to <uds>_5000 and pass the guest's bytes.
	nc, err := net.Dial("unix", filepath.Join(dir, "v.sock_5000"))
	if err != nil {
		t.Fatal(err)
	}
	c, w, err := Client(context.Background(), nc, Hello{Export: "x"}, nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if w.BlockSize != 4096 {
		t.Fatalf("welcome %+v", w)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// fakeVMM listens on <uds> as Firecracker does and answers each CONNECT
// with answer (after delay); when answer is a proper OK it then serves the
// host side of the protocol, as the guest's listener would, with the
// first frame sent in the same write as the OK line.
func fakeVMM(t *testing.T, answer string, delay time.Duration) Addr {
	t.Helper()
	uds := filepath.Join(t.TempDir(), "v.sock")
	l, err := net.Listen("unix", uds)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			nc, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer nc.Close()
				line, err := bufio.NewReader(nc).ReadString('\n')
				if err != nil || line != "CONNECT 5000\n" {
					return
				}
				time.Sleep(delay)
				if answer != "OK 1073741824\n" {
					nc.Write([]byte(answer))
					time.Sleep(2 * time.Second)
					return
				}
				// The OK line and the guest's first frame (a Ping) in
				// one write: the dialer must not swallow the frame.
				nc.Write(append([]byte(answer), AppendFrame(nil, 1, &Ping{})...))
				h, _, err := ReadFrame(nc, MaxFrame)
				if err == nil && h.Type == TypePong {
					nc.Write([]byte("pong seen"))
				}
			}()
		}
	}()
	return mustAddr(t, "hvsock:"+uds+":5000")
}

// Host to guest over hybrid vsock: connect to <uds>, CONNECT P, OK.
func TestHybridHostToGuest(t *testing.T) {
	a := fakeVMM(t, "OK 1073741824\n", 0)
	nc, err := Dial(context.Background(), a)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	h, _, err := ReadFrame(nc, MaxFrame)
	if err != nil || h.Type != TypePing {
		t.Fatalf("first frame after OK: %v %v", h, err)
	}
	nc.Write(AppendFrame(nil, 1, &Pong{}))
	buf := make([]byte, 9)
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := nc.Read(buf); err != nil || string(buf) != "pong seen" {
		t.Fatalf("got %q %v", buf, err)
	}
}

func TestHybridDialRejectsBadAnswers(t *testing.T) {
	for _, c := range []struct {
		name, answer string
		delay        time.Duration
		want         string
	}{
		{"refused", "", 0, "waiting for OK"},
		{"not OK", "NOPE\n", 0, `answered "NOPE\n"`},
		{"OK without newline", "OK 5", 0, "waiting for OK"},
		{"too long", "OK " + strings.Repeat("1", 100) + "\n", 0, "longer than 64 bytes"},
		{"not a number", "OK abc\n", 0, "not a port"},
		{"negative", "OK -1\n", 0, "not a port"},
		{"slow", "OK 1073741824\n", 3 * time.Second, "waiting for OK"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			a := fakeVMM(t, c.answer, c.delay)
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			defer cancel()
			start := time.Now()
			nc, err := Dial(ctx, a)
			if err == nil {
				nc.Close()
				t.Fatal("dial succeeded")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want %q", err, c.want)
			}
			if time.Since(start) > 2*time.Second {
				t.Fatalf("took %v with a 500ms deadline", time.Since(start))
			}
		})
	}
}

// AF_VSOCK exists on this machine (it runs in a VM) but has no loopback
// transport, so only listening can be exercised for real here.
func TestVsockListen(t *testing.T) {
	if _, err := os.Stat("/dev/vsock"); err != nil {
		t.Skip("no AF_VSOCK on this machine (/dev/vsock missing)")
	}
	l, err := Listen(mustAddr(t, "vsock:0"), ListenOptions{})
	if errors.Is(err, unix.EAFNOSUPPORT) {
		t.Skip("AF_VSOCK not supported by this kernel")
	}
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	if _, err := Dial(context.Background(), mustAddr(t, "vsock:5000")); err == nil || !strings.Contains(err.Error(), "needs a CID") {
		t.Fatalf("dial without a CID: %v", err)
	}
}
