// Package guestagent is the guest side of leasefs: a read-only FUSE
// filesystem over an ext4ro view.
//
// # Node ids
//
// FileSystem uses go-fuse's raw API. A FUSE node id is the ext4 inode
// number (the root, inode 2, is FUSE's node 1, and node 2 is never handed
// out), and the entry generation is the inode's i_generation. So the
// filesystem keeps no table of nodes: LOOKUP and FORGET need no
// bookkeeping, memory does not grow with the number of inodes the kernel
// holds, and any node id can be answered straight from the view.
//
// # Kernel caching
//
// Entries, negative entries, attributes, directory listings
// (FOPEN_CACHE_DIR) and file pages (FOPEN_KEEP_CACHE) are cached by the
// kernel for Config.Timeout, and explicit data cache control is on, so the
// kernel never drops pages because an mtime changed. Whatever changes the
// view must invalidate what changed. For a static image nothing changes,
// and Config.NoOpen lets the kernel open files and directories without a
// round trip.
//
// # Errors
//
// FileSystem.status is the one place where errors become errnos: ENOENT,
// ENOTDIR, EISDIR, ENAMETOOLONG, ENODATA and EINVAL for the caller's
// mistakes; EACCES for encrypted inodes; EUCLEAN (as the kernel's ext4
// says "structure needs cleaning") for a corrupt image; ENOTSUP for what
// the reader does not implement; EIO for failed I/O. The last four are
// logged: a burst of ten lines, then at most one a second. Every write
// operation is EROFS, and the mount itself is read-only.
//
// # What FUSE cannot show
//
// The kernel's FUSE layer clamps nanoseconds to 999999999; an inode whose
// extra time field holds more (only a damaged or hand-edited one does)
// shows the clamped value, where the kernel's ext4 shows the stored one.
package guestagent
