package testenv

import (
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// FakeSystemd plays systemd's side of a service's notify socket and
// file-descriptor store: it keeps the descriptors sent with FDSTORE=1
// under their FDNAME, drops them on FDSTOREREMOVE=1, and passes them to
// the next start as LISTEN_FDS and LISTEN_FDNAMES.
type FakeSystemd struct {
	Path  string // the notify socket ($NOTIFY_SOCKET)
	t     testing.TB
	fd    int
	mu    sync.Mutex
	store map[string][]int // guarded by mu
	msgs  []string         // the other messages, in order; guarded by mu
}

// NewFakeSystemd listens on a notify socket until t ends.
func NewFakeSystemd(t testing.TB) *FakeSystemd {
	s := &FakeSystemd{t: t, Path: filepath.Join(t.TempDir(), "notify.sock"), store: map[string][]int{}}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: s.Path}); err != nil {
		t.Fatal(err)
	}
	s.fd = fd
	done := make(chan struct{})
	go s.run(done)
	t.Cleanup(func() {
		unix.Shutdown(fd, unix.SHUT_RDWR)
		unix.Close(fd)
		<-done
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, fds := range s.store {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
	})
	return s
}

func (s *FakeSystemd) run(done chan struct{}) {
	defer close(done)
	buf, oob := make([]byte, 4096), make([]byte, unix.CmsgSpace(64*4))
	for {
		n, oobn, _, _, err := unix.Recvmsg(s.fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err != nil || n == 0 && oobn == 0 {
			return
		}
		var fds []int
		if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, m := range msgs {
				if r, err := unix.ParseUnixRights(&m); err == nil {
					fds = append(fds, r...)
				}
			}
		}
		vars := map[string]string{}
		for _, line := range strings.Split(string(buf[:n]), "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				vars[k] = v
			}
		}
		s.mu.Lock()
		switch {
		case vars["FDSTORE"] == "1":
			s.store[vars["FDNAME"]] = append(s.store[vars["FDNAME"]], fds...)
			fds = nil
		case vars["FDSTOREREMOVE"] == "1":
			for _, fd := range s.store[vars["FDNAME"]] {
				unix.Close(fd)
			}
			delete(s.store, vars["FDNAME"])
		default:
			s.msgs = append(s.msgs, string(buf[:n]))
		}
		s.mu.Unlock()
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
}

// Messages is every message other than the fd store's, in order, one
// per line group, as sent.
func (s *FakeSystemd) Messages() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.msgs, "\n")
}

// Status is the last STATUS= sent.
func (s *FakeSystemd) Status() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := len(s.msgs) - 1; i >= 0; i-- {
		for line := range strings.SplitSeq(s.msgs[i], "\n") {
			if v, ok := strings.CutPrefix(line, "STATUS="); ok {
				return v
			}
		}
	}
	return ""
}

// Names lists the names stored.
func (s *FakeSystemd) Names() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Sorted(maps.Keys(s.store))
}

// Start is how systemd would start bin with args, for exec.Cmd: the
// program, its arguments, the environment to add (the notify socket,
// $FDSTORE as systemd 254 sets it, or --fd-store for older ones) and the
// stored descriptors, passed from fd 3 on (LISTEN_PID is set by a shell
// that execs the agent, whose pid it then is).
func (s *FakeSystemd) Start(bin string, args []string, v254 bool) (prog string, argv, env []string, extra []*os.File) {
	s.mu.Lock()
	defer s.mu.Unlock()
	prog = "/bin/sh"
	argv = append([]string{"-c", `LISTEN_PID=$$ exec "$0" "$@"`, bin}, args...)
	env = []string{"NOTIFY_SOCKET=" + s.Path, "FDSTORE=", "LISTEN_FDS=", "LISTEN_FDNAMES="}
	if v254 {
		env = append(env, "FDSTORE=4096")
	} else {
		argv = append(argv, "--fd-store")
	}
	var names []string
	for _, name := range slices.Sorted(maps.Keys(s.store)) {
		for _, fd := range s.store[name] {
			// A copy of its own: the agent's start closes it.
			d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
			if err != nil {
				s.t.Fatal(err)
			}
			extra = append(extra, os.NewFile(uintptr(d), name))
			names = append(names, name)
		}
	}
	if len(names) > 0 {
		env = append(env, "LISTEN_FDS="+strconv.Itoa(len(names)), "LISTEN_FDNAMES="+strings.Join(names, ":"))
	}
	return prog, argv, env, extra
}
