// Package hostagent is the host side of leasefs: exports, the generations
// captured from them, the Server that serves them to guests (tying the
// lease coordinator and the wire protocol together), the control socket
// and auto-publishing.
//
// # Generations
//
// A Generation is a numbered, immutable state of an export's metadata:
// every block that ext4ro reads through its metadata reader — the
// superblock, the group descriptors, the used part of each inode table
// and each in-use inode's ext4ro.MetaBlocks (directory blocks, extent and
// indirect blocks, xattr blocks, slow symlink blocks, xattr inodes'
// data) — as it was during one freeze. A Generation is an io.ReaderAt
// that serves exactly those blocks, so an ext4ro.FS opened over it reads
// that state and never anything else; file data is not in it.
//
// Export.Publish makes one (capture.go): syncfs and a journal
// checkpoint, record the freeze as ours in the state directory, arm the
// watchdog, FIFREEZE, scan, FITHAW, and then — writers running again —
// the full block map and the list of changes. The frozen scan is a
// delta: it compares inode-table blocks with the previous generation's
// by hash; only inodes whose bytes differ have their MetaBlocks listed
// and read again, and the blocks of the others are carried over unread. That is sound because ext4 changes an inode — its
// times, size or block count — whenever it changes a block the inode's
// metadata lives in; blocks shared between inodes (xattr blocks) are read
// again whenever any inode that shares them changes. A generation lists
// the blocks and inodes that changed since the one before.
//
// Inode-table blocks are read through the device's page cache, where ext4
// keeps them itself (its buffer heads are that cache), so it is never
// stale for them. Every other block is read with O_DIRECT: after a freeze
// the page cache can hold stale file data for a block that has since
// become metadata.
//
// With ExportConfig.Watch, an inotify watcher over the whole tree
// narrows the scan: the names that changed resolve to the inodes they
// name now and named in the previous generation (and their directories),
// and only those inodes' inode-table blocks are read. The watcher's queue
// is drained during the freeze, so no namespace change made before it is
// missed. Lost events, a directory rename, a failed publish and every
// FullScanEvery-th publish make a full scan, the safety net for what
// inotify does not report (writes through shared mappings). A full scan
// first captures everything while writers run, then, frozen, reads the
// inode tables again and looks only into the blocks whose fingerprint
// (a seeded 64-bit hash) changed since.
//
// Blocks are kept once, by content, in a Store shared by the export's
// generations, and counted: Drop releases a generation and the blocks
// only it held. The store keeps them in an unlinked file under the state
// directory, the kernel's to cache, and only its index, a capture's new
// blocks until after the thaw, and a cache of hot blocks in memory.
//
// A publish reads as its steps (Export.PublishLabeled, publishing.go):
// prepare (syncfs and the checkpoint, a full or narrowed scan chosen,
// names resolved (watch.go), a full scan's early capture — writers run),
// captureFrozen (the freeze, through the export's freezer (freeze.go):
// record, arm the watchdog, expedite, FIFREEZE, capture, FITHAW, undo),
// complete (the full generation, after the thaw) and makeCurrent
// (numbered and made current by the registry, recorded). export.go is
// the export's lifecycle: what it opens (its locked root, the device,
// the store, the watcher, the freezer, the keeper), takes over from a
// predecessor (handover.go) and closes. Its kept generations are a
// registry of their own (registry.go): the current one, the older ones
// guests still read or pin, the next number.
//
// # Freezes and the watchdog
//
// A freeze outlives the process that made it, and the writers it holds
// cannot be killed. The agent never freezes without a Watchdog: a
// separate process (WatchdogMain) told over a pipe when a freeze starts
// and ends, which thaws the filesystem when the freeze overruns its
// budget or the pipe closes mid-freeze. A publish whose freeze the
// watchdog had to thaw is thrown away (ErrOverrun): the scan may have
// seen writers at work.
//
// FIFREEZE failing with EBUSY means someone else froze the filesystem:
// Publish returns ErrFrozenByOther and nobody here thaws it. The agent
// records each freeze in its state directory before it starts it, and at
// start-up thaws a freeze only when that record says it was its own. The
// record is written before FIFREEZE, so an agent that dies between an
// EBUSY and removing the record would, on restart, thaw the other
// freeze; the window is a few microseconds, against the alternative of a
// freeze of ours that nobody thaws.
//
// # Serving guests
//
// Server answers each guest's requests on its connection (handlers.go):
// metadata blocks of a kept generation (nothing else), Open checked
// against the host's own reader of that generation (Generation.FS, which
// reads the store's blocks in place and keeps no cache) before the lease
// is taken with its i_generation, size, ctime and layout hash, reads and
// releases through leases. Breaks go to the guest as calls whose replies
// acknowledge the leases; the break queue of a guest never blocks the
// coordinator, so a stuck guest only loses its own leases at the
// deadline. A publish is announced to every guest in its own goroutine;
// then the export keeps (Server.retain, publish.go) the newest
// ExportConfig.KeepGenerations, those its following guests may move to
// (no more than Limits.GenerationsBehind back) and each one a guest
// pinned, the budget for kept files first: a pinned generation it drops
// is announced to its guests (Unpin) before. protoErr is the one place
// lease errors become protocol codes.
//
// # What a guest may make the agent hold
//
// A guest is who the transport says (vsockproto.Peer.Guest). Every
// request is checked before anything is allocated for it; the requests
// that do work wait for their reply's bytes from the guest's and all
// guests' byte budgets, then for a turn from the guest's and all guests'
// running budgets (quota.go: FIFO semaphores, bounded waits, `retry`
// beyond), and give the bytes back once the reply is written. Replies are
// at most vsockproto.MaxReply. The lease coordinators count leases, sessions and a
// share of files per guest across sessions; files and connections come
// from one fd budget below the process's limit (lease.FDs), and an accept
// that meets EMFILE backs off with a spare descriptor in hand.
//
// ServeVMDir serves a directory of VMs' hybrid-vsock sockets, one
// listener per VM while its socket exists (inotify on the directory; an
// overflow rescans it); a VM that goes has its connections closed. Each
// VM's listener takes a descriptor from the guests' budget (lease.FDs).
//
// # One agent per export
//
// OpenExport takes an flock on the export's root directory, and
// LockStateDir one on the state directory; a second agent fails at once
// naming the holder's pid (from /proc/locks). The locks go with the
// process, however it ends.
//
// # Upgrades
//
// Server.Handover stops every publish and lease change and returns each
// export's state (handover.go): its locked root, its store (Store.state)
// and kept generations (Generation.state), the keeper's files and the
// lease coordinator's held files. An export opened with
// ExportConfig.Inherit takes it over as it was (its next publish scans
// everything); its lease coordinator takes over the sessions and leases
// from the lease journal in the state directory (lease.Config.Journal).
// ExportConfig.Keeper and Held do the same for a restart whose held
// files systemd's fd store kept. Package upgrade hands these states from
// one run to the next.
//
// An export is checked by its filesystem's own flags (mountinfo's super
// options: a service's namespace may mount it read-only, as systemd's
// ProtectSystem= does); Export.Mounted says whether it is still the same
// mount, and every publish checks it first. Server.LoseExport ends the
// service of one that went away and keeps it, with the reason, in
// status and metrics. An automatic publish that finds no inode changed
// makes no generation (Export.PublishIfChanged).
//
// # Locking
//
// Server.Handover takes, per export, Export.pub, then Store.mu and the
// registry's lock one after the other, then the coordinator's lock, and
// holds pub and the coordinator's lock until it is released (or the
// process execs). Export.pub serialises publishes; registry.mu guards
// the kept generations and is never held during I/O. A Generation is immutable once published
// and read without locks; a request holds a reference to it
// (Export.Generation to Generation.Release), so a drop frees its blocks
// only after the last reader. Store.mu is a leaf, never held during
// I/O: a block is read from the store's file by a caller holding a
// reference to it, so its place is not reused under the read. Server.mu
// guards the connections and the lost exports (LoseExport, whose
// removal takes it again only after letting go), served.mu the
// generation each session is on,
// quotas.mu the per-guest budgets, ctlGate.mu the control requests
// being answered (Quiesce), and the keeper's mutex (its held files; the
// coordinator calls it with its own lock held); each is a leaf, held for
// a map operation, never while waiting on a budget or doing I/O. So the
// order is Export.pub, then Coordinator.mu, then one leaf. The ranks are
// written once, in internal/lockrank (ranks.go), as the mutexes' types:
// built with the lockrank tag (make test runs this package so), a lock
// taken out of that order panics where it is taken. Built with the
// invariants tag (make test does), each publish ends by checking the
// store's reference counts against the live generations (invariants.go).
package hostagent
