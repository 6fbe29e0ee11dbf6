package upgrade

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// FDStore keeps the files guests hold in systemd's file-descriptor store
// (FileDescriptorStoreMax= in the unit), so that they, and their kernel
// leases, outlive a crash or a restart of the agent: the next run gets
// them back (LISTEN_FDS), takes over the sessions and leases its lease
// journal names, and revokes those whose files were written meanwhile.
// Each file is stored as "lease.EXPORT.INODE"; it is removed from the
// store when let go.
type FDStore struct {
	sock int
	addr *unix.SockaddrUnix
	log  hclog.Logger
	warn *rate.Limiter
}

// ErrNoNotifySocket: a store was asked for, and systemd did not start the
// agent.
var ErrNoNotifySocket = errors.New("systemd's notify socket ($NOTIFY_SOCKET) is not set: the agent is not run by systemd (Type=notify) with FileDescriptorStoreMax=")

// OpenFDStore returns the store if asked for or if systemd says the
// service has one ($FDSTORE, systemd 254), else nil.
func OpenFDStore(asked bool, log hclog.Logger) (*FDStore, error) {
	path := os.Getenv("NOTIFY_SOCKET")
	if n, _ := strconv.Atoi(os.Getenv("FDSTORE")); n <= 0 && !asked {
		return nil, nil
	}
	if path == "" {
		if !asked {
			return nil, nil
		}
		return nil, ErrNoNotifySocket
	}
	if path[0] == '@' {
		path = "\x00" + path[1:]
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("the fd store's socket: %w", err)
	}
	return &FDStore{sock: fd, addr: &unix.SockaddrUnix{Name: path}, log: log, warn: rate.NewLimiter(rate.Every(10e9), 3)}, nil
}

func storeName(export string, ino uint32) string { return fmt.Sprintf("lease.%s.%d", export, ino) }

// send sends one notification, with fd if >= 0. It never blocks: a
// store that cannot take it now does not keep the file, whose leases a
// restart then revokes (never serves wrongly).
func (s *FDStore) send(msg string, fd int) {
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	if err := unix.Sendmsg(s.sock, []byte(msg), oob, s.addr, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL); err != nil && s.warn.Allow() {
		s.log.Warn("systemd's fd store did not take a held file: a restart would revoke its leases", "error", err)
	}
}

// keeper is the store's lease.Keeper for one export.
func (s *FDStore) keeper(export string) *storeKeeper { return &storeKeeper{s, export} }

type storeKeeper struct {
	s      *FDStore
	export string
}

func (k *storeKeeper) Keep(ino uint32, fd int) {
	k.s.send("FDSTORE=1\nFDPOLL=0\nFDNAME="+storeName(k.export, ino), fd)
}

func (k *storeKeeper) Forget(ino uint32) {
	k.s.send("FDSTOREREMOVE=1\nFDNAME="+storeName(k.export, ino), -1)
}

// storedFiles takes the held files systemd's store gave this run, by
// export and inode. Anything else passed is closed.
func storedFiles(log hclog.Logger) map[string]map[uint32]int {
	out := map[string]map[uint32]int{}
	for _, f := range activation.Files(true) {
		rest, ok := strings.CutPrefix(f.Name(), "lease.")
		i := strings.LastIndexByte(rest, '.')
		var ino uint64
		var err error
		if ok && i > 0 {
			ino, err = strconv.ParseUint(rest[i+1:], 10, 32)
		}
		if !ok || i <= 0 || err != nil {
			log.Warn("a descriptor passed by systemd is not a held file; closing it", "name", f.Name())
			f.Close()
			continue
		}
		export := rest[:i]
		if out[export] == nil {
			out[export] = map[uint32]int{}
		}
		// The descriptor is the coordinator's from now on, by number.
		fd, err := unix.Dup(fdOf(f))
		f.Close()
		if err != nil {
			log.Warn("a held file from the fd store", "error", err)
			continue
		}
		unix.CloseOnExec(fd)
		out[export][uint32(ino)] = fd
	}
	return out
}
