package upgrade

import (
	"bufio"
	"encoding/gob"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/leasefs/leasefs/hostagent"
)

// Format numbers the shape of Document. It changes whenever the shape
// does (TestDocumentShape fails until it has), so that a binary never
// reads a document of another shape: gob would fill what the sender did
// not have with zeroes. A binary says which form it takes ('leasefs
// version --handover'), and an agent execs no binary that takes another.
//
// Form 1 was the same state in a gob without a header (leasefs before
// this package): it is refused, not migrated, since no binary of form 1
// execs one of another form.
const Format = 2

// magic starts a document, followed by its form and a newline.
const magic = "leasefs-handover "

// Document is what an agent hands the binary it execs. Descriptors are
// passed by number, kept open across the exec.
type Document struct {
	From        string                            // the version handing over
	StateLock   int                               // the state directory, locked
	Control     int                               // the control socket; -1: none
	ControlAddr string                            // what Control listens on
	Listeners   map[string]int                    // the guests' listening sockets, by address
	Exports     map[string]*hostagent.ExportState // by name
	Reap        []int                             // the old watchdogs' pids: they end at the exec, and are the successor's children
}

// descriptors lists every descriptor d names.
func (d *Document) descriptors() []int {
	fds := []int{d.StateLock}
	if d.Control >= 0 {
		fds = append(fds, d.Control)
	}
	for _, fd := range d.Listeners {
		fds = append(fds, fd)
	}
	for _, st := range d.Exports {
		fds = append(fds, st.Descriptors()...)
	}
	return fds
}

// FormatError is a document of a form this binary does not take.
type FormatError struct {
	Got int // 0: no header (form 1, or not a document at all)
}

func (e *FormatError) Error() string {
	if e.Got == 0 {
		return fmt.Sprintf("the state handed over has no header (form 1, from an older leasefs, or not a handover at all); this binary takes form %d", Format)
	}
	return fmt.Sprintf("the state handed over is of form %d; this binary takes form %d", e.Got, Format)
}

// Encode writes d, its header first.
func Encode(w io.Writer, d *Document) error {
	if _, err := fmt.Fprintf(w, "%s%d\n", magic, Format); err != nil {
		return err
	}
	return gob.NewEncoder(w).Encode(d)
}

// Decode reads a document Encode wrote, refusing one of another form
// (a *FormatError).
func Decode(r io.Reader) (*Document, error) {
	br := bufio.NewReader(r)
	head, err := br.Peek(len(magic))
	if err != nil || string(head) != magic {
		return nil, &FormatError{}
	}
	br.Discard(len(magic))
	line, err := br.ReadString('\n')
	if err != nil || len(line) > 10 {
		return nil, errors.New("the state handed over has a broken header")
	}
	form, err := strconv.Atoi(strings.TrimSuffix(line, "\n"))
	if err != nil || form <= 0 {
		return nil, fmt.Errorf("the state handed over has a broken header (form %q)", strings.TrimSuffix(line, "\n"))
	}
	if form != Format {
		return nil, &FormatError{Got: form}
	}
	d := &Document{}
	if err := gob.NewDecoder(br).Decode(d); err != nil {
		return nil, fmt.Errorf("reading the state handed over: %w", err)
	}
	return d, nil
}
