package hostagent

import (
	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/ext4ro"
)

// ext4 writes file data to the device past the device's own page cache,
// so a buffered reader of the device — a hypervisor that serves it to
// guests as a drive without O_DIRECT: Firecracker always, QEMU without
// cache=none — can keep pages of a block's old bytes after the block is
// freed and given to another file. Guests read file data only through a
// lease, and a leased file's blocks are never freed, so the stale pages
// that matter are those of blocks that a changed inode maps now. After
// each publish, before guests hear of it, the agent drops those pages.
// Reads after the drop come from the disk, where syncfs and the freeze
// have put the new bytes. The first publish drops the whole cache
// first, before it reads the inode tables in (warm).
//
// The page cache keeps a device in folios of up to 2 MiB, and a folio
// only partly in a dropped range stays: ranges are widened to 2 MiB
// boundaries, at the cost of dropping some neighbours' clean pages.
const dropAlign = 2 << 20

// dropStaleData drops the device's cached pages of the file data that g
// changed.
func (e *Export) dropStaleData(g *Generation) error {
	fd := int(e.cached.Fd())
	if len(g.ChangedInodes) == 0 {
		return nil
	}
	view, err := ext4ro.Open(g, &ext4ro.Options{CacheBytes: 4 << 20, ReadAhead: 1})
	if err != nil {
		return err
	}
	bs := int64(g.BlockSize)
	for _, ino := range g.ChangedInodes {
		in, err := view.Inode(ino)
		if err != nil || !in.IsRegular() {
			continue // gone, or holds no file data
		}
		m, err := view.Map(in)
		if err != nil {
			return err
		}
		for _, x := range m {
			if x.Unwritten {
				continue // read as zeros, never from the device
			}
			start := int64(x.Physical) * bs / dropAlign * dropAlign
			end := (int64(x.Physical+x.Count)*bs + dropAlign - 1) / dropAlign * dropAlign
			if err := unix.Fadvise(fd, start, end-start, unix.FADV_DONTNEED); err != nil {
				return err
			}
		}
	}
	return nil
}
