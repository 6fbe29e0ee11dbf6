package vsockproto

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

// FuzzReadFrame feeds arbitrary bytes to the frame reader and decodes
// what it accepts. Nothing may panic, no payload may exceed the limit,
// and whatever decodes must encode back to the same bytes.
func FuzzReadFrame(f *testing.F) {
	for _, g := range golden {
		f.Add(AppendFrame(nil, g.id, g.msg))
	}
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		for {
			h, p, err := ReadFrame(r, MinFrame)
			if err != nil {
				return
			}
			if len(p) > MinFrame || int(h.Length) != len(p) {
				t.Fatalf("payload of %d bytes, header says %d, limit %d", len(p), h.Length, MinFrame)
			}
			roundTrip(t, h.Type, p)
		}
	})
}

// FuzzDecode runs every message decoder (the type is an input) on
// arbitrary payloads.
func FuzzDecode(f *testing.F) {
	for _, g := range golden {
		f.Add(uint16(g.msg.Type()), g.msg.Append(nil))
	}
	f.Fuzz(func(t *testing.T, typ uint16, p []byte) {
		roundTrip(t, Type(typ), p)
	})
}

// roundTrip decodes p; if that works, its encoding must be p again and
// every list must be no longer than the payload could hold.
func roundTrip(t *testing.T, typ Type, p []byte) {
	t.Helper()
	m, err := Decode(typ, p)
	if err != nil {
		var pe *Error
		if !errors.As(err, &pe) || (pe.Code != CodeProtocol && pe.Code != CodeNotSupported) {
			t.Fatalf("decode error of the wrong kind: %v", err)
		}
		return
	}
	if q := m.Append(nil); !bytes.Equal(p, q) {
		t.Fatalf("%v: re-encoded\n%x\nfrom\n%x", typ, q, p)
	}
	m2, err := Decode(typ, m.Append(nil))
	if err != nil || !reflect.DeepEqual(m, m2) {
		t.Fatalf("%v: second decode %+v, %v; first %+v", typ, m2, err, m)
	}
	switch m := m.(type) {
	case *Announce:
		if len(m.Blocks)*rangeSize+len(m.Inodes)*4 > len(p) {
			t.Fatal("lists longer than the payload")
		}
	case *Break:
		if len(m.Leases)*8 > len(p) {
			t.Fatal("list longer than the payload")
		}
	}
}
