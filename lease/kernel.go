package lease

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The kernel interfaces this package uses, each in one small function.

const (
	fOwnerTID       = 0          // F_OWNER_TID, for F_SETOWN_EX
	fsIocGetVersion = 0x80087601 // FS_IOC_GETVERSION: i_generation
	fileidIno32Gen  = 1          // FILEID_INO32_GEN: u32 inode, u32 generation
)

// openInode opens inode ino (incarnation igen; 0 matches any) on the
// filesystem of mountFD, read-only. It looks at the inode through an
// O_PATH descriptor first, so a FIFO or device is refused without ever
// being opened; a regular file is then reopened through /proc/self/fd,
// which names exactly the inode already found.
func openInode(mountFD int, ino, igen uint32) (int, unix.Stat_t, error) {
	var st unix.Stat_t
	var h [8]byte
	binary.NativeEndian.PutUint32(h[0:], ino)
	binary.NativeEndian.PutUint32(h[4:], igen)
	pfd, err := unix.OpenByHandleAt(mountFD, unix.NewFileHandle(fileidIno32Gen, h[:]), unix.O_PATH|unix.O_CLOEXEC)
	for try := 0; errors.Is(err, unix.ENOMEM) && try < 3; try++ {
		// Seen on 6.18 for an inode a writer had just unlinked and
		// freed (the consistency torture, a few times a minute), not
		// only when memory is short: try again, then call it gone.
		time.Sleep(time.Millisecond)
		pfd, err = unix.OpenByHandleAt(mountFD, unix.NewFileHandle(fileidIno32Gen, h[:]), unix.O_PATH|unix.O_CLOEXEC)
	}
	if err != nil {
		switch {
		case errors.Is(err, unix.ESTALE), errors.Is(err, unix.ENOENT), errors.Is(err, unix.ENOMEM):
			return -1, st, fmt.Errorf("%w: inode %d generation %d (%v)", ErrNotFound, ino, igen, err)
		case errors.Is(err, unix.EMFILE), errors.Is(err, unix.ENFILE):
			return -1, st, fmt.Errorf("%w: open_by_handle_at inode %d: %v", ErrExhausted, ino, err)
		}
		return -1, st, fmt.Errorf("open_by_handle_at inode %d: %w", ino, err)
	}
	defer unix.Close(pfd)
	if err := unix.Fstat(pfd, &st); err != nil {
		return -1, st, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return -1, st, fmt.Errorf("%w: inode %d has mode %#o", ErrNotRegular, ino, st.Mode)
	}
	// O_NONBLOCK: an open that would wait for someone's write lease to
	// be broken fails with EAGAIN instead.
	fd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(pfd), unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOATIME|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.EAGAIN) {
		return -1, st, fmt.Errorf("%w: inode %d has a write lease", ErrBusy, ino)
	}
	if errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) || errors.Is(err, unix.ENOMEM) {
		return -1, st, fmt.Errorf("%w: reopen inode %d: %v", ErrExhausted, ino, err)
	}
	if err != nil {
		return -1, st, fmt.Errorf("reopen inode %d: %w", ino, err)
	}
	return fd, st, nil
}

// iGeneration reads the inode's i_generation.
func iGeneration(fd int) (uint32, error) {
	var v uint64 // the ioctl writes a long; ext4 keeps 32 bits
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), fsIocGetVersion, uintptr(unsafe.Pointer(&v))); e != 0 {
		return 0, e
	}
	return uint32(v), nil
}

// takeLease takes a read lease on fd whose breaks arrive as signal sig
// at thread tid. F_SETLEASE points the file's owner at the whole process,
// so the owner is set after it.
func takeLease(fd, sig, tid int) error {
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETSIG, sig); err != nil {
		return fmt.Errorf("F_SETSIG: %w", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETLEASE, unix.F_RDLCK); err != nil {
		return err
	}
	owner := struct {
		typ int32
		pid int32
	}{fOwnerTID, int32(tid)}
	if _, _, e := unix.Syscall(unix.SYS_FCNTL, uintptr(fd), unix.F_SETOWN_EX, uintptr(unsafe.Pointer(&owner))); e != 0 {
		dropLease(fd)
		return fmt.Errorf("F_SETOWN_EX: %w", e)
	}
	return nil
}

// leaseHeld reports whether fd still holds its read lease: false once a
// break has started, or after the kernel revoked it.
func leaseHeld(fd int) bool {
	t, err := unix.FcntlInt(uintptr(fd), unix.F_GETLEASE, 0)
	return err == nil && t == unix.F_RDLCK
}

// dropLease releases fd's lease, letting a waiting writer go. It never
// blocks.
func dropLease(fd int) { _, _ = unix.FcntlInt(uintptr(fd), unix.F_SETLEASE, unix.F_UNLCK) }
