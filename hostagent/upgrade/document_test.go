package upgrade

import (
	"bytes"
	"encoding/gob"
	"errors"
	"flag"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/lease"
)

var update = flag.Bool("update", false, "write the golden files again (after raising Format)")

// sample is a document with one of everything (maps of one entry, so
// that its encoding is one sequence of bytes).
func sample() *Document {
	var tok lease.Token
	copy(tok[:], "0123456789abcdef")
	var h hostagent.Hash
	h[0], h[31] = 0xab, 0xcd
	return &Document{
		From: "v1.2.3", StateLock: 3, Control: 4, ControlAddr: "unix:/run/leasefs/control.sock",
		Listeners: map[string]int{"vsock:1024": 5},
		Exports: map[string]*hostagent.ExportState{"mirror": {
			Device: "/dev/vdb", Mount: "/srv/mirror", MountFD: 6,
			Store: hostagent.StoreState{FD: 7, Slots: []hostagent.SlotState{{Hash: h, Off: 4096, Size: 4096, Ref: 2}},
				Free: map[int][]int64{4096: {8192}}, End: 12288},
			Gens: []hostagent.GenState{{Number: 9, BlockSize: 4096, Captured: time.Date(2026, 12, 7, 11, 0, 0, 0, time.UTC),
				Frozen: 3 * time.Millisecond, Label: "r9", Full: true, Blocks: map[uint64]hostagent.Hash{1: h},
				Deps: map[uint32][]uint64{2: {1}}, Tables: [][2]uint64{{5, 16}}}},
			Next: 10, Cur: 9, Label: "r9",
			Held:   map[uint32]int{12: 8},
			On:     map[lease.Token]uint64{tok: 9},
			Pinned: map[lease.Token]bool{tok: true},
			Kept:   []hostagent.KeptState{{Ino: 13, IGen: 1, FD: 9, Size: 100, First: 8, Last: 9}},
		}},
		Reap: []int{4242},
	}
}

// TestDocumentShape ties Format to the document's shape: a field added,
// removed or retyped anywhere in it (hostagent's states included) fails
// here until Format is raised and the golden files written again
// (go test ./hostagent/upgrade -run Document -update).
func TestDocumentShape(t *testing.T) {
	got := fmt.Sprintf("form %d\n%s", Format, shape(reflect.TypeFor[Document]()))
	golden(t, "testdata/shape.txt", []byte(got), func(want []byte) {
		t.Errorf("the handover document changed shape: raise Format (now %d) and run with -update.\nwant:\n%s\ngot:\n%s", Format, want, got)
	})
}

// TestDocumentEncoding: the bytes of the sample are those of the golden
// file, and reading them back gives the sample.
func TestDocumentEncoding(t *testing.T) {
	var buf bytes.Buffer
	if err := Encode(&buf, sample()); err != nil {
		t.Fatal(err)
	}
	golden(t, fmt.Sprintf("testdata/document-%d.bin", Format), buf.Bytes(), func([]byte) {
		t.Errorf("the sample document encodes differently from testdata/document-%d.bin: if its shape changed, raise Format", Format)
	})
	b, err := os.ReadFile(fmt.Sprintf("testdata/document-%d.bin", Format))
	if err != nil {
		t.Fatal(err)
	}
	d, err := Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(d, sample()) {
		t.Errorf("read back:\n%+v\nwant:\n%+v", d, sample())
	}
}

// TestOtherFormsRefused: a document of another form, or none, is
// refused, never read with its missing parts zero.
func TestOtherFormsRefused(t *testing.T) {
	var bare bytes.Buffer // form 1: the gob alone
	if err := gob.NewEncoder(&bare).Encode(sample()); err != nil {
		t.Fatal(err)
	}
	var body bytes.Buffer
	if err := Encode(&body, sample()); err != nil {
		t.Fatal(err)
	}
	gobOnly := body.Bytes()[len(fmt.Sprintf("%s%d\n", magic, Format)):]
	for _, c := range []struct {
		name string
		doc  []byte
		form int // of the FormatError; -1: another error
	}{
		{"form 1, no header", bare.Bytes(), 0},
		{"empty", nil, 0},
		{"older", append([]byte(magic+"1\n"), gobOnly...), 1},
		{"newer", append([]byte(fmt.Sprintf("%s%d\n", magic, Format+1)), gobOnly...), Format + 1},
		{"broken header", []byte(magic + "two\n"), -1},
		{"header alone", []byte(fmt.Sprintf("%s%d\n", magic, Format)), -1},
		{"cut short", body.Bytes()[:body.Len()/2], -1},
	} {
		d, err := Decode(bytes.NewReader(c.doc))
		var fe *FormatError
		switch {
		case err == nil:
			t.Errorf("%s: read as %+v", c.name, d)
		case c.form >= 0 && (!errors.As(err, &fe) || fe.Got != c.form):
			t.Errorf("%s: %v, want a FormatError of form %d", c.name, err, c.form)
		case c.form < 0 && errors.As(err, &fe):
			t.Errorf("%s: %v, want another error", c.name, err)
		}
	}
}

func FuzzDecode(f *testing.F) {
	var buf bytes.Buffer
	if err := Encode(&buf, sample()); err != nil {
		f.Fatal(err)
	}
	f.Add(buf.Bytes())
	f.Add([]byte(magic + "2\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = Decode(bytes.NewReader(b))
	})
}

// shape describes t and every named struct type in it, a field a line.
func shape(t reflect.Type) string {
	seen := map[reflect.Type]bool{}
	var out []string
	var walk func(reflect.Type)
	walk = func(t reflect.Type) {
		switch t.Kind() {
		case reflect.Pointer, reflect.Slice, reflect.Array:
			walk(t.Elem())
		case reflect.Map:
			walk(t.Key())
			walk(t.Elem())
		case reflect.Struct:
			if seen[t] || t == reflect.TypeFor[time.Time]() {
				return
			}
			seen[t] = true
			var b strings.Builder
			fmt.Fprintf(&b, "%s\n", t)
			for f := range t.Fields() {
				if f.IsExported() {
					fmt.Fprintf(&b, "\t%s %s\n", f.Name, f.Type)
					walk(f.Type)
				}
			}
			out = append(out, b.String())
		}
	}
	walk(t)
	sort.Strings(out)
	return strings.Join(out, "")
}

// golden compares got with the file at path, or writes it with -update.
func golden(t *testing.T, path string, got []byte, differs func(want []byte)) {
	t.Helper()
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (write it with -update)", err)
	}
	if !bytes.Equal(got, want) {
		differs(want)
	}
}
