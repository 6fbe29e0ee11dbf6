package hostagent

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrLocked is what a lock another host agent holds gives.
var ErrLocked = errors.New("held by another leasefs host agent")

// lockFD takes an exclusive flock on the open directory fd without
// waiting. The kernel drops it when the last descriptor of that open
// file goes, so a dead agent's lock is never in the way. what names
// the directory in the error, which names the holder's pid when
// /proc/locks tells it.
func lockFD(fd int, what string) error {
	err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EWOULDBLOCK) {
		return fmt.Errorf("locking %s: %w", what, err)
	}
	if pid := flockHolder(fd); pid > 0 {
		return fmt.Errorf("%s is %w (pid %d): one agent per export and state directory", what, ErrLocked, pid)
	}
	return fmt.Errorf("%s is %w: one agent per export and state directory", what, ErrLocked)
}

// flockHolder returns the pid /proc/locks names for the flock on fd's
// inode, or 0.
func flockHolder(fd int) int {
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil {
		return 0
	}
	f, err := os.Open("/proc/locks")
	if err != nil {
		return 0
	}
	defer f.Close()
	// "1: FLOCK  ADVISORY  WRITE 4242 fd:01:131074 0 EOF"; waiters have
	// "->" after the number. Device numbers are hex, the inode decimal.
	want := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 6 || f[1] != "FLOCK" || f[5] != want {
			continue
		}
		if pid, err := strconv.Atoi(f[4]); err == nil && pid != os.Getpid() {
			return pid
		}
	}
	return 0
}

// LockStateDir makes the host agent the only one using dir (it records
// freezes and generation numbers there, and keeps its block store): it
// opens and flocks dir, until the returned file is closed.
func LockStateDir(dir string) (*os.File, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if err := lockFD(int(f.Fd()), "the state directory "+dir); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// AdoptStateLock takes over the state directory's lock a predecessor
// handed over (an upgrade): fd, open on dir and locked.
func AdoptStateLock(fd int, dir string) (*os.File, error) {
	unix.CloseOnExec(fd)
	f := os.NewFile(uintptr(fd), dir)
	var a, b unix.Stat_t
	if err := unix.Fstat(fd, &a); err != nil {
		f.Close()
		return nil, fmt.Errorf("the state directory's lock handed over: %w", err)
	}
	if err := unix.Stat(dir, &b); err != nil || a.Dev != b.Dev || a.Ino != b.Ino {
		f.Close()
		return LockStateDir(dir) // another directory now: lock it afresh
	}
	if err := lockFD(fd, "the state directory "+dir); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}
