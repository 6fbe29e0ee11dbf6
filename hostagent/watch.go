package hostagent

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/internal/inotify"
)

// treeWatcher records, with inotify, which names of an export changed
// since the last publish, so that a publish can re-read just their
// inodes. It uses inotify directly rather than a library because a
// publish must drain every event queued before its freeze: reads and the
// processing of what they return happen under one lock, and drain reads
// the queue dry under it.
//
// Namespace events (create, unlink, rename) are queued before the
// syscall drops its freeze protection, so a freeze never completes
// without them. A data write's event is queued just after, and a write
// through a shared mapping makes none at all: a regular file changed
// that way can be missed by a narrowed scan, which is why every publish
// is a full scan after an overflow, after a directory rename, and every
// FullScanEvery publishes.
type treeWatcher struct {
	root string
	fd   int
	f    *os.File
	done chan struct{}

	kick chan struct{} // gets a token when changes are recorded

	mu    sync.Mutex
	dirs  map[int]string      // watch descriptor → directory path; guarded by mu
	names map[string]struct{} // changed "dir/name" paths; guarded by mu
	full  bool                // a full scan is needed; guarded by mu
	buf   []byte              // guarded by mu
}

const watchMask = unix.IN_CREATE | unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_MOVED_TO |
	unix.IN_MODIFY | unix.IN_ATTRIB | unix.IN_CLOSE_WRITE | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF |
	unix.IN_ONLYDIR | unix.IN_DONT_FOLLOW

func newTreeWatcher(root string) (*treeWatcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("inotify_init1", err)
	}
	w := &treeWatcher{root: filepath.Clean(root), fd: fd, f: os.NewFile(uintptr(fd), "inotify"),
		done: make(chan struct{}), kick: make(chan struct{}, 1), dirs: map[int]string{}, names: map[string]struct{}{}, buf: make([]byte, 256<<10)}
	w.mu.Lock()
	w.addTree(w.root)
	w.mu.Unlock()
	go w.run()
	return w, nil
}

// addTree watches dir and every directory below it. Called with mu held.
func (w *treeWatcher) addTree(dir string) {
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		// What was created before the watch was added is seen by the
		// walk itself.
		w.names[p] = struct{}{}
		if !d.IsDir() {
			return nil
		}
		wd, err := unix.InotifyAddWatch(w.fd, p, watchMask)
		if err != nil {
			w.full = true // unwatched: only a full scan sees it (e.g. out of watches)
			return nil
		}
		w.dirs[wd] = p
		return nil
	})
}

func (w *treeWatcher) run() {
	defer close(w.done)
	rc, err := w.f.SyscallConn()
	if err != nil {
		return
	}
	for {
		err := rc.Read(func(fd uintptr) bool {
			w.mu.Lock()
			defer w.mu.Unlock()
			return w.readLocked() // false: nothing queued, wait
		})
		if err != nil {
			return // closed
		}
	}
}

// readLocked reads and records one batch of events; it reports whether
// there were any. Called with mu held.
func (w *treeWatcher) readLocked() bool {
	n, err := unix.Read(w.fd, w.buf)
	if err != nil || n <= 0 {
		return false
	}
	select {
	case w.kick <- struct{}{}:
	default:
	}
	inotify.Each(w.buf[:n], func(wd int, mask uint32, name string) {
		dir, known := w.dirs[wd]
		switch {
		case mask&unix.IN_Q_OVERFLOW != 0:
			w.full = true
		case mask&unix.IN_IGNORED != 0:
			delete(w.dirs, wd)
		case !known:
		case mask&unix.IN_ISDIR != 0 && mask&(unix.IN_MOVED_FROM|unix.IN_MOVED_TO|unix.IN_MOVE_SELF) != 0:
			// Renamed directories make the recorded paths of everything
			// below them wrong.
			w.full = true
		case mask&unix.IN_ISDIR != 0 && mask&unix.IN_CREATE != 0:
			w.names[dir+"/"+name] = struct{}{}
			w.addTree(dir + "/" + name)
		case name != "":
			w.names[dir+"/"+name] = struct{}{}
		default:
			w.names[dir] = struct{}{}
		}
	})
	return true
}

// take drains the queue and returns what changed since the last take:
// the changed paths, or full if only a full scan will do.
func (w *treeWatcher) take() (names []string, full bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.readLocked() {
	}
	for p := range w.names {
		names = append(names, p)
	}
	full = w.full
	w.names, w.full = map[string]struct{}{}, false
	return names, full
}

func (w *treeWatcher) close() {
	w.f.Close()
	<-w.done
}

// resolve adds to cand the inodes that changed names (absolute paths
// under the export's root) may concern: the inode each names now on the
// export's device dev and named in pv, the previous generation, and
// their directories.
func resolve(cand map[uint32]bool, names []string, pv *ext4ro.FS, root string, dev uint64) {
	dirs := map[string]uint32{".": ext4ro.RootIno}
	var lookup func(rel string) (uint32, bool)
	lookup = func(rel string) (uint32, bool) {
		if ino, ok := dirs[rel]; ok {
			return ino, ino != 0
		}
		parent, ok := lookup(filepath.Dir(rel))
		var ino uint32
		if ok {
			if d, err := pv.Inode(parent); err == nil {
				if ent, err := pv.Lookup(d, filepath.Base(rel)); err == nil {
					ino = ent.Ino
				}
			}
		}
		dirs[rel] = ino
		return ino, ino != 0
	}
	root = filepath.Clean(root)
	for _, p := range names {
		for _, q := range []string{p, filepath.Dir(p)} {
			var st unix.Stat_t
			if unix.Lstat(q, &st) == nil && st.Dev == dev {
				cand[uint32(st.Ino)] = true
			}
			if rel, err := filepath.Rel(root, q); err == nil && !strings.HasPrefix(rel, "..") {
				if ino, ok := lookup(rel); ok {
					cand[ino] = true
				}
			}
		}
	}
}
