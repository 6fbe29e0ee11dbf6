package lease

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/layout"
)

func TestAcquireChecksTheLiveInode(t *testing.T) {
	dir := exportFS(t, 64)
	path := filepath.Join(dir, "f")
	writeFile(t, path, bytes.Repeat([]byte("x"), 10000))
	c := coordinator(t, dir, Config{})
	s := session(t, c, "g", newBreaks().sink)
	r := requestFor(t, path)

	id := mustAcquire(t, s, r)
	buf := make([]byte, 20000)
	if n, err := s.ReadAt(id, buf, 0); err != nil || n != 10000 || buf[9999] != 'x' {
		t.Fatalf("read %d, %v", n, err)
	}
	if n, err := s.ReadAt(id, buf, 1<<40); err != nil || n != 0 {
		t.Fatalf("read past the end: %d, %v", n, err)
	}
	if _, err := s.ReadAt(id, buf, -1); err == nil {
		t.Fatal("negative offset accepted")
	}
	s.Release(id)

	for _, c := range []struct {
		name string
		edit func(*Request)
		want error
	}{
		{"size", func(r *Request) { r.Size++ }, ErrStale},
		{"ctime", func(r *Request) { r.Ctime.Nsec ^= 1 }, ErrStale},
		{"i_generation", func(r *Request) { r.IGen ^= 0x5a5a }, ErrNotFound},
		{"no such inode", func(r *Request) { r.Ino = 9999 }, ErrNotFound},
		{"outside the inode table", func(r *Request) { r.Ino = 1 << 30 }, ErrNotFound},
	} {
		q := r
		c.edit(&q)
		_, err := s.Acquire(q)
		wantErr(t, c.name, err, c.want)
	}
	if st := c.Stats(); st.Files != 0 || st.Leases != 0 {
		t.Fatalf("refusals left state behind: %+v", st)
	}

	// Open for writing on the host: busy.
	w, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Acquire(r)
	wantErr(t, "open for writing", err, ErrBusy)
	w.Close()
	mustAcquire(t, s, r)
}

// A FIFO without a writer, a device, a socket, a directory and a symlink
// are refused at once: none of them is ever opened.
func TestNonRegularFilesAreRefusedWithoutBlocking(t *testing.T) {
	dir := exportFS(t, 64)
	c := coordinator(t, dir, Config{})
	s := session(t, c, "g", newBreaks().sink)
	must := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	must(unix.Mkfifo(filepath.Join(dir, "fifo"), 0o644))
	must(unix.Mknod(filepath.Join(dir, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(unix.Mknod(filepath.Join(dir, "sock"), unix.S_IFSOCK|0o666, 0))
	must(os.Mkdir(filepath.Join(dir, "dir"), 0o755))
	must(os.Symlink("/etc/passwd", filepath.Join(dir, "link")))
	for _, name := range []string{"fifo", "null", "sock", "dir", "link"} {
		var st unix.Stat_t
		must(unix.Lstat(filepath.Join(dir, name), &st))
		done := make(chan error, 1)
		go func() {
			_, err := s.Acquire(Request{Ino: uint32(st.Ino), Size: uint64(st.Size), Ctime: st.Ctim})
			done <- err
		}()
		select {
		case err := <-done:
			wantErr(t, name, err, ErrNotRegular)
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: Acquire blocked", name)
		}
	}
}

// The layout hash of the live file matches one computed from debugfs's
// block list of the same file, and a wrong one is stale.
func TestLayoutCheck(t *testing.T) {
	imgtest.RequireTools(t, "debugfs")
	dir := exportFS(t, 64)
	path := filepath.Join(dir, "f")
	data := make([]byte, 300<<10)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	writeFile(t, path, data)
	// A hole and a second extent.
	f, _ := os.OpenFile(path, os.O_WRONLY, 0)
	f.WriteAt([]byte("tail"), 5<<20)
	f.Sync()
	f.Close()
	unix.Sync()

	r := requestFor(t, path)
	src := findSource(t, dir)
	out := imgtest.Run(t, "debugfs", "-R", "blocks <"+strconv.Itoa(int(r.Ino))+">", src)
	var runs []layout.Extent
	logical := uint64(0)
	for _, tok := range strings.Fields(out) {
		n, err := strconv.ParseUint(tok, 10, 64)
		if err != nil {
			continue
		}
		if len(runs) == 75 { // 300 KiB = 75 blocks; the tail sits at 5 MiB
			logical = 5 << 20 / 4096
		}
		runs = append(runs, layout.Extent{Logical: logical, Physical: n, Count: 1})
		logical++
	}
	if len(runs) != 76 {
		t.Fatalf("debugfs listed %d blocks: %s", len(runs), out)
	}
	c := coordinator(t, dir, Config{})
	s := session(t, c, "g", newBreaks().sink)
	r.Layout = layout.Hash(runs)
	mustAcquire(t, s, r)
	s.Close()
	r.Layout ^= 1
	_, err := s.Acquire(r)
	wantErr(t, "closed session", err, ErrClosed)
	s = session(t, c, "g2", newBreaks().sink)
	_, err = s.Acquire(r)
	wantErr(t, "wrong layout", err, ErrStale)
}

// findSource returns the image file behind the loop mount at dir.
func findSource(t *testing.T, dir string) string {
	t.Helper()
	dev := imgtest.LoopDevice(t, dir)
	back, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/loop/backing_file")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(back))
}

// A leased file that the host unlinks keeps its exact bytes, on the
// device too, while the filesystem is filled with new data; its blocks
// are freed once the lease ends.
func TestUnlinkedLeasedFileKeepsItsBytes(t *testing.T) {
	dir := exportFS(t, 32)
	path := filepath.Join(dir, "f")
	data := make([]byte, 4<<20)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	writeFile(t, path, data)
	unix.Sync()
	c := coordinator(t, dir, Config{})
	s := session(t, c, "g", newBreaks().sink)
	id := mustAcquire(t, s, requestFor(t, path))

	fd, _ := unix.Open(path, unix.O_RDONLY, 0)
	runs, err := layout.Fiemap(fd, 4096)
	unix.Close(fd)
	if err != nil || len(runs) == 0 {
		t.Fatalf("layout: %v %v", runs, err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	// Refill the filesystem with other data until it is full.
	junk := bytes.Repeat([]byte{0xEE}, 1<<20)
	for i := 0; ; i++ {
		if err := os.WriteFile(filepath.Join(dir, "junk"+strconv.Itoa(i)), junk, 0o644); err != nil {
			if !strings.Contains(err.Error(), "no space") {
				t.Fatal(err)
			}
			break
		}
	}
	unix.Sync()

	got := make([]byte, len(data))
	if n, err := s.ReadAt(id, got, 0); err != nil || n != len(data) || !bytes.Equal(got, data) {
		t.Fatalf("through the lease: %d bytes, %v, equal %v", n, err, bytes.Equal(got, data))
	}
	// The device itself still holds the bytes where the file's blocks are.
	img, err := os.Open(findSource(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	for _, r := range runs {
		b := make([]byte, r.Count*4096)
		img.ReadAt(b, int64(r.Physical*4096))
		want := data[r.Logical*4096:]
		if !bytes.Equal(b, want[:len(b)]) {
			t.Fatalf("device blocks %d+%d no longer hold the file's bytes", r.Physical, r.Count)
		}
	}
	var before unix.Statfs_t
	unix.Statfs(dir, &before)
	if err := s.Release(id); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the unlinked file's blocks are freed", func() bool {
		var now unix.Statfs_t
		unix.Statfs(dir, &now)
		return now.Bfree >= before.Bfree+uint64(len(data)/4096)
	})
}

// A writer that opens a leased file for writing, or truncates it, waits
// until every holder has acknowledged.
func TestWriterWaitsForEveryAck(t *testing.T) {
	for _, mode := range []string{"open", "truncate"} {
		t.Run(mode, func(t *testing.T) {
			dir, path := oneFile(t, "hello")
			c := coordinator(t, dir, Config{AckTimeout: 15 * time.Second})
			r := requestFor(t, path)
			var ss []*Session
			var bs []*breaks
			var ids []ID
			for i := range 3 {
				b := newBreaks()
				s := session(t, c, "g"+strconv.Itoa(i), b.sink)
				ss, bs, ids = append(ss, s), append(bs, b), append(ids, mustAcquire(t, s, r))
			}
			w := startWriter(t, mode, path)
			for i, b := range bs {
				if got := b.next(t); len(got) != 1 || got[0] != ids[i] {
					t.Fatalf("session %d got break %v, want [%x]", i, got, ids[i])
				}
			}
			if _, err := ss[0].Acquire(r); err == nil {
				t.Fatal("a new lease was granted during a break")
			}
			for i := range 2 {
				if err := ss[i].Ack(ids[i]); err != nil {
					t.Fatal(err)
				}
			}
			if w.finished(t, 300*time.Millisecond) {
				t.Fatal("the writer went on before the last holder acknowledged")
			}
			// Reading goes on while the break is out.
			if n, err := ss[2].ReadAt(ids[2], make([]byte, 5), 0); err != nil || n != 5 {
				t.Fatalf("read during the break: %d %v", n, err)
			}
			if err := ss[2].Ack(ids[2]); err != nil {
				t.Fatal(err)
			}
			if !w.finished(t, 5*time.Second) {
				t.Fatal("the writer is still blocked after every ack")
			}
			if st := c.Stats(); st.Files != 0 || st.Leases != 0 || st.Breaks != 1 || st.Revoked != 0 {
				t.Fatalf("stats %+v", st)
			}
			// Acks end leases: a second ack, or a release, finds nothing.
			wantErr(t, "duplicate ack", ss[0].Ack(ids[0]), ErrUnknown)
			wantErr(t, "release after ack", ss[1].Release(ids[1]), ErrUnknown)
		})
	}
}

// A holder that never acknowledges holds the writer until the deadline,
// and no longer; its lease is then revoked for good.
func TestDeadlineRevokes(t *testing.T) {
	dir, path := oneFile(t, "hello")
	const deadline = 1500 * time.Millisecond
	c := coordinator(t, dir, Config{AckTimeout: deadline})
	r := requestFor(t, path)
	good, silent := newBreaks(), newBreaks()
	sg := session(t, c, "good", good.sink)
	ss := session(t, c, "silent", silent.sink)
	ig, is := mustAcquire(t, sg, r), mustAcquire(t, ss, r)

	w := startWriter(t, "truncate", path)
	good.next(t)
	silent.next(t)
	sg.Ack(ig)
	if !w.finished(t, 10*time.Second) {
		t.Fatal("writer still blocked")
	}
	ms, _ := strconv.Atoi(strings.TrimSpace(w.out.String()))
	if waited := time.Duration(ms) * time.Millisecond; waited < deadline || waited > deadline+time.Second {
		t.Fatalf("the writer waited %v; the deadline is %v", waited, deadline)
	}
	wantErr(t, "read after revocation", func() error { _, err := ss.ReadAt(is, make([]byte, 1), 0); return err }(), ErrRevoked)
	wantErr(t, "late ack", ss.Ack(is), ErrRevoked)
	wantErr(t, "ack again", ss.Ack(is), ErrRevoked)
	if st := c.Stats(); st.Revoked != 1 || st.Files != 0 {
		t.Fatalf("stats %+v", st)
	}
	if err := ss.Release(is); err != nil {
		t.Fatalf("releasing a revoked lease: %v", err)
	}
	wantErr(t, "after release", ss.Ack(is), ErrUnknown)
	// The silent guest can lease the new file like anyone else.
	mustAcquire(t, ss, requestFor(t, path))
}

// open(O_RDONLY|O_TRUNC) truncates without breaking the lease; the
// modification is caught and turned into a break.
func TestTruncatingReadOnlyOpenIsCaught(t *testing.T) {
	dir, path := oneFile(t, "hello")
	c := coordinator(t, dir, Config{})
	b := newBreaks()
	s := session(t, c, "g", b.sink)
	id := mustAcquire(t, s, requestFor(t, path))
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	if got := b.next(t); len(got) != 1 || got[0] != id {
		t.Fatalf("break %v", got)
	}
	if err := s.Ack(id); err != nil {
		t.Fatal(err)
	}
	if st := c.Stats(); st.Modified != 1 || st.Breaks != 0 || st.Files != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// ≥1,000 leased files opened for writing at once, with the real-time
// signal queue limited to 16 and the signal thread held up: the overflow
// falls back to a full rescan, and no break is lost (a lost one would
// hold its writer for the kernel's lease-break-time, 45 s).
func TestBreakStormLosesNothing(t *testing.T) {
	const n = 1200
	dir := exportFS(t, 64)
	c := coordinator(t, dir, Config{AckTimeout: 20 * time.Second})
	var old unix.Rlimit
	unix.Getrlimit(unix.RLIMIT_SIGPENDING, &old)
	if err := unix.Setrlimit(unix.RLIMIT_SIGPENDING, &unix.Rlimit{Cur: 16, Max: old.Max}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Setrlimit(unix.RLIMIT_SIGPENDING, &old) })

	// Ten guests; each acknowledges from its own goroutine.
	type guest struct {
		s *Session
		b *breaks
	}
	var gs []guest
	for i := range 10 {
		b := newBreaks()
		g := guest{session(t, c, "g"+strconv.Itoa(i), b.sink), b}
		gs = append(gs, g)
		go func() {
			for ids := range b.ch {
				for _, id := range ids {
					g.s.Ack(id)
				}
			}
		}()
	}
	t.Cleanup(func() {
		for _, g := range gs {
			close(g.b.ch)
		}
	})
	var paths []string
	for i := range n {
		p := filepath.Join(dir, "f"+strconv.Itoa(i))
		writeFile(t, p, []byte{byte(i)})
		mustAcquire(t, gs[i%len(gs)].s, requestFor(t, p))
		paths = append(paths, p)
	}
	// Hold the coordinator's lock while the writers start, so that the
	// signal thread stalls on its first signal and the queue overflows.
	c.mu.Lock()
	w := startWriter(t, "open", paths...)
	time.Sleep(time.Second)
	c.mu.Unlock()
	if !w.finished(t, 40*time.Second) {
		t.Fatalf("writers still blocked after 40s; stats %+v", c.Stats())
	}
	slowest, _ := strconv.Atoi(strings.TrimSpace(w.out.String()))
	st := c.Stats()
	t.Logf("%d writers, slowest waited %d ms; stats %+v", n, slowest, st)
	if st.Breaks != n || st.Files != 0 || st.Leases != 0 || st.Revoked != 0 {
		t.Fatalf("stats %+v, want %d breaks and nothing left", st, n)
	}
	if st.Rescans == 0 {
		t.Fatal("the signal queue never overflowed: the test did not test the fallback")
	}
	if slowest > 15000 { // 1 s of stall, then the rescan
		t.Fatalf("a writer waited %d ms", slowest)
	}
}

// 500 guests leasing one file share one fd; one writer's break reaches
// all 500, and the writer waits for the last of them.
func TestManyGuestsOneFile(t *testing.T) {
	dir, path := oneFile(t, "shared")
	c := coordinator(t, dir, Config{AckTimeout: 20 * time.Second})
	r := requestFor(t, path)
	b := newBreaks()
	ss := map[ID]*Session{}
	for i := range 500 {
		s := session(t, c, "g"+strconv.Itoa(i), b.sink)
		ss[mustAcquire(t, s, r)] = s
	}
	if st := c.Stats(); st.Files != 1 || st.Leases != 500 {
		t.Fatalf("stats %+v", st)
	}
	if n := fdsOn(t, path); n != 1 {
		t.Fatalf("%d fds open on the file, want 1", n)
	}
	w := startWriter(t, "open", path)
	got := map[ID]bool{}
	for len(got) < 500 {
		for _, id := range b.next(t) {
			if ss[id] == nil || got[id] {
				t.Fatalf("unexpected break for %x", id)
			}
			got[id] = true
		}
	}
	var last ID
	for id, s := range ss {
		if last == 0 {
			last = id
			continue
		}
		if err := s.Ack(id); err != nil {
			t.Fatal(err)
		}
	}
	if w.finished(t, 200*time.Millisecond) {
		t.Fatal("the writer went on with one ack missing")
	}
	ss[last].Ack(last)
	if !w.finished(t, 5*time.Second) {
		t.Fatal("writer still blocked")
	}
}

// Quotas, forged and foreign ids, and acks for breaks never sent are
// refused, and do nothing to anyone else's leases.
func TestUntrustedGuests(t *testing.T) {
	dir := exportFS(t, 32)
	var paths []string
	for i := range 8 {
		p := filepath.Join(dir, "f"+strconv.Itoa(i))
		writeFile(t, p, []byte("data"+strconv.Itoa(i)))
		paths = append(paths, p)
	}
	c := coordinator(t, dir, Config{MaxPerGuest: 3, MaxFiles: 8})
	a := session(t, c, "a", newBreaks().sink)
	b := session(t, c, "b", newBreaks().sink)
	var aids []ID
	for i := range 3 {
		aids = append(aids, mustAcquire(t, a, requestFor(t, paths[i])))
	}
	_, err := a.Acquire(requestFor(t, paths[3]))
	wantErr(t, "over the guest's lease cap", err, ErrQuota)
	// b's share is half of what a leaves: (8 - 3) / 2.
	mustAcquire(t, b, requestFor(t, paths[3]))
	mustAcquire(t, b, requestFor(t, paths[4]))
	_, err = b.Acquire(requestFor(t, paths[5]))
	wantErr(t, "over the guest's share of the host's files", err, ErrQuota)
	bshared := mustAcquire(t, b, requestFor(t, paths[0])) // no new fd needed
	if st := c.Stats(); st.Files != 5 || st.QuotaRefusals != 2 {
		t.Fatalf("stats %+v", st)
	}

	// b uses a's ids; made-up ids; a's ack of a lease not being broken.
	for _, id := range append(aids, 0, 1, ID(rand.Uint64())) {
		wantErr(t, "foreign release", b.Release(id), ErrUnknown)
		wantErr(t, "foreign ack", b.Ack(id), ErrUnknown)
		_, err := b.ReadAt(id, make([]byte, 4), 0)
		wantErr(t, "foreign read", err, ErrUnknown)
	}
	wantErr(t, "ack without a break", a.Ack(aids[0]), ErrNotBreaking)
	a.Release(aids[2])
	wantErr(t, "ack after release", a.Ack(aids[2]), ErrUnknown)
	wantErr(t, "release twice", a.Release(aids[2]), ErrUnknown)
	// Nothing happened to a's remaining leases or b's.
	for i, id := range aids[:2] {
		buf := make([]byte, 5)
		if n, err := a.ReadAt(id, buf, 0); err != nil || string(buf[:n]) != "data"+strconv.Itoa(i) {
			t.Fatalf("a's lease %d: %q %v", i, buf[:n], err)
		}
	}
	if _, err := b.ReadAt(bshared, make([]byte, 4), 0); err != nil {
		t.Fatal(err)
	}
	if st := c.Stats(); st.Leases != 5 || st.Files != 4 {
		t.Fatalf("stats %+v", st)
	}
}

func TestSessionsResumeWithinGrace(t *testing.T) {
	dir, path := oneFile(t, "x")
	c := coordinator(t, dir, Config{Grace: 300 * time.Millisecond})
	s := session(t, c, "g", newBreaks().sink)
	id := mustAcquire(t, s, requestFor(t, path))
	s.Detach(1)
	time.Sleep(100 * time.Millisecond)
	r, att, err := c.Resume(s.Token(), "g", "g again", newBreaks().sink)
	if err != nil || r != s || att != 2 {
		t.Fatalf("resume: %v, attachment %d", err, att)
	}
	if _, err := s.ReadAt(id, make([]byte, 1), 0); err != nil {
		t.Fatalf("lease after resume: %v", err)
	}
	if _, _, err := c.Resume(Token{1}, "g", "thief", newBreaks().sink); err != ErrNoSession {
		t.Fatalf("made-up token: %v", err)
	}
	if _, _, err := c.Resume(s.Token(), "another guest", "thief", newBreaks().sink); err != ErrNoSession {
		t.Fatalf("another guest with the token: %v", err)
	}
	// The first connection is found dead only now: that does not detach
	// the session, which lives on the second.
	s.Detach(1)
	time.Sleep(500 * time.Millisecond)
	if _, err := s.ReadAt(id, make([]byte, 1), 0); err != nil {
		t.Fatalf("an old connection's end detached the resumed session: %v", err)
	}
	s.Detach(2)
	eventually(t, "the session expires", func() bool { return c.Stats().Sessions == 0 })
	if st := c.Stats(); st.Files != 0 || st.Leases != 0 {
		t.Fatalf("stats %+v", st)
	}
	if _, _, err := c.Resume(s.Token(), "g", "late", newBreaks().sink); err != ErrNoSession {
		t.Fatalf("resume after the grace period: %v", err)
	}
}

// Two copies of one VM (restored from one snapshot) present the same
// secret: the session lives on one of them. Each resume gives a new
// secret; the one before resumes it only until the new attachment is
// confirmed, and a secret handed to a copy that lost the session
// resumes nothing.
func TestCopiesOfASessionCannotBothHoldIt(t *testing.T) {
	dir, path := oneFile(t, "x")
	c := coordinator(t, dir, Config{Grace: time.Minute})
	s := session(t, c, "g", newBreaks().sink)
	mustAcquire(t, s, requestFor(t, path))
	t0 := s.Secret()
	s.Detach(1)

	// Copy A resumes and is given t1, but has not used it yet.
	if _, att, err := c.Resume(t0, "g", "copy A", newBreaks().sink); err != nil || att != 2 {
		t.Fatalf("copy A: %v, attachment %d", err, att)
	}
	t1 := s.Secret()
	if t1 == t0 {
		t.Fatal("a resume kept the secret")
	}
	// Copy B comes with t0 while A's attachment is unconfirmed (A's
	// Welcome may have been lost): it takes the session, with t2, and t1
	// is good no more.
	if _, att, err := c.Resume(t0, "g", "copy B", newBreaks().sink); err != nil || att != 3 {
		t.Fatalf("copy B: %v, attachment %d", err, att)
	}
	t2 := s.Secret()
	if _, _, err := c.Resume(t1, "g", "copy A again", newBreaks().sink); err != ErrNoSession {
		t.Fatalf("copy A with the secret it was given before B came: %v", err)
	}
	// B uses its session: t0 is good no more either.
	s.Confirm(2) // an older attachment's confirmation counts for nothing
	if _, att, err := c.Resume(t0, "g", "copy C", newBreaks().sink); err != nil || att != 4 {
		t.Fatalf("t0 before B's confirmation: %v, attachment %d", err, att)
	}
	t3 := s.Secret()
	s.Confirm(4)
	for _, tok := range []Token{t0, t1, t2} {
		if _, _, err := c.Resume(tok, "g", "a copy", newBreaks().sink); err != ErrNoSession {
			t.Fatalf("secret %x after the confirmation: %v", tok[:4], err)
		}
	}
	if _, att, err := c.Resume(t3, "g", "the holder", newBreaks().sink); err != nil || att != 5 {
		t.Fatalf("the current secret: %v, attachment %d", err, att)
	}
	if s.Token() != t0 {
		t.Fatal("the session's name changed with its secret")
	}
}

// A detached guest cannot acknowledge, so a break revokes its lease at
// once instead of holding the writer for the deadline.
func TestBreakDoesNotWaitForDetachedGuests(t *testing.T) {
	dir, path := oneFile(t, "x")
	c := coordinator(t, dir, Config{AckTimeout: 20 * time.Second, Grace: time.Minute})
	s := session(t, c, "g", newBreaks().sink)
	id := mustAcquire(t, s, requestFor(t, path))
	s.Detach(1)
	w := startWriter(t, "open", path)
	if !w.finished(t, 5*time.Second) {
		t.Fatal("writer waits for a detached guest")
	}
	c.Resume(s.Token(), "g", "back", newBreaks().sink)
	_, err := s.ReadAt(id, make([]byte, 1), 0)
	wantErr(t, "after reconnecting", err, ErrRevoked)
}

const (
	fiFreeze = 0xC0045877
	fiThaw   = 0xC0045878
)

// A truncate waiting on a break holds up a freeze; the break path must
// not wait on the freeze in turn. Releasing the last lease of an unlinked
// file while the freeze is pending or done (its close would free the
// inode, which waits for the thaw) returns at once, and so does a new
// Acquire.
func TestBreakPathNeverWaitsOnAFreeze(t *testing.T) {
	dir := exportFS(t, 32)
	c := coordinator(t, dir, Config{AckTimeout: 20 * time.Second})
	gone, busy, other := filepath.Join(dir, "gone"), filepath.Join(dir, "busy"), filepath.Join(dir, "other")
	for _, p := range []string{gone, busy, other} {
		writeFile(t, p, bytes.Repeat([]byte("z"), 100000))
	}
	b := newBreaks()
	s := session(t, c, "g", b.sink)
	idGone := mustAcquire(t, s, requestFor(t, gone))
	idBusy := mustAcquire(t, s, requestFor(t, busy))
	rOther := requestFor(t, other)
	os.Remove(gone)

	mnt, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(mnt)
	t.Cleanup(func() { unix.IoctlSetInt(mnt, fiThaw, 0) })

	w := startWriter(t, "truncate", busy)
	b.next(t)
	frozen := make(chan error, 1)
	go func() { frozen <- unix.IoctlSetInt(mnt, fiFreeze, 0) }()
	select {
	case err := <-frozen:
		t.Fatalf("the freeze did not wait for the truncating writer: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	within := func(what string, f func() error) {
		t.Helper()
		done := make(chan error, 1)
		go func() { done <- f() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		case <-time.After(2 * time.Second):
			t.Fatalf("%s waited on the freeze", what)
		}
	}
	within("releasing an unlinked file's last lease", func() error { return s.Release(idGone) })
	within("acknowledging the break", func() error { return s.Ack(idBusy) })
	select {
	case err := <-frozen:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the freeze is still waiting after the ack")
	}
	if !w.finished(t, 5*time.Second) {
		t.Fatal("the writer did not finish")
	}
	within("acquiring while frozen", func() error { _, err := s.Acquire(rOther); return err })
	if err := unix.IoctlSetInt(mnt, fiThaw, 0); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the unlinked file is closed after the thaw", func() bool {
		return c.held.Load() == 1
	})
}

// The lease facts this package is built on (DESIGN.md, "Kernel leases").
// If a kernel changes one, this test fails so the design is revisited.
func TestKernelLeaseFacts(t *testing.T) {
	dir, path := oneFile(t, "x")
	take := func() int {
		fd, err := unix.Open(path, unix.O_RDONLY, 0)
		if err != nil { // between the rename and the link
			fd, err = unix.Open(path+".2", unix.O_RDONLY, 0)
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETLEASE, unix.F_RDLCK); err != nil {
			t.Fatal(err)
		}
		return fd
	}
	// Not broken by these.
	for _, c := range []struct {
		name string
		op   func() error
	}{
		{"rename", func() error { return os.Rename(path, path+".2") }},
		{"link", func() error { return os.Link(path+".2", path) }},
		{"unlink", func() error { return os.Remove(path + ".2") }},
		{"chmod", func() error { return os.Chmod(path, 0o600) }},
		{"utimes", func() error { return os.Chtimes(path, time.Unix(1, 0), time.Unix(1, 0)) }},
		{"xattr", func() error { return unix.Setxattr(path, "user.k", []byte("v"), 0) }},
		{"O_TRUNC", func() error { fd, err := unix.Open(path, unix.O_RDONLY|unix.O_TRUNC, 0); unix.Close(fd); return err }},
	} {
		name, op := c.name, c.op
		fd := take()
		if err := op(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !leaseHeld(fd) {
			t.Errorf("%s broke a read lease", name)
		}
		unix.Close(fd)
	}
	// Broken (and refused) by an open for writing, even a non-blocking one.
	fd := take()
	if _, err := unix.Open(path, unix.O_WRONLY|unix.O_NONBLOCK, 0); err != syscall.EWOULDBLOCK {
		t.Errorf("non-blocking open for writing: %v, want EAGAIN", err)
	}
	if leaseHeld(fd) {
		t.Error("a non-blocking open for writing did not start a break")
	}
	unix.Close(fd)
	// A file open for writing cannot be leased.
	wfd, _ := unix.Open(path, unix.O_WRONLY, 0)
	rfd, _ := unix.Open(path, unix.O_RDONLY, 0)
	if _, err := unix.FcntlInt(uintptr(rfd), unix.F_SETLEASE, unix.F_RDLCK); err != syscall.EAGAIN {
		t.Errorf("lease on a file open for writing: %v, want EAGAIN", err)
	}
	unix.Close(wfd)
	unix.Close(rfd)
	// An unlinked inode still open is reachable by handle.
	writeFile(t, path, []byte("y"))
	r := requestFor(t, path)
	hold, _ := unix.Open(path, unix.O_RDONLY, 0)
	os.Remove(path)
	mfd, _ := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	defer unix.Close(mfd)
	ofd, _, err := openInode(mfd, r.Ino, r.IGen)
	if err != nil {
		t.Fatalf("open_by_handle_at of an unlinked, open inode: %v", err)
	}
	unix.Close(ofd)
	unix.Close(hold)
	if _, _, err := openInode(mfd, r.Ino, r.IGen); err == nil || !regexp.MustCompile("no such inode").MatchString(err.Error()) {
		t.Errorf("after the last close: %v, want not found (ESTALE)", err)
	}
}

// The host's files are shared: a guest that grabs all it can gets half,
// the next half of what is left, and so on, so a guest can always open a
// file while any is left; a guest's quotas hold across all its sessions,
// detached ones included; and a guest with too many sessions loses its
// oldest detached one.
func TestQuotasArePerGuestAndShared(t *testing.T) {
	dir := exportFS(t, 32)
	var paths []string
	for i := range 40 {
		p := filepath.Join(dir, "f"+strconv.Itoa(i))
		writeFile(t, p, []byte("x"))
		paths = append(paths, p)
	}
	c := coordinator(t, dir, Config{MaxFiles: 16, MaxPerGuest: 20, MaxSessionsPerGuest: 3, Grace: time.Minute})
	next := 0
	grab := func(s *Session) int {
		n := 0
		for ; next < len(paths); next++ {
			if _, err := s.Acquire(requestFor(t, paths[next])); err != nil {
				wantErr(t, "grabbing", err, ErrQuota)
				break
			}
			n++
		}
		return n
	}
	hog := session(t, c, "hog", newBreaks().sink)
	if n := grab(hog); n != 8 {
		t.Fatalf("the first guest got %d files of 16, want half", n)
	}
	// New sessions of the same guest get nothing more.
	hog2, err := c.NewSession("hog", "hog again", newBreaks().sink)
	if err != nil {
		t.Fatal(err)
	}
	hog.Detach(1)
	if n := grab(hog2); n != 0 {
		t.Fatalf("a second session of the hog got %d more files", n)
	}
	honest := session(t, c, "honest", newBreaks().sink)
	if n := grab(honest); n != 4 {
		t.Fatalf("the second guest got %d files, want half of the 8 left", n)
	}
	third := session(t, c, "third", newBreaks().sink)
	if n := grab(third); n != 2 {
		t.Fatalf("the third guest got %d files, want 2", n)
	}
	if st := c.Stats(); st.Files != 14 || st.Guests != 3 {
		t.Fatalf("stats %+v", st)
	}
	// Sessions: the hog has two (one detached); two more end the
	// detached one, and its leases go.
	if _, err := c.NewSession("hog", "hog 3", newBreaks().sink); err != nil {
		t.Fatal(err)
	}
	if _, err := c.NewSession("hog", "hog 4", newBreaks().sink); err != nil {
		t.Fatal(err)
	}
	if st := c.Stats(); st.Files != 6 || st.Sessions != 5 {
		t.Fatalf("after the hog's oldest detached session ended: %+v", st)
	}
	// Every session of the hog attached: one more is refused.
	if _, err := c.NewSession("hog", "hog 5", newBreaks().sink); !errors.Is(err, ErrQuota) {
		t.Fatalf("a fourth attached session: %v", err)
	}
}

// Leases names each held file by its path while breaks finish files
// under it: a path read outside the lock is that file's, never that of
// an fd number closed and reused meanwhile.
func TestLeasesNameTheirFilesWhileTheyGo(t *testing.T) {
	const n = 200
	dir := exportFS(t, 64)
	c := coordinator(t, dir, Config{AckTimeout: 10 * time.Second})
	b := newBreaks()
	s := session(t, c, "g", b.sink)
	go func() {
		for ids := range b.ch {
			for _, id := range ids {
				s.Ack(id)
			}
		}
	}()
	t.Cleanup(func() { close(b.ch) })
	var paths []string
	names := map[uint32]string{} // inode → its path below the export
	for i := range n {
		p := filepath.Join(dir, "f"+strconv.Itoa(i))
		writeFile(t, p, []byte{byte(i)})
		r := requestFor(t, p)
		mustAcquire(t, s, r)
		paths, names[r.Ino] = append(paths, p), "/f"+strconv.Itoa(i)
	}
	if ls := c.Leases(); len(ls) != n || ls[0].Path != "/f0" || ls[0].Guest != "g" {
		t.Fatalf("%d leases, the first %+v", len(ls), ls[0])
	}
	stop := make(chan struct{})
	listed := make(chan int)
	go func() {
		seen := 0
		for {
			select {
			case <-stop:
				listed <- seen
				return
			default:
			}
			for _, l := range c.Leases() {
				if l.Path != "" && l.Path != names[l.Inode] {
					t.Errorf("inode %d listed as %q", l.Inode, l.Path)
				}
				seen++
			}
		}
	}()
	w := startWriter(t, "open", paths...)
	if !w.finished(t, 30*time.Second) {
		t.Fatal("writers still blocked")
	}
	close(stop)
	if seen := <-listed; seen == 0 {
		t.Fatal("nothing was listed while the files went")
	}
	if ls := c.Leases(); len(ls) != 0 {
		t.Fatalf("%d leases left", len(ls))
	}
}
