package lease

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// TestMain doubles as the host writer of the tests (testenv.Helper
// "writer" MODE): it opens every path named on stdin for writing, all at
// once ("open"), or truncates them ("truncate"), and prints how long the
// slowest waited.
func TestMain(m *testing.M) {
	testenv.RunHelper(map[string]testenv.Role{"writer": writer})
	os.Exit(m.Run())
}

func writer(mode string) int {
	var paths []string
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		paths = append(paths, sc.Text())
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var slowest time.Duration
	failed := 0
	for _, p := range paths {
		wg.Go(func() {
			start := time.Now()
			var err error
			switch mode {
			case "open":
				var fd int
				if fd, err = unix.Open(p, unix.O_WRONLY, 0); err == nil {
					unix.Close(fd)
				}
			case "truncate":
				err = unix.Truncate(p, 0)
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				fmt.Fprintln(os.Stderr, p, err)
				failed++
			}
			slowest = max(slowest, time.Since(start))
		})
	}
	wg.Wait()
	fmt.Println(slowest.Milliseconds())
	if failed > 0 {
		return 1
	}
	return 0
}

// hostWriter starts the writer on paths in a child process; wait returns
// once it has finished, with the slowest writer's wait.
type hostWriter struct {
	cmd   *exec.Cmd
	out   strings.Builder
	done  chan error
	start time.Time
}

func startWriter(t *testing.T, mode string, paths ...string) *hostWriter {
	t.Helper()
	w := &hostWriter{cmd: testenv.Helper("writer", mode), done: make(chan error, 1)}
	w.cmd.Stdin = strings.NewReader(strings.Join(paths, "\n") + "\n")
	w.cmd.Stdout = &w.out
	w.start = time.Now()
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { w.done <- w.cmd.Wait() }()
	t.Cleanup(func() {
		if w.cmd.ProcessState == nil {
			_ = w.cmd.Process.Kill() // our own child, by pid
			<-w.done
		}
	})
	return w
}

// finished reports whether the writer is done within d.
func (w *hostWriter) finished(t *testing.T, d time.Duration) bool {
	t.Helper()
	select {
	case err := <-w.done:
		if err != nil {
			t.Fatalf("writer: %v", err)
		}
		w.done <- nil
		return true
	case <-time.After(d):
		return false
	}
}

// exportFS loop-mounts a fresh ext4 of sizeMB read-write and returns its
// mount point.
func exportFS(t *testing.T, sizeMB int) string {
	t.Helper()
	testenv.RequireLoop(t)
	img := imgtest.Mkfs(t, "ext4", "", sizeMB, "-O", "extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize", "-I", "256", "-b", "4096")
	return imgtest.KernelMount(t, img, "rw")
}

// oneFile makes an export holding one file f with content b.
func oneFile(t *testing.T, b string) (dir, path string) {
	t.Helper()
	dir = exportFS(t, 32)
	path = filepath.Join(dir, "f")
	writeFile(t, path, []byte(b))
	return dir, path
}

// coordinator starts a coordinator on dir, closed when the test ends
// (before the filesystem is unmounted).
func coordinator(t testing.TB, dir string, cfg Config) *Coordinator {
	t.Helper()
	cfg.Root = dir
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func writeFile(t testing.TB, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// requestFor describes path as it is now, as a generation would.
func requestFor(t testing.TB, path string) Request {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	igen, err := iGeneration(fd)
	if err != nil {
		t.Fatal(err)
	}
	return Request{Ino: uint32(st.Ino), IGen: igen, Size: uint64(st.Size), Ctime: st.Ctim}
}

// breaks records the breaks a session receives and can acknowledge them.
type breaks struct {
	ch chan []ID
}

func newBreaks() *breaks { return &breaks{ch: make(chan []ID, 4096)} }

func (b *breaks) sink(ids []ID) {
	select {
	case b.ch <- ids:
	default:
		panic("break recorder full")
	}
}

// next waits for one break.
func (b *breaks) next(t *testing.T) []ID {
	t.Helper()
	select {
	case ids := <-b.ch:
		return ids
	case <-time.After(10 * time.Second):
		t.Fatal("no break within 10s")
		return nil
	}
}

func session(t testing.TB, c *Coordinator, name string, sink BreakFunc) *Session {
	t.Helper()
	s, err := c.NewSession(name, name, sink)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func mustAcquire(t testing.TB, s *Session, r Request) ID {
	t.Helper()
	id, err := s.Acquire(r)
	if err != nil {
		t.Fatalf("acquire inode %d: %v", r.Ino, err)
	}
	return id
}

func wantErr(t *testing.T, what string, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("%s: got %v, want %v", what, err, want)
	}
}

// fdsOn counts this process's fds open on path's inode.
func fdsOn(t *testing.T, path string) int {
	t.Helper()
	var want unix.Stat_t
	if err := unix.Stat(path, &want); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir("/proc/self/fd")
	n := 0
	for _, e := range ents {
		var st unix.Stat_t
		if unix.Stat(filepath.Join("/proc/self/fd", e.Name()), &st) == nil && st.Ino == want.Ino && st.Dev == want.Dev {
			n++
		}
	}
	return n
}

// eventually polls cond for up to 10 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for i := 0; i < 1000; i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("not within 10s: %s", what)
}
