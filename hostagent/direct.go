package hostagent

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// align is the alignment of O_DIRECT reads: buffer address, offset and
// length. 4096 covers every logical block size a device has.
const align = 4096

// device reads a block device (or image file) with O_DIRECT, past the
// page cache: after a freeze the cache can hold stale file data for
// blocks that have since become metadata.
type device struct {
	f    *os.File
	size int64
}

func openDevice(path string) (*device, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open O_DIRECT", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	size, err := f.Seek(0, 2)
	if err != nil {
		f.Close()
		return nil, err
	}
	return &device{f: f, size: size}, nil
}

func (d *device) Close() error { return d.f.Close() }

// alignedBuf returns n bytes (a multiple of align) starting at an
// aligned address.
func alignedBuf(n int) []byte {
	b := make([]byte, n+align)
	off := int(-uintptr(unsafe.Pointer(&b[0])) & (align - 1))
	return b[off : off+n : off+n]
}

// ReadAt reads p at off, through an aligned bounce buffer when p or off
// are not aligned.
func (d *device) ReadAt(p []byte, off int64) (int, error) {
	start := off &^ (align - 1)
	end := (off + int64(len(p)) + align - 1) &^ (align - 1)
	direct := start == off && end == off+int64(len(p)) && uintptr(unsafe.Pointer(unsafe.SliceData(p)))&(align-1) == 0
	buf := p
	if !direct {
		buf = alignedBuf(int(end - start))
	}
	n, err := d.f.ReadAt(buf, start)
	if !direct {
		n = max(0, min(n-int(off-start), len(p)))
		copy(p, buf[off-start:])
	}
	if err != nil && n < len(p) {
		return n, fmt.Errorf("reading %s at %d: %w", d.f.Name(), off, err)
	}
	return n, nil
}
