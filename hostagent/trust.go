package hostagent

import (
	"fmt"
	"os"
	"path/filepath"

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
