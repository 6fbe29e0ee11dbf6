// Package guestagent is the guest side of leasefs: a read-only FUSE
// filesystem over an ext4ro view (FileSystem), and the client that keeps
// that view on the host's generations (Client).
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
// # The live guest
//
// Client connects to the host agent and serves its current generation.
// A generation's view is an ext4ro.FS whose metadata reader is a
// genView: blocks it has, or fetched from the host (ReadMeta) in one
// request per miss and kept. Moving to generation G (Refresh) makes a new
// view that keeps every cached block the announcements since say did not
// change, swaps it into the FileSystem, then tells the kernel what
// changed — each changed inode's attributes and pages, and in each
// changed directory the names that went, came (cached misses) or now
// name another inode, found by comparing the two listings — and only
// then acknowledges G. This runs on the goroutine that handles the
// announcement, never inside a FUSE request and never under our locks.
// ClientConfig.Follow says when to move: always, at most once per
// interval, or only when told (Refresh; SIGHUP for 'leasefs guest').
//
// Opening a regular file takes a lease on it at the view's generation;
// the open file keeps that view's inode, attributes (GETATTR with a file
// handle) and block map (ext4ro.File), so it reads the same bytes however
// the host replaces or deletes it. Data come from the shared device,
// through that map with O_DIRECT, or through the lease over the
// connection. An open the host answers stale, busy or not found (the file
// changed or went after this generation) waits up to BusyWait for a newer
// generation, moves to it and tries the same inode there; otherwise it
// fails with ESTALE or EBUSY. A break fences the file once the reads in
// flight are done, drops its pages and acknowledges; later reads are
// ESTALE. If a reconnect does not resume the session (the host agent
// restarted), every open file is fenced the same way: never different
// bytes.
//
// Lock order: Client.switchMu (one switch at a time) before Client.mu;
// a leasedFile's mu is taken with neither held.
//
// # What FUSE cannot show
//
// The kernel's FUSE layer clamps nanoseconds to 999999999; an inode whose
// extra time field holds more (only a damaged or hand-edited one does)
// shows the clamped value, where the kernel's ext4 shows the stored one.
package guestagent
