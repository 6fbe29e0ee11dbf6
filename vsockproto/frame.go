package vsockproto

import (
	"fmt"
	"io"
)

// HeaderSize is the size of a frame header.
const HeaderSize = 16

// Frame limits: what a side may announce as its max_frame, the default,
// and the limit before the handshake is done.
const (
	MinFrame       = 64 << 10
	MaxFrame       = 16 << 20
	DefaultFrame   = 1 << 20
	HandshakeFrame = 4096
)

// What one request may ask of a host (docs/protocol.md, "Limits a host
// enforces"): a reply carries at most MaxReply bytes (a Read's data, a
// ReadMeta's blocks; larger reads are split by the guest), and a
// ReadMeta asks for at most MaxMetaBlocks blocks.
const (
	MaxReply      = 1 << 20
	MaxMetaBlocks = 256
)

// Header is a frame header.
type Header struct {
	Length uint32 // payload bytes
	Type   Type
	Flags  uint16 // reserved, zero
	ID     uint64 // request id
}

// AppendFrame appends a frame with message m and request id id to b.
func AppendFrame(b []byte, id uint64, m Message) []byte {
	start := len(b)
	b = putU32(b, 0)
	b = putU16(b, uint16(m.Type()))
	b = putU16(b, 0)
	b = putU64(b, id)
	b = m.Append(b)
	le.PutUint32(b[start:], uint32(len(b)-start-HeaderSize))
	return b
}

// appendHeader appends the header of a frame of type t whose payload is n
// bytes.
func appendHeader(b []byte, id uint64, t Type, n int) []byte {
	b = putU32(b, uint32(n))
	b = putU16(b, uint16(t))
	b = putU16(b, 0)
	return putU64(b, id)
}

// ParseHeader decodes a frame header and checks it against limit, the
// receiver's largest payload.
func ParseHeader(b *[HeaderSize]byte, limit uint32) (Header, error) {
	h := Header{
		Length: le.Uint32(b[0:]),
		Type:   Type(le.Uint16(b[4:])),
		Flags:  le.Uint16(b[6:]),
		ID:     le.Uint64(b[8:]),
	}
	switch {
	case h.Length > limit:
		return h, Errorf(CodeProtocol, "%v frame of %d bytes exceeds the limit of %d", h.Type, h.Length, limit)
	case h.Flags != 0:
		return h, Errorf(CodeProtocol, "%v frame with reserved flags %#x", h.Type, h.Flags)
	}
	return h, nil
}

// ReadFrame reads one frame of at most limit payload bytes. It allocates
// nothing before the header has been checked.
func ReadFrame(r io.Reader, limit uint32) (Header, []byte, error) {
	var hb [HeaderSize]byte
	if _, err := io.ReadFull(r, hb[:]); err != nil {
		return Header{}, nil, err
	}
	h, err := ParseHeader(&hb, limit)
	if err != nil {
		return h, nil, err
	}
	p := make([]byte, h.Length)
	if _, err := io.ReadFull(r, p); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return h, nil, fmt.Errorf("%v frame payload: %w", h.Type, err)
	}
	return h, p, nil
}
