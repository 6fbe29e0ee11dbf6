package guestagent

import (
	"errors"
	"syscall"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/vsockproto"
)

// Errors the guest makes, mapped to ESTALE, EBUSY and EIO.
var (
	// ErrStale: the file is not what the guest's generation says (it
	// changed or went on the host, or its lease was lost); open it again.
	ErrStale = errors.New("the file changed on the host; open it again")
	// ErrBusy: a writer on the host has the file open.
	ErrBusy = errors.New("the file is being written on the host")
	// errNotConnected: no connection to the host came up in time.
	errNotConnected = errors.New("not connected to the host")
)

// errnoOf is the one place where an error becomes what an application
// sees, and whether it is worth a log line (damage or failure, as
// opposed to an answer about the caller's request).
func errnoOf(err error) (errno syscall.Errno, log bool) {
	var pe *vsockproto.Error
	switch {
	case errors.Is(err, ext4ro.ErrNotExist):
		return syscall.ENOENT, false
	case errors.Is(err, ext4ro.ErrNotDir):
		return syscall.ENOTDIR, false
	case errors.Is(err, ext4ro.ErrIsDir):
		return syscall.EISDIR, false
	case errors.Is(err, ext4ro.ErrNameTooLong):
		return syscall.ENAMETOOLONG, false
	case errors.Is(err, ext4ro.ErrNoXattr):
		return syscall.ENODATA, false
	case errors.Is(err, ext4ro.ErrInvalid):
		return syscall.EINVAL, false
	case errors.Is(err, ErrStale):
		return syscall.ESTALE, false
	case errors.Is(err, ErrExportGone):
		return syscall.ESTALE, false
	case errors.Is(err, ErrBusy):
		return syscall.EBUSY, false
	case errors.Is(err, errInterrupted):
		return syscall.EINTR, false
	case errors.Is(err, ext4ro.ErrEncrypted):
		return syscall.EACCES, true
	case errors.Is(err, ext4ro.ErrCorrupt):
		return syscall.EUCLEAN, true // as the kernel's ext4 reports it
	case errors.Is(err, ext4ro.ErrUnsupported):
		return syscall.ENOTSUP, true
	case errors.As(err, &pe):
		if e, ok := protoErrnos[pe.Code]; ok {
			return e.errno, e.log
		}
	}
	return syscall.EIO, true // transport or device failure
}

// protoErrnos is how each answer of the host reaches an application.
var protoErrnos = map[vsockproto.Code]struct {
	errno syscall.Errno
	log   bool
}{
	// The file or generation is not what this guest's view says: the
	// application opens it again (the kernel itself retries an open
	// that fails with ESTALE once, with a fresh lookup).
	vsockproto.CodeStale:      {syscall.ESTALE, false}, // changed on the host since
	vsockproto.CodeNotFound:   {syscall.ESTALE, false}, // gone on the host since
	vsockproto.CodeNotRegular: {syscall.ESTALE, false}, // another file has its number
	vsockproto.CodeGone:       {syscall.ESTALE, false}, // the generation is no longer kept
	vsockproto.CodeBadLease:   {syscall.ESTALE, false}, // the session that held it is gone
	vsockproto.CodeRevoked:    {syscall.ESTALE, false}, // its break was not acknowledged in time
	// The host's copy of the generation disagrees with ours about the
	// file (an Open's fields, its layout): a fresh view is the remedy.
	vsockproto.CodeInvalid: {syscall.ESTALE, true},
	vsockproto.CodeBusy:    {syscall.EBUSY, false}, // a writer on the host has it
	// This guest holds as many files open as the host allows it.
	vsockproto.CodeQuota: {syscall.EMFILE, true},
	// The host stayed at a passing limit (bytes or requests in flight)
	// for as long as the guest retried.
	vsockproto.CodeRetry: {syscall.EAGAIN, true},
	// Failures: ours, the host's, or the two disagreeing on the protocol.
	vsockproto.CodeTooBig:       {syscall.EIO, true},
	vsockproto.CodeInternal:     {syscall.EIO, true},
	vsockproto.CodeProtocol:     {syscall.EIO, true},
	vsockproto.CodeNotSupported: {syscall.EIO, true},
	vsockproto.CodeVersion:      {syscall.EIO, true},
	vsockproto.CodeNoExport:     {syscall.EIO, true},
}
