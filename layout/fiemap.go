package layout

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrNotAllocated: the file has blocks whose place is not final yet
// (delayed allocation), so no layout describes it.
var ErrNotAllocated = errors.New("data not yet allocated")

const (
	fsIocFiemap      = 0xC020660B // FS_IOC_FIEMAP
	fiemapExtentLast = 0x1
	fiemapUnknown    = 0x2 | 0x4 | 0x8 // UNKNOWN, DELALLOC, ENCODED
	fiemapUnwritten  = 0x800
	fiemapInline     = 0x200 // DATA_INLINE
)

// Fiemap reads the layout of the open file fd from the kernel (FIEMAP),
// in blocks of size bs, without syncing it first: a sync could wait on a
// frozen filesystem. Inline data has no layout.
func Fiemap(fd int, bs uint64) ([]Extent, error) {
	const batch = 128
	buf := make([]byte, 32+56*batch)
	var runs []Extent
	start := uint64(0)
	for {
		clear(buf)
		binary.NativeEndian.PutUint64(buf[0:], start)
		binary.NativeEndian.PutUint64(buf[8:], ^uint64(0)-start)
		binary.NativeEndian.PutUint32(buf[24:], batch)
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0]))); e != 0 {
			return nil, fmt.Errorf("FIEMAP: %w", e)
		}
		n := binary.NativeEndian.Uint32(buf[20:])
		if n == 0 {
			return runs, nil
		}
		for i := range n {
			e := buf[32+56*i:]
			logical := binary.NativeEndian.Uint64(e[0:])
			physical := binary.NativeEndian.Uint64(e[8:])
			length := binary.NativeEndian.Uint64(e[16:])
			flags := binary.NativeEndian.Uint32(e[40:])
			switch {
			case flags&fiemapInline != 0:
			case flags&fiemapUnknown != 0:
				return nil, ErrNotAllocated
			default:
				runs = append(runs, Extent{
					Logical: logical / bs, Physical: physical / bs,
					Count: (length + bs - 1) / bs, Unwritten: flags&fiemapUnwritten != 0,
				})
			}
			if flags&fiemapExtentLast != 0 {
				return runs, nil
			}
			start = logical + length
		}
	}
}
