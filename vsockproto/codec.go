package vsockproto

import (
	"encoding/binary"
	"errors"
	"fmt"
)

var le = binary.LittleEndian

// errShort is the sticky decoding error: a field ran past the payload.
var errShort = errors.New("payload too short")

// decoder reads fields from a payload. The first failure sticks, so a
// message's decode reads every field and checks d.err once (the p9
// buffer's overflow flag).
type decoder struct {
	p   []byte
	err error
}

func (d *decoder) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || n > len(d.p) {
		d.err = errShort
		return nil
	}
	if n == 0 {
		return nil // so that an empty field decodes the same from any payload
	}
	b := d.p[:n:n]
	d.p = d.p[n:]
	return b
}

func (d *decoder) u16() uint16 {
	if b := d.take(2); b != nil {
		return le.Uint16(b)
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if b := d.take(4); b != nil {
		return le.Uint32(b)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if b := d.take(8); b != nil {
		return le.Uint64(b)
	}
	return 0
}

// str reads a string of at most max bytes.
func (d *decoder) str(field string, max int) string {
	n := int(d.u16())
	if d.err == nil && n > max {
		d.fail("%s: %d bytes, at most %d", field, n, max)
		return ""
	}
	return string(d.take(n))
}

// count reads a list's element count and checks that count elements of
// size bytes fit in what is left, before anything is allocated for them.
func (d *decoder) count(field string, size int) int {
	n := d.u32()
	if d.err == nil && uint64(n)*uint64(size) > uint64(len(d.p)) {
		d.fail("%s: %d elements do not fit in %d bytes", field, n, len(d.p))
		return 0
	}
	return int(n)
}

// rest returns the remaining payload (a bytes field is always last).
func (d *decoder) rest() []byte { return d.take(len(d.p)) }

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf(format, args...)
	}
}

// done reports the first error, or leftover bytes.
func (d *decoder) done() error {
	if d.err == nil && len(d.p) != 0 {
		d.err = fmt.Errorf("%d bytes left over", len(d.p))
	}
	return d.err
}

func putU16(b []byte, v uint16) []byte { return le.AppendUint16(b, v) }
func putU32(b []byte, v uint32) []byte { return le.AppendUint32(b, v) }
func putU64(b []byte, v uint64) []byte { return le.AppendUint64(b, v) }

func putStr(b []byte, s string) []byte {
	b = putU16(b, uint16(len(s)))
	return append(b, s...)
}
