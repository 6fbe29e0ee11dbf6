package ext4ro

import (
	"errors"
	"fmt"
	"io/fs"
)

// Error classes. Every error returned by this package matches at most one
// of them under errors.Is; callers map them to errno in one place.
var (
	// ErrCorrupt: the image contradicts itself (bad magic, checksum
	// mismatch, a pointer outside the filesystem, a loop).
	ErrCorrupt = errors.New("corrupt filesystem")
	// ErrUnsupported: the image uses something this reader does not
	// implement; the error names it.
	ErrUnsupported = errors.New("unsupported")
	// ErrNotExist: no such name, or the inode is not in use.
	ErrNotExist = fs.ErrNotExist
	// ErrNotDir: a directory operation on something else.
	ErrNotDir = errors.New("not a directory")
	// ErrIsDir: a file operation on a directory.
	ErrIsDir = errors.New("is a directory")
	// ErrInvalid: a bad argument (a name with '/', an inode number out of
	// range, a negative offset).
	ErrInvalid = fs.ErrInvalid
	// ErrNoXattr: the extended attribute does not exist (ENODATA).
	ErrNoXattr = errors.New("no such extended attribute")
	// ErrEncrypted: the inode is encrypted with fscrypt; its names and
	// contents are ciphertext that this reader never hands out.
	ErrEncrypted = errors.New("encrypted (fscrypt key not available)")
	// ErrNameTooLong: a name over 255 bytes.
	ErrNameTooLong = errors.New("name too long")
)

// CorruptError describes damage found in the image. It matches ErrCorrupt.
type CorruptError struct {
	What  string // the structure: "superblock", "extent block", …
	Ino   uint32 // 0 when no inode is involved
	Block uint64 // 0 when no block is involved
	Err   error  // the detail
}

func (e *CorruptError) Error() string {
	s := "ext4ro: corrupt " + e.What
	if e.Ino != 0 {
		s += fmt.Sprintf(" (inode %d", e.Ino)
		if e.Block != 0 {
			s += fmt.Sprintf(", block %d", e.Block)
		}
		s += ")"
	} else if e.Block != 0 {
		s += fmt.Sprintf(" (block %d)", e.Block)
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *CorruptError) Unwrap() error { return e.Err }

func (e *CorruptError) Is(target error) bool { return target == ErrCorrupt }

func corrupt(what string, ino uint32, block uint64, format string, args ...any) error {
	return &CorruptError{What: what, Ino: ino, Block: block, Err: fmt.Errorf(format, args...)}
}

// errBadChecksum is the detail of every checksum mismatch.
var errBadChecksum = errors.New("checksum mismatch")

func badChecksum(what string, ino uint32, block uint64) error {
	return &CorruptError{What: what, Ino: ino, Block: block, Err: errBadChecksum}
}
