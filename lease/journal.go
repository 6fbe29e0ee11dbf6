package lease

import (
	"bufio"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// The journal records, as they change, the files a coordinator holds,
// its sessions and their leases, one line each, so that the next run of
// the agent can take them over (Config.Journal, Config.Held): an upgrade
// that hands it the held files, or a restart whose files systemd kept.
//
//	F ino igen size mtime-sec mtime-nsec layout   a file is held
//	C ino                                         no longer
//	S token guest name                            a session began (guest and name quoted)
//	E token                                       it ended
//	K token secret prev                           its resume secrets (Session.secret)
//	G token id ino generation since-unix-ns       a lease was granted
//	V id                                          it was revoked
//	D id                                          it ended
//
// Each line is one write(2) on the agent's side, before the lease it
// records is answered, so a crash loses no lease a guest was told of.
// The file is rewritten whole, with only what is live, when it has grown
// to several times that.

// journal writes the journal. Its methods are called with c.mu held.
type journal struct {
	path    string
	log     hclog.Logger // nil for a compaction's new file: its failure is the journal's
	f       *os.File
	lines   int // written since the last rewrite
	failed  error
	scratch []byte
}

func openJournal(path string, log hclog.Logger) (*journal, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lease journal: %w", err)
	}
	return &journal{path: path, f: f, log: log}, nil
}

// write appends one line, and any added before it, in one write(2). A
// journal that could not be written is removed and written no more: a
// successor then takes over nothing, which is safe, rather than part of
// the truth, which is not.
func (j *journal) write(format string, args ...any) {
	j.add(format, args...)
	j.flush()
}

// add buffers a line for the next write or flush.
func (j *journal) add(format string, args ...any) {
	if j == nil || j.failed != nil {
		return
	}
	j.scratch = fmt.Appendf(j.scratch, format, args...)
	j.scratch = append(j.scratch, '\n')
	j.lines++
}

// flush writes what add buffered.
func (j *journal) flush() {
	if j == nil || j.failed != nil || len(j.scratch) == 0 {
		return
	}
	_, err := j.f.Write(j.scratch)
	j.scratch = j.scratch[:0]
	if err != nil {
		j.fail(err)
	}
}

func (j *journal) fail(err error) {
	j.failed = err
	j.f.Close()
	os.Remove(j.path)
	if j.log != nil {
		j.log.Error("the lease journal could not be written and is given up: an upgrade or restart will not keep the guests' leases (their open files will read ESTALE)",
			"journal", j.path, "error", err)
	}
}

func (j *journal) close() {
	if j != nil && j.failed == nil {
		j.f.Close()
		j.failed = ErrClosed
	}
}

// file is added, not written: the lease granted on it comes next.
func (j *journal) file(f *file) {
	j.add("F %d %d %d %d %d %d", f.ino, f.igen, f.size, f.mtime.Sec, f.mtime.Nsec, f.layout.Load())
}
func (j *journal) fileDone(f *file)      { j.write("C %d", f.ino) }
func (j *journal) session(s *Session)    { j.write("S %x %q %q", s.token[:], s.acct.guest, s.name) }
func (j *journal) sessionEnd(s *Session) { j.write("E %x", s.token[:]) }
func (j *journal) secret(s *Session)     { j.write("K %x %x %x", s.token[:], s.secret[:], s.prev[:]) }
func (j *journal) grant(g *grant) {
	j.write("G %x %x %d %d %d", g.s.token[:], uint64(g.id), g.f.ino, g.gen, g.since.UnixNano())
}
func (j *journal) revoke(g *grant) { j.write("V %x", uint64(g.id)) }
func (j *journal) drop(g *grant)   { j.add("D %x", uint64(g.id)) } // end flushes

// compact rewrites the journal with only what c holds now, once it has
// grown to four times that. Called with c.mu held.
func (c *Coordinator) compact(force bool) {
	j := c.journal
	if j == nil || j.failed != nil {
		return
	}
	live := len(c.files) + len(c.sessions) + len(c.grants)
	if !force && j.lines < 4*live+4096 {
		return
	}
	j.flush()
	tmp := j.path + ".new"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		j.fail(err)
		return
	}
	old := j.f
	j.f, j.lines = f, 0
	w := &journal{path: tmp, f: f}
	for _, fl := range c.files {
		if fl.state == held || fl.state == breaking {
			w.file(fl)
		}
	}
	for _, s := range c.sessions {
		w.session(s)
		if s.secret != s.token {
			w.secret(s)
		}
		for _, g := range s.grants {
			if g.f != nil {
				w.grant(g)
			}
		}
	}
	// A revoked lease stays revoked: it is written against no file.
	for _, s := range c.sessions {
		for _, g := range s.grants {
			if g.f == nil {
				w.write("G %x %x 0 %d %d", s.token[:], uint64(g.id), g.gen, g.since.UnixNano())
				w.revoke(g)
			}
		}
	}
	w.flush()
	old.Close()
	if err := w.failed; err == nil {
		err = os.Rename(tmp, j.path)
		if err != nil {
			w.fail(err)
		}
	}
	if w.failed != nil {
		j.fail(w.failed)
		return
	}
	j.lines = w.lines
}

// ledger is a journal read back: what the run that wrote it held.
type ledger struct {
	files    map[uint32]*heldRec
	sessions []*sessionRec
}

type heldRec struct {
	ino, igen uint32
	size      int64
	mtime     unix.Timespec
	layout    uint64
}

type sessionRec struct {
	token, secret, prev Token
	guest, name         string
	grants              []*grantRec
	ended               bool
}

type grantRec struct {
	id      ID
	file    *heldRec // nil: revoked
	gen     uint64
	since   time.Time
	dropped bool
}

// readJournal reads a journal back. A last line without its newline (a
// write cut short) is ignored; any other line that does not parse makes
// the whole journal unusable, for a successor must not take over
// anything it is unsure of.
func readJournal(r io.Reader) (*ledger, error) {
	l := &ledger{files: map[uint32]*heldRec{}}
	sessions := map[Token]*sessionRec{}
	grants := map[ID]*grantRec{}
	onFile := map[*heldRec][]*grantRec{}
	br := bufio.NewReaderSize(r, maxJournalLine)
	for n := 1; ; n++ {
		b, err := br.ReadSlice('\n')
		if errors.Is(err, io.EOF) {
			return l, nil // a partial last line is dropped with it
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			return nil, fmt.Errorf("lease journal, line %d: longer than %d bytes", n, maxJournalLine)
		}
		if err != nil {
			return nil, err
		}
		if err := l.apply(strings.TrimSuffix(string(b), "\n"), sessions, grants, onFile); err != nil {
			return nil, fmt.Errorf("lease journal, line %d: %w", n, err)
		}
	}
}

func (l *ledger) apply(line string, sessions map[Token]*sessionRec, grants map[ID]*grantRec, onFile map[*heldRec][]*grantRec) error {
	op, rest, _ := strings.Cut(line, " ")
	f := strings.Fields(rest)
	revokeAll := func(h *heldRec) {
		for _, g := range onFile[h] {
			g.file = nil
		}
		delete(onFile, h)
	}
	switch op {
	case "F":
		var h heldRec
		if err := scanInts(f, &h.ino, &h.igen, &h.size, &h.mtime.Sec, &h.mtime.Nsec, &h.layout); err != nil {
			return err
		}
		if old := l.files[h.ino]; old != nil {
			revokeAll(old)
		}
		l.files[h.ino] = &h
	case "C":
		var ino uint32
		if err := scanInts(f, &ino); err != nil {
			return err
		}
		if h := l.files[ino]; h != nil {
			revokeAll(h)
			delete(l.files, ino)
		}
	case "S":
		if len(f) < 1 {
			return errors.New("a session without a token")
		}
		tok, err := parseToken(f[0])
		if err != nil {
			return err
		}
		s := &sessionRec{token: tok, secret: tok}
		q := strings.TrimPrefix(rest, f[0]+" ")
		if s.guest, q, err = unquote(q); err != nil {
			return err
		}
		if s.name, q, err = unquote(strings.TrimPrefix(q, " ")); err != nil || q != "" {
			return cmpErr(err, "trailing bytes after a session's name")
		}
		if sessions[tok] != nil {
			return fmt.Errorf("session %x begins twice", tok[:])
		}
		sessions[tok] = s
		l.sessions = append(l.sessions, s)
	case "K":
		if len(f) != 3 {
			return errors.New("want K token secret prev")
		}
		var toks [3]Token
		for i := range toks {
			t, err := parseToken(f[i])
			if err != nil {
				return err
			}
			toks[i] = t
		}
		s := sessions[toks[0]]
		if s == nil {
			return fmt.Errorf("secrets of no session %x", toks[0][:])
		}
		s.secret, s.prev = toks[1], toks[2]
	case "E":
		if len(f) != 1 {
			return errors.New("want E token")
		}
		tok, err := parseToken(f[0])
		if err != nil {
			return err
		}
		if s := sessions[tok]; s != nil {
			s.ended = true
			delete(sessions, tok)
		}
	case "G":
		if len(f) != 5 {
			return errors.New("want G token id ino generation since")
		}
		tok, err := parseToken(f[0])
		if err != nil {
			return err
		}
		var id, gen uint64
		var ino uint32
		var since int64
		if id, err = strconv.ParseUint(f[1], 16, 64); err != nil || id == 0 {
			return cmpErr(err, "lease id 0")
		}
		if err := scanInts(f[2:], &ino, &gen, &since); err != nil {
			return err
		}
		s := sessions[tok]
		if s == nil {
			return fmt.Errorf("a lease of session %x, which is not open", tok[:])
		}
		if grants[ID(id)] != nil {
			return fmt.Errorf("lease %x is granted twice", id)
		}
		g := &grantRec{id: ID(id), gen: gen, since: time.Unix(0, since), file: l.files[ino]}
		if ino == 0 {
			g.file = nil
		}
		if g.file != nil {
			onFile[g.file] = append(onFile[g.file], g)
		}
		grants[g.id] = g
		s.grants = append(s.grants, g)
	case "V", "D":
		if len(f) != 1 {
			return fmt.Errorf("want %s id", op)
		}
		id, err := strconv.ParseUint(f[0], 16, 64)
		if err != nil {
			return err
		}
		g := grants[ID(id)]
		if g == nil {
			return nil // of a session that ended
		}
		g.file = nil
		if op == "D" {
			g.dropped = true
			delete(grants, g.id)
		}
	default:
		return fmt.Errorf("unknown record %q", op)
	}
	return nil
}

// scanInts parses fields into integers, exactly as many as given.
func scanInts(fields []string, into ...any) error {
	if len(fields) != len(into) {
		return fmt.Errorf("want %d numbers, have %d", len(into), len(fields))
	}
	for i, p := range into {
		var err error
		switch p := p.(type) {
		case *uint32:
			var v uint64
			v, err = strconv.ParseUint(fields[i], 10, 32)
			*p = uint32(v)
		case *uint64:
			*p, err = strconv.ParseUint(fields[i], 10, 64)
		case *int64:
			*p, err = strconv.ParseInt(fields[i], 10, 64)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func parseToken(s string) (Token, error) {
	var t Token
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(t) {
		return t, fmt.Errorf("bad session token %q", s)
	}
	copy(t[:], b)
	return t, nil
}

func unquote(s string) (string, string, error) {
	q, err := strconv.QuotedPrefix(s)
	if err != nil {
		return "", "", fmt.Errorf("want a quoted string: %w", err)
	}
	v, err := strconv.Unquote(q)
	return v, s[len(q):], err
}

func cmpErr(err error, why string) error {
	if err != nil {
		return err
	}
	return errors.New(why)
}

// loadJournal reads the journal at path, if any. The file is left for
// the new journal to replace.
func loadJournal(path string) (*ledger, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	switch {
	case err != nil:
		return nil, err
	case !st.Mode().IsRegular():
		return nil, fmt.Errorf("lease journal %s is not a regular file", path)
	case st.Size() > maxJournal:
		return nil, fmt.Errorf("lease journal %s is %d bytes, more than the %d a journal of any run has", path, st.Size(), maxJournal)
	}
	return readJournal(io.LimitReader(f, maxJournal))
}

// A journal's bounds: its lines are short (a session's line, the
// longest, quotes a guest's and a peer's name), and it is compacted as
// it grows, so one larger than maxJournal was not written by an agent.
const (
	maxJournalLine = 16 << 10
	maxJournal     = 1 << 30
)
