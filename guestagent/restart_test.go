package guestagent

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/imgtest"
)

// A read through the host that is waiting for a connection when the host
// agent comes back without the guest's session: the reconnect fences the
// file, the read ends with ESTALE, and the mount goes on answering. (The
// reconnect used to fence while holding the lock the read waited on, and
// both hung.)
func TestReadWaitingForTheHostAcrossARestart(t *testing.T) {
	for _, device := range []bool{false, true} {
		t.Run(fmt.Sprintf("device=%v", device), func(t *testing.T) {
			h, dev := hostWithBigFile(t, device, "other", "still readable")
			g := startGuest(t, h, dev)
			f := openInGuests(t, []*guestMount{g}, "f")[0]
			if _, err := f.ReadAt(make([]byte, 3), 0); err != nil {
				t.Fatal(err)
			}
			h.Shutdown()
			read := make(chan error, 1)
			go func() {
				_, err := f.ReadAt(make([]byte, 4), 7<<20) // far past what the kernel read ahead
				read <- err
			}()
			time.Sleep(300 * time.Millisecond) // the read is waiting for a connection
			gen := h.Serve(t, true)
			select {
			case err := <-read:
				if err != nil && !errors.Is(err, syscall.ESTALE) {
					t.Fatalf("the read in flight: %v, want its bytes or ESTALE", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the read in flight across the restart hangs")
			}
			g.waitFor(t, gen)
			if got := g.read(t, "other"); got != "still readable" {
				t.Fatalf("after the restart: %q", got)
			}
			if _, err := f.ReadAt(make([]byte, 4), 0); !errors.Is(err, syscall.ESTALE) {
				t.Fatalf("the file open across the restart: %v, want ESTALE", err)
			}
		})
	}
}

// The host agent restarts again and again while guests read, on both
// data paths, and the host replaces the file they read between restarts
// and publishes: every read gives the bytes of one version, or ESTALE;
// none hangs, none gives other bytes, and the mount keeps answering.
func TestReadsAcrossHostRestarts(t *testing.T) {
	h := startHost(t, 3*time.Second)
	const size = 2 << 20
	version := func(v int) []byte { return bytes.Repeat([]byte{byte('A' + v)}, size) }
	if err := os.WriteFile(filepath.Join(h.Mnt, "big"), version(0), 0o644); err != nil {
		t.Fatal(err)
	}
	h.Publish(t)
	guests := []*guestMount{startGuest(t, h, h.Img), startGuest(t, h, "")}

	var mu sync.Mutex
	written := map[byte]bool{'A': true}
	var (
		reads, stale int
		failures     []string
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, g := range guests {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), 7))
			buf := make([]byte, 256<<10)
			for {
				select {
				case <-stop:
					return
				default:
				}
				f, err := os.Open(filepath.Join(g.dir, "big"))
				for err == nil {
					off := rng.Int64N(size - int64(len(buf)))
					done := make(chan struct{})
					var n int
					go func() { n, err = f.ReadAt(buf, off); close(done) }()
					select {
					case <-done:
					case <-time.After(45 * time.Second):
						mu.Lock()
						failures = append(failures, fmt.Sprintf("guest %d: a read hangs", i))
						mu.Unlock()
						return
					}
					if err != nil {
						break
					}
					mu.Lock()
					reads++
					if n != len(buf) || bytes.Count(buf, buf[:1]) != n || !written[buf[0]] {
						failures = append(failures, fmt.Sprintf("guest %d: %d bytes at %d, not one version", i, n, off))
					}
					mu.Unlock()
					if rng.IntN(8) == 0 {
						break // open it again
					}
				}
				if f != nil {
					f.Close()
				}
				mu.Lock()
				switch {
				case err == nil:
				case errors.Is(err, syscall.ESTALE):
					stale++
				default:
					failures = append(failures, fmt.Sprintf("guest %d: %v", i, err))
				}
				mu.Unlock()
			}
		}()
	}
	for round := 1; round <= 6; round++ {
		mu.Lock()
		written[byte('A'+round)] = true
		mu.Unlock()
		h.Replace(t, "big", string(version(round)))
		h.Publish(t)
		time.Sleep(150 * time.Millisecond)
		h.Shutdown()
		time.Sleep(time.Duration(round%3) * 200 * time.Millisecond)
		gen := h.Serve(t, true)
		for _, g := range guests {
			g.waitFor(t, gen)
			start := time.Now()
			if _, err := os.Stat(filepath.Join(g.dir, "big")); err != nil && !errors.Is(err, syscall.ESTALE) {
				t.Errorf("round %d: stat: %v", round, err)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("round %d: the mount took %v to answer a stat", round, d)
			}
		}
	}
	close(stop)
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	t.Logf("%d reads, %d ESTALE", reads, stale)
	for _, f := range failures {
		t.Error(f)
	}
	if reads < 100 {
		t.Fatalf("only %d reads", reads)
	}
	for i, g := range guests {
		if got := g.read(t, "big"); got != string(version(6)) {
			t.Fatalf("guest %d does not read the last version", i)
		}
	}
}

// An application waiting for a host that is down (--down hard: for ever)
// can still be killed: the kernel's INTERRUPT ends the wait with EINTR.
// Before, the kernel waited out the request the guest already had, and a
// process reading a file, or opening one, could not even be killed. A
// python3 reader plays the application, on both data paths.
func TestInterruptedWhileTheHostIsDown(t *testing.T) {
	imgtest.RequireTools(t, "python3")
	for _, device := range []bool{false, true} {
		t.Run(fmt.Sprintf("device=%v", device), func(t *testing.T) {
			h, dev := hostWithBigFile(t, device, "g", "opened only while the host is down")
			// With the page cache on the host, a read is the application's
			// own request (the kernel's read-ahead is not: a process
			// waiting for it can be killed anyway).
			g := startGuestWith(t, h, ClientConfig{Device: dev, Down: DownPolicy{Hard: true}, OpenWait: 3 * time.Second, PageCache: PageCacheHost})
			if _, err := os.Stat(filepath.Join(g.dir, "g")); err != nil { // its name known: only the open asks the host
				t.Fatal(err)
			}
			// One reader opens f now and reads far into it once told;
			// the other opens g once told.
			read := python(t, "f=open(sys.argv[1],'rb'); print('open', flush=True); sys.stdin.readline(); f.seek(7<<20); f.read(4)", filepath.Join(g.dir, "f"))
			open := python(t, "sys.stdin.readline(); open(sys.argv[1],'rb')", filepath.Join(g.dir, "g"))
			if line, err := read.out.ReadString('\n'); err != nil || line != "open\n" {
				t.Fatalf("the reader: %q %v", line, err)
			}
			h.Vanish()
			before := counterValue(g.c.m.interrupted)
			for _, p := range []*pyProc{read, open} {
				io.WriteString(p.in, "go\n")
			}
			time.Sleep(500 * time.Millisecond) // both wait for the host now
			for _, p := range []*pyProc{read, open} {
				select {
				case <-p.done:
					t.Fatalf("%s ended while the host is down: %v", p.what, p.err)
				default:
				}
				p.cmd.Process.Kill() // our own child, by pid
				select {
				case <-p.done:
				case <-time.After(5 * time.Second):
					t.Fatalf("%s cannot be killed while it waits for the host", p.what)
				}
			}
			if got := counterValue(g.c.m.interrupted) - before; got < 2 {
				t.Errorf("%v requests counted as interrupted, want 2", got)
			}
		})
	}
}

// hostWithBigFile is a host that published f (8 MB) and name, and the
// device its guests read, if device.
func hostWithBigFile(t *testing.T, device bool, name, content string) (h *host, dev string) {
	h = startHost(t, 3*time.Second)
	h.Write(t, "f", strings.Repeat("the bytes ", 800000))
	h.Write(t, name, content)
	h.Publish(t)
	if device {
		dev = h.Img
	}
	return h, dev
}

type pyProc struct {
	what string
	cmd  *exec.Cmd
	in   io.WriteCloser
	out  *bufio.Reader
	done chan struct{} // closed when it has ended, with err
	err  error
}

// python runs a python3 program with sys imported and arg as sys.argv[1].
func python(t *testing.T, prog, arg string) *pyProc {
	t.Helper()
	p := &pyProc{what: prog, cmd: exec.Command("python3", "-c", "import sys\n"+prog, arg), done: make(chan struct{})}
	var err error
	if p.in, err = p.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.out = bufio.NewReader(out)
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			t.Errorf("%s: not ended", prog)
		}
	})
	return p
}
