package hostagent

import (
	"errors"
	"fmt"
	"io"
	iofs "io/fs"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// TrustedPath refuses a path the agent acts on as root — a binary it
// runs, its state directory — that anyone but root or the agent's user
// could have put there, as sshd's StrictModes does: with symlinks
// resolved, the file (a regular, executable one when exe) or directory
// must be owned by root or the agent's user and writable by its owner
// only, and so must every directory above it be — or, writable by
// others, sticky (as /tmp is: no one else can remove or rename what is
// in it).
func TrustedPath(path string, exe bool) error {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return err
	}
	me := uint32(os.Geteuid())
	for p, first := real, true; ; p, first = filepath.Dir(p), false {
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return &os.PathError{Op: "lstat", Path: p, Err: err}
		}
		what := "the directory " + p
		if first && exe {
			what = "the binary " + p
		}
		switch {
		case first && exe && (st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&0o111 == 0):
			return fmt.Errorf("%s is not an executable regular file", what)
		case first && !exe && st.Mode&unix.S_IFMT != unix.S_IFDIR:
			return fmt.Errorf("%s is not a directory", p)
		case st.Uid != 0 && st.Uid != me:
			return fmt.Errorf("%s is owned by uid %d, not by root or the agent's user", what, st.Uid)
		case st.Mode&0o022 != 0 && (first || st.Mode&unix.S_ISVTX == 0):
			return fmt.Errorf("%s (mode %#o) is writable by group or others", what, st.Mode&0o7777)
		}
		if p == "/" {
			return nil
		}
	}
}

// ReadTrusted reads a file the agent acts on as root, as sshd and systemd
// read theirs: a regular file (never a FIFO, a device or a directory;
// opened without blocking and without following a symlink at its end),
// owned by root or the agent's user, writable by its owner only, of at
// most max bytes. What fails is an error naming the path and the rule.
func ReadTrusted(path string, max int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_NOFOLLOW|syscall.O_NOCTTY, 0)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return nil, fmt.Errorf("%s is a symlink: name the file itself", path)
		}
		return nil, err
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return nil, &iofs.PathError{Op: "fstat", Path: path, Err: err}
	}
	switch {
	case st.Mode&syscall.S_IFMT != syscall.S_IFREG:
		return nil, fmt.Errorf("%s is not a regular file (mode %#o)", path, st.Mode)
	case st.Uid != 0 && st.Uid != uint32(os.Geteuid()):
		return nil, fmt.Errorf("%s is owned by uid %d, not by root or the agent's user: whoever owns it could make the agent do anything", path, st.Uid)
	case st.Mode&0o022 != 0:
		return nil, fmt.Errorf("%s (mode %#o) is writable by group or others: make it writable by its owner only (chmod go-w)", path, st.Mode&0o7777)
	case st.Size > max:
		return nil, fmt.Errorf("%s is %d bytes, more than the %d a settings file may have", path, st.Size, max)
	}
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s grew past %d bytes while it was read", path, max)
	}
	return b, nil
}
