package lease

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// handover plays an upgrade: c stops every change, its held files'
// descriptors are duplicated as an exec would keep them, and c goes
// without giving anything back.
func handover(t *testing.T, c *Coordinator) map[uint32]int {
	t.Helper()
	fds, release := c.Handover()
	kept := map[uint32]int{}
	for ino, fd := range fds {
		d, err := unix.Dup(fd)
		if err != nil {
			t.Fatal(err)
		}
		kept[ino] = d
	}
	release()
	c.Leave()
	return kept
}

// A successor takes over the leases whose files are as recorded: a
// deleted file whose blocks were reused by others still reads its own
// bytes, and its breaks reach the new run; a file changed meanwhile
// (without a break: truncated through a read-only open, or its mtime
// set) and one a writer waits for are revoked, and that writer goes on
// at once.
func TestTakeOverKeepsWhatIsUnchanged(t *testing.T) {
	dir := exportFS(t, 32)
	journal := filepath.Join(t.TempDir(), "x.leases")
	data := make([]byte, 4<<20)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	paths := map[string]string{}
	for _, n := range []string{"deleted", "truncated", "touched", "wanted", "breaks", "released"} {
		paths[n] = filepath.Join(dir, n)
		writeFile(t, paths[n], []byte(n+" bytes"))
	}
	writeFile(t, paths["deleted"], data)
	unix.Sync()

	c1, err := New(Config{Root: dir, Journal: journal})
	if err != nil {
		t.Fatal(err)
	}
	s1 := session(t, c1, "g", newBreaks().sink)
	other := session(t, c1, "h", newBreaks().sink)
	ids := map[string]ID{}
	for n, p := range paths {
		ids[n] = mustAcquire(t, s1, requestFor(t, p))
	}
	otherID := mustAcquire(t, other, requestFor(t, paths["deleted"]))
	if err := s1.Release(ids["released"]); err != nil {
		t.Fatal(err)
	}
	other.Close() // an ended session is not taken over
	held := handover(t, c1)
	if len(held) != 5 {
		t.Fatalf("%d files handed over, want 5", len(held))
	}

	// While no agent runs.
	if err := os.Remove(paths["deleted"]); err != nil {
		t.Fatal(err)
	}
	junk := bytes.Repeat([]byte{0xEE}, 1<<20)
	for i := 0; ; i++ {
		if err := os.WriteFile(filepath.Join(dir, "junk"+strconv.Itoa(i)), junk, 0o644); err != nil {
			break
		}
	}
	if fd, err := unix.Open(paths["truncated"], unix.O_RDONLY|unix.O_TRUNC, 0); err != nil {
		t.Fatal(err)
	} else {
		unix.Close(fd)
	}
	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(paths["touched"], later, later); err != nil {
		t.Fatal(err)
	}
	waiting := startWriter(t, "open", paths["wanted"]) // its break reaches nobody
	if waiting.finished(t, 300*time.Millisecond) {
		t.Fatal("a writer went past a held lease")
	}

	b := newBreaks()
	c2 := coordinator(t, dir, Config{Root: dir, Journal: journal, Held: held, Successor: true})
	if !waiting.finished(t, 5*time.Second) {
		t.Fatal("the writer still waits after the successor revoked its file's leases")
	}
	s2, _, err := c2.Resume(s1.Token(), "g", "g", b.sink)
	if err != nil {
		t.Fatalf("resume: %v", err)
	}
	// The revoked leases reach the guest as a break, for it to fence.
	gone := b.next(t)
	slices.Sort(gone)
	want := []ID{ids["truncated"], ids["touched"], ids["wanted"]}
	slices.Sort(want)
	if !slices.Equal(gone, want) {
		t.Fatalf("break on resume %x, want the revoked %x", gone, want)
	}
	if _, _, err := c2.Resume(other.Token(), "h", "h", newBreaks().sink); err == nil {
		t.Fatal("an ended session was resumed")
	}
	got := make([]byte, len(data))
	if n, err := s2.ReadAt(ids["deleted"], got, 0); err != nil || n != len(data) || !bytes.Equal(got, data) {
		t.Fatalf("the deleted file through the successor: %d bytes, %v, same bytes %v", n, err, bytes.Equal(got, data))
	}
	for _, n := range []string{"truncated", "touched", "wanted"} {
		_, err := s2.ReadAt(ids[n], make([]byte, 8), 0)
		wantErr(t, n, err, ErrRevoked)
	}
	wantErr(t, "a lease released before", s2.Release(ids["released"]), ErrUnknown)
	if _, err := s2.ReadAt(otherID, make([]byte, 1), 0); err == nil {
		t.Fatal("another session's lease read")
	}
	if st := c2.Stats(); st.Files != 2 || st.Leases != 5 || st.Sessions != 1 {
		t.Fatalf("after the takeover: %+v, want 2 files and 5 leases (3 revoked) of one session", st)
	}

	// The lease was taken again for this run: a writer's break reaches it.
	w := startWriter(t, "open", paths["breaks"])
	if got := b.next(t); len(got) != 1 || got[0] != ids["breaks"] {
		t.Fatalf("break %v, want [%x]", got, ids["breaks"])
	}
	if err := s2.Ack(ids["breaks"]); err != nil {
		t.Fatal(err)
	}
	if !w.finished(t, 5*time.Second) {
		t.Fatal("the writer is blocked after the ack")
	}
}

// A journal that does not parse takes over nothing: the handed-over
// files are let go (a writer is not held up by them), and no session
// resumes.
func TestTakeOverRefusesABadJournal(t *testing.T) {
	dir, path := oneFile(t, "hello")
	journal := filepath.Join(t.TempDir(), "x.leases")
	c1, err := New(Config{Root: dir, Journal: journal})
	if err != nil {
		t.Fatal(err)
	}
	s1 := session(t, c1, "g", newBreaks().sink)
	mustAcquire(t, s1, requestFor(t, path))
	held := handover(t, c1)
	b, _ := os.ReadFile(journal)
	if err := os.WriteFile(journal, append([]byte("X garbage\n"), b...), 0o600); err != nil {
		t.Fatal(err)
	}
	takesOverNothing(t, dir, path, journal, held, s1.Token())
}

// takesOverNothing checks that a successor given held and journal
// resumes no session (tok's) and lets the handed-over file at path go:
// a writer of it is not held up.
func takesOverNothing(t *testing.T, dir, path, journal string, held map[uint32]int, tok Token) {
	t.Helper()
	c2 := coordinator(t, dir, Config{Journal: journal, Held: held, Successor: true})
	if _, _, err := c2.Resume(tok, "g", "g", newBreaks().sink); err == nil {
		t.Fatal("a session resumed from a journal that cannot be used")
	}
	w := startWriter(t, "open", path)
	if !w.finished(t, 5*time.Second) {
		t.Fatal("a file handed over and not taken over still holds its writer")
	}
}

// The journal is rewritten when it has grown, and says the same after.
func TestJournalCompacts(t *testing.T) {
	dir, path := oneFile(t, "hello")
	journal := filepath.Join(t.TempDir(), "x.leases")
	c := coordinator(t, dir, Config{Journal: journal})
	s := session(t, c, "g", newBreaks().sink)
	r := requestFor(t, path)
	keep := mustAcquire(t, s, r)
	for range 3000 {
		if err := s.Release(mustAcquire(t, s, r)); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(journal)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(b), "\n"); n > 4*3+4096 {
		t.Fatalf("the journal has %d lines for 3 live records", n)
	}
	l, err := readJournal(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if len(l.sessions) != 1 || len(l.files) != 1 {
		t.Fatalf("journal read back: %d sessions, %d files", len(l.sessions), len(l.files))
	}
	live := 0
	for _, g := range l.sessions[0].grants {
		if !g.dropped {
			live++
			if g.id != keep || g.file == nil {
				t.Fatalf("lease %x (file %v), want %x on its file", g.id, g.file, keep)
			}
		}
	}
	if live != 1 {
		t.Fatalf("%d live leases in the journal, want 1", live)
	}
}

func FuzzReadJournal(f *testing.F) {
	f.Add([]byte("F 12 7 5 1 2 0\nS 000102030405060708090a0b0c0d0e0f \"g\" \"g\"\nG 000102030405060708090a0b0c0d0e0f 1f 12 3 99\nV 1f\nD 1f\nC 12\nE 000102030405060708090a0b0c0d0e0f\n"))
	f.Add([]byte("S 00 \"g\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := readJournal(bytes.NewReader(b))
		if err == nil && l == nil {
			t.Fatal("no ledger and no error")
		}
	})
}

// A journal that cannot be written (its disk full) is given up whole, not
// left partial: leases go on being granted, and a successor takes over
// nothing — no session resumes, and the handed-over files are let go.
func TestJournalThatCannotBeWrittenIsGivenUp(t *testing.T) {
	dir, path := oneFile(t, "hello")
	journal := filepath.Join(t.TempDir(), "x.leases")
	c1, err := New(Config{Root: dir, Journal: journal})
	if err != nil {
		t.Fatal(err)
	}
	s1 := session(t, c1, "g", newBreaks().sink)
	full, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	c1.mu.Lock()
	c1.journal.f.Close()
	c1.journal.f = full // every write fails with ENOSPC
	c1.mu.Unlock()
	id := mustAcquire(t, s1, requestFor(t, path))
	if n, err := s1.ReadAt(id, make([]byte, 5), 0); err != nil || n != 5 {
		t.Fatalf("a lease granted while the journal fails reads %d %v", n, err)
	}
	if _, err := os.Stat(journal); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the journal that failed is still there: %v", err)
	}
	takesOverNothing(t, dir, path, journal, handover(t, c1), s1.Token())
}

// A journal is read within bounds: a line longer than any an agent
// writes, or a file that is not a regular one (a FIFO would block, a
// symlink could point anywhere), makes it unusable — at once, and with
// memory to match.
func TestJournalBounds(t *testing.T) {
	long := "S 000102030405060708090a0b0c0d0e0f \"" + strings.Repeat("g", 1<<20) + "\" \"g\"\n"
	if _, err := readJournal(strings.NewReader(long)); err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Fatalf("a 1 MiB line: %v", err)
	}
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.leases")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadJournal(fifo); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Fatalf("a FIFO: %v", err)
	}
	link := filepath.Join(dir, "link.leases")
	if err := os.Symlink("/etc/passwd", link); err != nil {
		t.Fatal(err)
	}
	if _, err := loadJournal(link); err == nil {
		t.Fatal("a symlink was read as a journal")
	}
}

// A successor takes over no more of a guest's sessions than the cap
// allows (its newest), whatever the journal says.
func TestTakeoverKeepsTheSessionCap(t *testing.T) {
	dir, _ := oneFile(t, "hello")
	journal := filepath.Join(t.TempDir(), "x.leases")
	var b strings.Builder
	for i := range 200 {
		fmt.Fprintf(&b, "S %032x \"g\" \"s%d\"\n", i+1, i)
	}
	if err := os.WriteFile(journal, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	c := coordinator(t, dir, Config{Journal: journal, Successor: true, MaxSessionsPerGuest: 8})
	c.mu.Lock()
	n := len(c.sessions)
	c.mu.Unlock()
	if n != 8 {
		t.Fatalf("took over %d sessions of one guest; its cap is 8", n)
	}
	var newest Token
	newest[15] = 200
	if _, _, err := c.Resume(newest, "g", "g", newBreaks().sink); err != nil {
		t.Fatalf("the newest session was not taken over: %v", err)
	}
}

// A successor takes over each session's resume secrets as they were: the
// current one, and the one before while the guest had not shown it has
// the current one (Confirm); no other.
func TestTakeOverKeepsTheSecrets(t *testing.T) {
	for _, confirmed := range []bool{false, true} {
		t.Run(fmt.Sprint("confirmed=", confirmed), func(t *testing.T) {
			dir, path := oneFile(t, "x")
			journal := filepath.Join(t.TempDir(), "x.leases")
			c1, err := New(Config{Root: dir, Journal: journal})
			if err != nil {
				t.Fatal(err)
			}
			s := session(t, c1, "g", newBreaks().sink)
			mustAcquire(t, s, requestFor(t, path))
			t0 := s.Secret()
			if _, _, err := c1.Resume(t0, "g", "g", newBreaks().sink); err != nil {
				t.Fatal(err)
			}
			t1 := s.Secret()
			if confirmed {
				s.Confirm(2)
			}
			held := handover(t, c1)
			c2 := coordinator(t, dir, Config{Root: dir, Journal: journal, Held: held, Successor: true})
			if _, _, err := c2.Resume(Token{9}, "g", "g", newBreaks().sink); err != ErrNoSession {
				t.Fatalf("a made-up secret: %v", err)
			}
			old := t0
			if confirmed {
				if _, _, err := c2.Resume(t0, "g", "g", newBreaks().sink); err != ErrNoSession {
					t.Fatalf("the secret before a confirmed one: %v", err)
				}
				old = t1
			}
			s2, _, err := c2.Resume(old, "g", "g", newBreaks().sink)
			if err != nil || s2.Token() != s.Token() || s2.Leases() != 1 {
				t.Fatalf("resume on the successor: %v", err)
			}
		})
	}
}
