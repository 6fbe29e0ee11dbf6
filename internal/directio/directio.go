// Package directio reads block devices and image files with O_DIRECT.
package directio

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Align is the alignment of O_DIRECT reads: buffer address, offset and
// length. 4096 covers every logical block size a device has.
const Align = 4096

// File reads a block device (or image file) with O_DIRECT, past the page
// cache: after a freeze the cache can hold stale file data for blocks that
// have since become metadata, and a guest must see the device as the host
// wrote it.
type File struct {
	f    *os.File
	size int64
}

// Open opens path read-only with O_DIRECT.
func Open(path string) (*File, error) {
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
	return &File{f: f, size: size}, nil
}

// Close closes the file.
func (d *File) Close() error { return d.f.Close() }

// Size is the size of the device or file.
func (d *File) Size() int64 { return d.size }

// AlignedBuf returns n bytes (a multiple of Align) starting at an
// aligned address.
func AlignedBuf(n int) []byte {
	b := make([]byte, n+Align)
	off := int(-uintptr(unsafe.Pointer(&b[0])) & (Align - 1))
	return b[off : off+n : off+n]
}

// ReadAt reads p at off, through an aligned bounce buffer when p or off
// are not aligned.
func (d *File) ReadAt(p []byte, off int64) (int, error) {
	start := off &^ (Align - 1)
	end := (off + int64(len(p)) + Align - 1) &^ (Align - 1)
	direct := start == off && end == off+int64(len(p)) && uintptr(unsafe.Pointer(unsafe.SliceData(p)))&(Align-1) == 0
	buf := p
	if !direct {
		buf = AlignedBuf(int(end - start))
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
