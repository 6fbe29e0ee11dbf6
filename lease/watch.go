package lease

import (
	"errors"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/inotify"
)

// watcher watches leased inodes for modification with inotify. A read
// lease is not broken by open(O_RDONLY|O_TRUNC), which truncates anyway;
// the IN_MODIFY that the truncation makes is how it is noticed.
type watcher struct {
	fd   int
	f    *os.File // the same fd, in the runtime poller
	done chan struct{}
}

func newWatcher(onModify func(wd int), onOverflow func()) (*watcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("inotify_init1", err)
	}
	w := &watcher{fd: fd, f: os.NewFile(uintptr(fd), "inotify"), done: make(chan struct{})}
	go w.run(onModify, onOverflow)
	return w, nil
}

// add watches the inode open at fd (also when it is unlinked: the
// /proc/self/fd link names the inode, not a path).
func (w *watcher) add(fd int) (int, error) {
	wd, err := unix.InotifyAddWatch(w.fd, "/proc/self/fd/"+strconv.Itoa(fd), unix.IN_MODIFY)
	if err != nil {
		return -1, os.NewSyscallError("inotify_add_watch", err)
	}
	return wd, nil
}

func (w *watcher) remove(wd int) { _, _ = unix.InotifyRmWatch(w.fd, uint32(wd)) }

func (w *watcher) run(onModify func(int), onOverflow func()) {
	defer close(w.done)
	buf := make([]byte, 64<<10)
	for {
		n, err := w.f.Read(buf)
		if err != nil {
			if errors.Is(err, os.ErrClosed) {
				return
			}
			continue
		}
		inotify.Each(buf[:n], func(wd int, mask uint32, _ string) {
			switch {
			case mask&unix.IN_Q_OVERFLOW != 0:
				onOverflow()
			case mask&unix.IN_MODIFY != 0:
				onModify(wd)
			}
		})
	}
}

func (w *watcher) close() {
	w.f.Close()
	<-w.done
}
