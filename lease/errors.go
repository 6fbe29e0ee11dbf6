package lease

import "errors"

// Errors of Acquire and the other lease operations. The host agent maps
// each to one protocol error code.
var (
	ErrStale       = errors.New("lease: the file no longer matches its generation")
	ErrBusy        = errors.New("lease: the file is open for writing on the host")
	ErrNotFound    = errors.New("lease: no such inode")
	ErrNotRegular  = errors.New("lease: not a regular file")
	ErrQuota       = errors.New("lease: limit reached")
	ErrUnknown     = errors.New("lease: no such lease on this session")
	ErrRevoked     = errors.New("lease: revoked: its break was not acknowledged in time")
	ErrNotBreaking = errors.New("lease: acknowledged a break that was not sent")
	ErrNoSession   = errors.New("lease: no such session")
	ErrClosed      = errors.New("lease: coordinator or session closed")
	// ErrExhausted: the host ran out of descriptors or memory opening
	// the file, which passes; try again.
	ErrExhausted = errors.New("lease: the host is out of descriptors or memory")
)
