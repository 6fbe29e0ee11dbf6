// Package lease is the host's lease coordinator. It keeps the files that
// guests read open on their behalf, so that the blocks of a file a guest
// is reading are never freed under it, and it tells guests when a writer
// on the host wants one of those files back.
//
// # Model
//
// A Session is one guest. Session.Acquire asks for a lease on an inode as
// a generation describes it (inode, i_generation, size, ctime and
// optionally a layout hash). The coordinator opens the inode by handle
// (open_by_handle_at; non-regular files are refused through an O_PATH
// descriptor without ever being opened), takes a kernel read lease
// (F_SETLEASE F_RDLCK) and then compares the live inode with the
// request: a match is granted; otherwise the answer is ErrStale, ErrBusy
// (open for writing on the host), ErrNotFound or ErrQuota.
//
// One fd and one kernel lease serve every session that leases an inode:
// a file holds a list of grants, one per lease, and is released when the
// last grant ends.
//
// # Breaks
//
// A writer's open for writing or truncate blocks in the kernel, which
// sends our real-time signal (F_SETSIG) to one dedicated, locked OS
// thread (F_SETOWN_EX with F_OWNER_TID) that blocks it and reads a
// signalfd; the signal carries the fd. When the queue of real-time
// signals is full the kernel sends a plain SIGIO instead, and the thread
// rescans every held fd with F_GETLEASE. Every fd is checked with
// F_GETLEASE before a break starts, so a late signal for a reused fd
// number is ignored.
//
// A break goes to every session holding the file, through the session's
// BreakFunc. The kernel lease is dropped — and the writer goes on — when
// every holder has acknowledged (Ack, or Release), or at the ack
// deadline (Config.AckTimeout, far below the kernel's lease-break-time),
// when the leases not acknowledged are revoked: every later use of one
// answers ErrRevoked until the guest releases it, and a late ack does not
// bring it back. A detached session cannot acknowledge, so its leases are
// revoked at once.
//
// open(O_RDONLY|O_TRUNC) truncates without breaking read leases. Each
// leased inode is watched with inotify, and a modification starts a
// break after the fact; when inotify overflows, every held file is
// compared with its size and mtime at lease time.
//
// # Never waiting on the publish path
//
// A writer waiting on our break holds the filesystem's write reference,
// so a freeze waits for the writer, which waits for us. Nothing on the
// break path may therefore wait for anything a freeze holds up: dropping
// a lease is a non-blocking fcntl, and fds are closed by a separate
// goroutine (closing the last fd of an unlinked inode frees it, which
// waits while the filesystem is frozen). The package takes no lock of
// its callers'.
//
// # Sessions and quotas
//
// When a guest's connection ends, Detach keeps its session for
// Config.Grace; Resume with its token reattaches it with its leases.
// A session belongs to a guest (an identity the caller takes from the
// transport), and a guest's quotas hold across its sessions, detached
// ones included: Config.MaxPerGuest leases, Config.MaxSessionsPerGuest
// sessions (one more ends its oldest detached one), and at most half of
// the files the other guests leave of the fd budget (FDs: the process's
// limit less a reserve, shared with other coordinators and the guests'
// connections). Each held file is charged to one guest that holds it, and
// passes to another holder when that one lets go. Past a limit Acquire
// answers ErrQuota and nothing else changes; out of descriptors or memory
// while opening a file it answers ErrExhausted. Only the guest that got a
// token can resume its session. Lease ids are random 64-bit values valid
// only on the session that got them.
//
// # Upgrades and restarts
//
// With Config.Journal the coordinator records its held files, sessions
// and leases as they change (journal.go): a lease's line is written
// before Acquire returns, so no lease a guest was told of is missing
// from it, and a failed write removes the journal rather than leave it
// partial. A successor — the agent's next run, given the held files'
// descriptors by an upgrade's exec (Handover) or by systemd's file
// descriptor store (Config.Keeper, which is given each held file as it
// is leased) — takes over what the journal names (Config.Held,
// Config.Successor): each file is checked against its record (inode,
// i_generation, size, mtime, layout) and leased again for the new signal
// thread; a file changed meanwhile, or wanted by a writer, is let go and
// its leases revoked, which the guest hears as a break when it resumes.
// Leave ends a run without giving the leases back, for a successor.
//
// # Locking
//
// Coordinator.mu guards every file, grant, session and account, and the
// journal, which is written with it held (the state directory is never
// on the export, so a write does not wait for a freeze); Keeper calls
// are made with it held and must not block.
// Syscalls that can take time (opening, leasing, reading) run outside it;
// a file being opened is in state opening, and other Acquires of the
// same inode wait for it. A ReadAt marks the file in use, so its fd is not closed under
// it. BreakFuncs are called after mu is released. Coordinator.mu's rank
// among the host agent's locks (after Export.pub, before every leaf) is
// its type (internal/lockrank), checked in builds with the lockrank tag.
// Built with the invariants tag, its Unlock first checks the grants,
// sessions, files and per-guest counts against each other
// (invariants.go), so every operation is checked as it ends.
package lease
