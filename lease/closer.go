package lease

import (
	"sync"

	"golang.org/x/sys/unix"
)

// closer closes fds on its own goroutine. Closing the last fd of an
// unlinked inode frees it, which waits while the filesystem is frozen;
// nothing on the break path may wait for that, or a writer blocked in a
// break would hold up the freeze that holds up the close.
type closer struct {
	mu   sync.Mutex
	cond *sync.Cond
	fds  []int // guarded by mu
	quit bool  // guarded by mu
	done chan struct{}
	gone func() // called for each fd closed
}

func newCloser(gone func()) *closer {
	c := &closer{done: make(chan struct{}), gone: gone}
	c.cond = sync.NewCond(&c.mu)
	go c.run()
	return c
}

func (c *closer) queue(fd int) {
	c.mu.Lock()
	if c.quit { // after stop: a ReadAt that outlived Close
		c.mu.Unlock()
		unix.Close(fd)
		c.gone()
		return
	}
	c.fds = append(c.fds, fd)
	c.mu.Unlock()
	c.cond.Signal()
}

func (c *closer) run() {
	defer close(c.done)
	for {
		c.mu.Lock()
		for len(c.fds) == 0 && !c.quit {
			c.cond.Wait()
		}
		fds := c.fds
		c.fds = nil
		quit := c.quit
		c.mu.Unlock()
		for _, fd := range fds {
			unix.Close(fd)
			c.gone()
		}
		if quit && len(fds) == 0 {
			return
		}
	}
}

// stop closes what is queued and ends the goroutine.
func (c *closer) stop() {
	c.mu.Lock()
	c.quit = true
	c.mu.Unlock()
	c.cond.Signal()
	<-c.done
}
