// Package guestagent is the guest side of leasefs: a read-only FUSE
// filesystem over an ext4ro view (FileSystem), and the client that keeps
// that view on the host's generations (Client).
//
// # Node ids
//
// FileSystem uses go-fuse's raw API. A FUSE node id is the ext4 inode
// number with a 31-bit tag above it: for a regular file a digest of
// its version (ext4ro Inode.Version: i_generation, size, times, block
// map), for anything else its i_generation (the root, inode 2, is FUSE's
// node 1, and node 2 is never handed out). Ids with the top bit set are
// the .generations directory's (browse.go): a kept generation's tree is
// the slot the mount gave that generation with each inode's number,
// resolved in that generation alone, which never changes. So an inode number the host
// reuses for another file is another node; a file changed in place is
// another node too, another kernel inode, whose pages and attributes
// never mix with another version's; a directory keeps its node, and the
// kernel its children, across changes; and any node id can be answered
// straight from the view. A node the view served no longer has, of a
// version held open, is answered from that open file's view: the file
// can be opened again through /proc/PID/fd/N or /proc/PID/exe (the opens
// share its reader) for as long as it is held. For a live view the filesystem also
// counts the kernel's references (nodes.go): each LOOKUP reply and
// READDIRPLUS entry adds one, FORGET takes them away, and a node at zero
// is dropped, so its memory follows the kernel's inode cache. A static
// image keeps no count: nothing ever needs invalidating.
//
// # Kernel caching
//
// Entries, negative entries, attributes, directory listings
// (FOPEN_CACHE_DIR) and file pages (FOPEN_KEEP_CACHE) are cached by the
// kernel for Config.Timeout, and explicit data cache control is on, so the
// kernel never drops pages because an mtime changed. Whatever changes the
// view must invalidate what changed. For a static image nothing changes,
// and Config.NoOpen lets the kernel open files and directories without a
// round trip. A live view lets the kernel open directories without one
// too (Config.NoOpenDir): a listing's cookies carry a tag of the view it
// began in (SetView), so one that meets a switch goes on in that view —
// or, once the host has dropped that generation, in the current one from
// the same byte position (each block is parsed from its start).
// With Config.DirectIO (--page-cache=host) files are opened for direct
// I/O and the kernel caches none of their data.
//
// # Errors
//
// errnoOf (errors.go) is the one place where errors become errnos: the
// reader's (ENOENT, ENOTDIR, EISDIR, ENAMETOOLONG, ENODATA, EINVAL for the
// caller's mistakes; EACCES for encrypted inodes; EUCLEAN, as the kernel's
// ext4 says "structure needs cleaning", for a corrupt image; ENOTSUP for
// what the reader does not implement), then one table for every answer
// the host can give (ESTALE when a file or generation is not what the
// guest's view says, EBUSY, EMFILE for quota, EAGAIN for a limit that
// did not pass, EIO for failures), EIO for a failed transport or
// device, and EINTR for a request the application was interrupted in
// while it waited for the host (interrupt.go). Failures are logged: a burst of ten lines, then one a second.
// Every write operation is EROFS, and the mount itself is read-only. A
// handler that panics answers EIO and logs the panic; the mount stays.
//
// # The live guest
//
// Client connects to the host agent (session.go) and serves one of its
// generations. A generation's view is an ext4ro.FS whose metadata source
// is a genView (view.go): blocks from the guest's one metadata cache, a
// bounded LRU holding blocks of the generation served, or fetched from
// the host (ReadMeta, with the blocks after a miss that ext4ro will want;
// a block being fetched is waited for, not asked for again) and added to
// it. A READDIRPLUS prefetches its entries' inode-table blocks in one
// request, and then, aside, what listing its subdirectories will need.
// With the shared device, a miss of the served generation reads the
// blocks there and keeps each only if its SHA-256 is the one the host
// has for it (ReadDigests: a window of 1,024 blocks' digests in one
// request, kept by the cache as its blocks are); one that does not
// check is read past the page cache, then fetched (digests.go). A walk
// then costs a request per window instead of one per miss.
//
// The switcher (switcher.go), one goroutine, is the only code that moves
// the served view to another generation and the only code that sends the
// kernel notifications (through its kernel, kernel.go). The views it
// served lately are one registry (views.go): a directory listing goes on
// in the one its cookies name, and an open through a handle of one
// leases in its generation. A switch reads the changed directories as the
// old view has them, moves the cache to the new generation (dropping the
// blocks the announcements listed, at a cost that grows with the change),
// swaps the view into the FileSystem, then tells the kernel what changed:
// each changed inode's attributes and pages, and in each changed
// directory the names that went, came (cached misses) or now name another
// inode. When what changed is not known (missed announcements, a new
// host agent), it goes through the nodes the kernel holds and the names
// it was given them under. Only then does the switch count as done and
// is the generation acknowledged. ClientConfig.Follow says when to move:
// always, at most once per interval, or only when told (Refresh; SIGHUP
// for 'leasefs guest'); an open that needs a newer generation, and a
// generation the host no longer has, move it whatever Follow says.
//
// Opening a regular file takes a lease on it at the view's generation
// (files.go); the open file keeps that view's inode, attributes (GETATTR
// with a file handle) and block map (ext4ro.File), so it reads the same
// bytes however the host replaces or deletes it. Data come from the
// shared device through that map with O_DIRECT, or through the lease over
// the connection (no device, or a device that did not verify). An open
// the host answers stale, not found or busy (the file changed or went
// after this generation, or a writer has it) moves to a newer generation
// and tries the same inode there: at once if one was announced; else, if
// the host publishes on its own, after waiting for one as long as the
// host's publish policy (told in the handshake) says one can take; else
// it fails at once with ESTALE (or EBUSY), and one log line names the
// path, the generation and why. A lease outlives its file's last close
// for 30 s (idle.go), so that opening the same version again (a program
// start: its binary, libraries, modules) needs no round trip; an idle
// lease stays in the open files, so a break or revoke drops it as any,
// and a switch that changed its file releases it.
//
// A mount may pin a generation the host keeps (ClientConfig.Pin, pin.go):
// it then never switches, an open the host refuses fails at once, and it
// moves to the newest only when the host says it drops that generation
// (Unpin) or no longer has it. Every mount shows the generations the host
// keeps under .generations (browse.go), each read in its own view: an
// open there is of that generation's file or fails, never moved.
//
// An open of a file that changed meanwhile (another version, another
// node) fails with ESTALE, after which the kernel looks the name up again
// and opens the new node: a handle never reads one version for a node of
// another.
//
// A break fences the file: its reads check the fence before and after
// they read, so a read that ends after the fence is ESTALE whatever it
// read, and the acknowledgement can go at once. A Revoke (the host lets
// go of every file: it stops, or the export goes) fences them all. The
// device is read only while a session holds the leases (holding.go): its
// connection up (as the kernel knows it, polled: a VM resumed from a long
// pause may not have counted it on its clocks, but has the reset its
// host queued meanwhile) and answered within the lease time the host
// announced;
// a device read the session's loss overlapped is made again once a
// session is back, or fails. Without a session, reads and everything
// else that needs the host wait as ClientConfig.Down says, and fail at
// once when the host said it no longer serves the export. If a reconnect does not
// resume the session (the host agent restarted), every open file is
// fenced the same way: never other bytes. If the host does not have the
// guest's generation any more, the old views are dead (nothing more is
// read for them: their numbers may now name another lineage's
// generations, which the superblock, the generation's fingerprint, tells
// apart) and the switcher moves to the host's newest.
//
// The device (verify.go) is checked at connect and after every reconnect
// against the generation served: its superblock's identity, and a sample
// of metadata blocks. A mismatch refuses the mount; after a reconnect it
// sends file data through the host until a later check matches.
//
// # Locking
//
// Client.live (the session, for device reads) and whether the device
// may be read (devData, devMeta) are atomic: a read never takes a lock
// to check them; nor does the registry of recent views (views.go),
// which lookups, listings and opens read and the switcher alone
// replaces. Client.mu guards the client's state, which is three types,
// each with its own methods (called with it held): the session
// (session.go), the switching state (switcher.go) and the open files
// (files.go, idle.go). They share the lock because a reconnect changes
// the three at once: a session the host did not resume takes every
// lease with it (a lease granted by an older session than the one that
// is up when it is counted is not kept: session.epoch), and a host that
// lost the generation served every view. Client.mu is held only to read
// and change that state, never during I/O, a call to the host or a
// notification (it is released while waiting on Client.changed). A digest window being asked for is waited
// for with no lock held. The locks taken with it held are
// metaCache.mu and nodes.mu (through FileSystem methods), each a leaf
// held for a map operation; nothing takes Client.mu while holding them.
// FileSystem.mu (the handle table, and the open files by node) is a leaf
// too: a reader is closed after it is let go; so is FileSystem.browsed.mu
// (the slots of browsed generations), and the client lets go of a slot
// (forgetBrowsed) with Client.mu released. A leasedFile has no lock
// (its fence is atomic), so nothing ever waits for a read in flight. The
// switcher sends notifications with no lock held, and the only FUSE
// request that waits for it is OPEN, during which the kernel holds no
// lock a notification needs (a notification waits on a directory's lock
// while a LOOKUP in it runs, and on a page's while a READ of it runs;
// neither ever waits for the switcher). A READ may wait for the host
// (Config.Down) with its page locked, and a notification of that page
// with it; what ends the wait (a new session, the policy's deadline, a
// fence by the reconnect) never needs the switcher.
//
// # What FUSE cannot show
//
// The kernel's FUSE layer clamps nanoseconds to 999999999; an inode whose
// extra time field holds more (only a damaged or hand-edited one does)
// shows the clamped value, where the kernel's ext4 shows the stored one.
package guestagent
