package lease

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// signalThread receives lease-break signals on one locked OS thread that
// blocks them and reads a signalfd. Go's own signal delivery loses some
// of a burst; this does not. Breaks are queued real-time signals carrying
// the fd (F_SETSIG); when the queue is full the kernel sends a plain
// SIGIO instead, which carries nothing, so it means "rescan everything".
type signalThread struct {
	tid  int
	sfd  int
	stop int // eventfd that wakes the thread to exit
	done chan struct{}
}

func sigaddset(s *unix.Sigset_t, sig int) { s.Val[(sig-1)/64] |= 1 << (uint(sig-1) % 64) }

// startSignalThread starts the thread; onBreak gets each signalled fd,
// and onOverflow is called for a SIGIO. Both run on the thread.
func startSignalThread(sig int, onBreak func(fd int), onOverflow func()) (*signalThread, error) {
	t := &signalThread{done: make(chan struct{})}
	ready := make(chan error, 1)
	go func() {
		defer close(t.done)
		// Never unlocked: the thread, with its signal mask, dies with
		// this goroutine instead of going back to the scheduler.
		runtime.LockOSThread()
		var set unix.Sigset_t
		sigaddset(&set, sig)
		sigaddset(&set, int(unix.SIGIO))
		if err := unix.PthreadSigmask(unix.SIG_BLOCK, &set, nil); err != nil {
			ready <- fmt.Errorf("blocking signals: %w", err)
			return
		}
		sfd, err := unix.Signalfd(-1, &set, unix.SFD_CLOEXEC)
		if err != nil {
			ready <- fmt.Errorf("signalfd: %w", err)
			return
		}
		defer unix.Close(sfd)
		efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
		if err != nil {
			ready <- fmt.Errorf("eventfd: %w", err)
			return
		}
		t.tid, t.sfd, t.stop = unix.Gettid(), sfd, efd
		ready <- nil
		t.loop(sig, onBreak, onOverflow)
	}()
	if err := <-ready; err != nil {
		return nil, err
	}
	return t, nil
}

func (t *signalThread) loop(sig int, onBreak func(int), onOverflow func()) {
	const each = int(unsafe.Sizeof(unix.SignalfdSiginfo{}))
	buf := make([]byte, 256*each)
	fds := []unix.PollFd{{Fd: int32(t.sfd), Events: unix.POLLIN}, {Fd: int32(t.stop), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err != nil && err != unix.EINTR {
			panic(fmt.Sprintf("lease: poll on signalfd: %v", err)) // cannot happen with valid fds
		}
		if fds[1].Revents != 0 {
			return
		}
		if fds[0].Revents == 0 {
			continue
		}
		n, err := unix.Read(t.sfd, buf)
		if err != nil {
			continue // EINTR or EAGAIN: poll again
		}
		overflow := false
		for off := 0; off+each <= n; off += each {
			si := (*unix.SignalfdSiginfo)(unsafe.Pointer(&buf[off]))
			switch int(si.Signo) {
			case sig:
				onBreak(int(si.Fd))
			case int(unix.SIGIO):
				overflow = true
			}
		}
		if overflow {
			onOverflow()
		}
	}
}

// close stops the thread and waits for it.
func (t *signalThread) close() {
	var one [8]byte
	one[0] = 1
	_, _ = unix.Write(t.stop, one[:])
	<-t.done
	unix.Close(t.stop)
}
