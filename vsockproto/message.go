package vsockproto

import (
	"fmt"
	"math/bits"
	"time"
)

// Type is a message type. A reply's type is its request's with ReplyBit
// set; Error answers any request.
type Type uint16

// ReplyBit marks reply types.
const ReplyBit Type = 0x8000

// Message types (docs/protocol.md, "Messages").
const (
	TypeHello       Type = 0x0001
	TypeWelcome     Type = ReplyBit | TypeHello
	TypeAnnounce    Type = 0x0002
	TypeAnnounceAck Type = ReplyBit | TypeAnnounce
	TypeReadMeta    Type = 0x0003
	TypeMeta        Type = ReplyBit | TypeReadMeta
	TypeOpen        Type = 0x0004
	TypeLeased      Type = ReplyBit | TypeOpen
	TypeRead        Type = 0x0005
	TypeData        Type = ReplyBit | TypeRead
	TypeRelease     Type = 0x0006
	TypeReleased    Type = ReplyBit | TypeRelease
	TypeBreak       Type = 0x0007
	TypeBreakAck    Type = ReplyBit | TypeBreak
	TypePing        Type = 0x0008
	TypePong        Type = ReplyBit | TypePing
	TypeRevoke      Type = 0x0009
	TypeRevokeAck   Type = ReplyBit | TypeRevoke
	TypeListGens    Type = 0x000A
	TypeGenerations Type = ReplyBit | TypeListGens
	TypeUnpin       Type = 0x000B
	TypeUnpinAck    Type = ReplyBit | TypeUnpin
	TypeReadDigests Type = 0x000C
	TypeDigests     Type = ReplyBit | TypeReadDigests
	TypeError       Type = 0xFFFF
)

// IsReply reports whether t is a reply type.
func (t Type) IsReply() bool { return t&ReplyBit != 0 }

func (t Type) String() string {
	if m := newMessage(t); m != nil {
		return fmt.Sprintf("%T", m)[len("*vsockproto."):]
	}
	return fmt.Sprintf("Type(%#04x)", uint16(t))
}

// Message is one protocol message. Append encodes its payload onto b;
// decode reads it back and must consume every byte.
type Message interface {
	Type() Type
	Append(b []byte) []byte
	decode(d *decoder)
}

// newMessage returns an empty message of type t, or nil if t is unknown.
func newMessage(t Type) Message {
	switch t {
	case TypeHello:
		return new(Hello)
	case TypeWelcome:
		return new(Welcome)
	case TypeAnnounce:
		return new(Announce)
	case TypeAnnounceAck:
		return new(AnnounceAck)
	case TypeReadMeta:
		return new(ReadMeta)
	case TypeMeta:
		return new(Meta)
	case TypeOpen:
		return new(Open)
	case TypeLeased:
		return new(Leased)
	case TypeRead:
		return new(Read)
	case TypeData:
		return new(Data)
	case TypeRelease:
		return new(Release)
	case TypeReleased:
		return new(Released)
	case TypeBreak:
		return new(Break)
	case TypeBreakAck:
		return new(BreakAck)
	case TypePing:
		return new(Ping)
	case TypePong:
		return new(Pong)
	case TypeRevoke:
		return new(Revoke)
	case TypeRevokeAck:
		return new(RevokeAck)
	case TypeListGens:
		return new(ListGens)
	case TypeGenerations:
		return new(Generations)
	case TypeUnpin:
		return new(Unpin)
	case TypeUnpinAck:
		return new(UnpinAck)
	case TypeReadDigests:
		return new(ReadDigests)
	case TypeDigests:
		return new(Digests)
	case TypeError:
		return new(Error)
	}
	return nil
}

// Decode decodes a payload of type t. An unknown type is an error that
// matches ErrNotSupported; a payload that does not decode exactly is an
// error that matches ErrProtocol. The returned message may refer to p.
func Decode(t Type, p []byte) (Message, error) {
	m := newMessage(t)
	if m == nil {
		return nil, &Error{Code: CodeNotSupported, Message: fmt.Sprintf("unknown message type %#04x", uint16(t))}
	}
	d := decoder{p: p}
	m.decode(&d)
	if err := d.done(); err != nil {
		return nil, &Error{Code: CodeProtocol, Message: fmt.Sprintf("%v: %v", t, err)}
	}
	return m, nil
}

// Token is a session token: 16 random bytes, a capability for resuming a
// session. The zero token asks for a new session.
type Token [16]byte

// Features is a set of optional protocol features.
type Features uint64

// Protocol features (docs/protocol.md, "Handshake").
const (
	FeatureReadData Features = 1 << 0 // the host serves Read
	FeatureLayout   Features = 1 << 1 // Open carries a checked layout hash
	FeatureResume   Features = 1 << 2 // sessions survive a disconnect
	// FeaturePublishPolicy: the Welcome says how the host publishes, so
	// a guest knows how long a newer generation can take to come.
	FeaturePublishPolicy Features = 1 << 3
	// FeatureLabel: generations carry the label they were published with
	// (an upstream revision): the Welcome the current one's, Announce
	// each new one's (AnnounceLabel).
	FeatureLabel Features = 1 << 4
	// FeatureLeaseTime: the Welcome says how long the host keeps a
	// session's leases after the last request it answered (LeaseTime),
	// and the host sends Revoke before it lets go of them otherwise.
	FeatureLeaseTime Features = 1 << 5
	// FeatureKept: the host answers ListGens, the generations it keeps.
	FeatureKept Features = 1 << 6
	// FeaturePin: a guest pins a kept generation (Hello.Generation, or
	// Hello.Label when that is 0) and stays on it; the Welcome says which
	// it got (Pinned; 0: none), and the host sends Unpin before it drops
	// it. A guest asks for it only to pin: the Hello is longer with it.
	FeaturePin Features = 1 << 7
	// FeatureDigests: the host answers ReadDigests, the SHA-256 of a
	// generation's metadata blocks, so that a guest with the shared
	// device reads them there and checks them.
	FeatureDigests Features = 1 << 8
)

// Has reports whether every feature in f is in s.
func (s Features) Has(f Features) bool { return s&f == f }

// BlockRange is Count filesystem blocks from block Start.
type BlockRange struct {
	Start uint64
	Count uint32
}

const rangeSize = 12

// Ranges turns sorted block numbers into the fewest ranges.
func Ranges(blocks []uint64) []BlockRange {
	var rs []BlockRange
	for _, b := range blocks {
		if n := len(rs); n > 0 && rs[n-1].Start+uint64(rs[n-1].Count) == b && rs[n-1].Count < 1<<31 {
			rs[n-1].Count++
			continue
		}
		rs = append(rs, BlockRange{Start: b, Count: 1})
	}
	return rs
}

func appendRanges(b []byte, rs []BlockRange) []byte {
	b = putU32(b, uint32(len(rs)))
	for _, r := range rs {
		b = putU64(b, r.Start)
		b = putU32(b, r.Count)
	}
	return b
}

func decodeRanges(d *decoder, field string) []BlockRange {
	n := d.count(field, rangeSize)
	if n == 0 {
		return nil
	}
	rs := make([]BlockRange, n)
	for i := range rs {
		rs[i] = BlockRange{Start: d.u64(), Count: d.u32()}
		if d.err == nil && rs[i].Count == 0 {
			d.fail("%s: empty range at block %d", field, rs[i].Start)
		}
		if d.err == nil && rs[i].Start+uint64(rs[i].Count) < rs[i].Start {
			d.fail("%s: range at block %d wraps", field, rs[i].Start)
		}
	}
	return rs
}

// Version is the protocol version this package speaks.
const Version = 1

// Limits of string fields.
const (
	MaxExportName   = 255
	MaxErrorMessage = 1024
)

// Hello opens a session (guest → host, always id 1).
type Hello struct {
	Version    uint16
	MaxFrame   uint32
	Features   Features
	Token      Token
	Generation uint64
	Export     string
	// With FeaturePin: the label of the generation to pin, when
	// Generation is 0.
	Label string
}

func (*Hello) Type() Type { return TypeHello }

func (m *Hello) Append(b []byte) []byte {
	b = putU16(b, m.Version)
	b = putU16(b, 0)
	b = putU32(b, m.MaxFrame)
	b = putU64(b, uint64(m.Features))
	b = append(b, m.Token[:]...)
	b = putU64(b, m.Generation)
	b = putStr(b, m.Export)
	if m.Features.Has(FeaturePin) {
		b = putStr(b, m.Label)
	}
	return b
}

func (m *Hello) decode(d *decoder) {
	m.Version = d.u16()
	if d.u16() != 0 {
		d.fail("reserved field is not zero")
	}
	m.MaxFrame = d.u32()
	m.Features = Features(d.u64())
	copy(m.Token[:], d.take(16))
	m.Generation = d.u64()
	m.Export = d.str("export", MaxExportName)
	if m.Features.Has(FeaturePin) {
		m.Label = d.str("label", MaxLabel)
	}
	switch {
	case d.err != nil:
	case m.Version == 0:
		d.fail("version 0")
	case m.Export == "":
		d.fail("empty export name")
	case m.MaxFrame < MinFrame || m.MaxFrame > MaxFrame:
		d.fail("max_frame %d outside [%d, %d]", m.MaxFrame, MinFrame, MaxFrame)
	}
}

// Welcome accepts a Hello.
type Welcome struct {
	Version uint16
	Resumed bool
	// Kept: the generation the Hello named is kept by the host, so the
	// guest may stay on it. Otherwise it must move to Generation.
	Kept       bool
	MaxFrame   uint32
	Features   Features
	Token      Token
	Generation uint64
	BlockSize  uint32
	// With FeaturePublishPolicy: the host publishes on its own once the
	// tree has been quiet for PublishQuiet, and at the latest PublishMax
	// after the first unpublished change; a zero PublishMax means it
	// publishes only when told (leasefs publish).
	PublishQuiet, PublishMax time.Duration
	// With FeatureLabel: the current generation's label ("" for none).
	Label string
	// With FeatureLeaseTime: the host keeps the session's leases at least
	// this long after the last request of the guest's it answered, unless
	// it revokes them (Revoke) or breaks them (Break) first.
	LeaseTime time.Duration
	// With FeaturePin: the generation pinned for the guest (0: none; it
	// asked for one the host does not keep).
	Pinned uint64
}

// Welcome flags.
const (
	welcomeResumed = 1 << 0
	welcomeKept    = 1 << 1
)

func (*Welcome) Type() Type { return TypeWelcome }

func (m *Welcome) Append(b []byte) []byte {
	b = putU16(b, m.Version)
	var flags uint16
	if m.Resumed {
		flags |= welcomeResumed
	}
	if m.Kept {
		flags |= welcomeKept
	}
	b = putU16(b, flags)
	b = putU32(b, m.MaxFrame)
	b = putU64(b, uint64(m.Features))
	b = append(b, m.Token[:]...)
	b = putU64(b, m.Generation)
	b = putU32(b, m.BlockSize)
	if m.Features.Has(FeaturePublishPolicy) {
		b = putU32(b, millis(m.PublishQuiet))
		b = putU32(b, millis(m.PublishMax))
	}
	if m.Features.Has(FeatureLabel) {
		b = putStr(b, m.Label)
	}
	if m.Features.Has(FeatureLeaseTime) {
		b = putU32(b, millis(m.LeaseTime))
	}
	if m.Features.Has(FeaturePin) {
		b = putU64(b, m.Pinned)
	}
	return b
}

// millis is d in whole milliseconds, saturated to 32 bits.
func millis(d time.Duration) uint32 {
	return uint32(min(max(d.Milliseconds(), 0), 1<<32-1))
}

func (m *Welcome) decode(d *decoder) {
	m.Version = d.u16()
	flags := d.u16()
	m.Resumed, m.Kept = flags&welcomeResumed != 0, flags&welcomeKept != 0
	m.MaxFrame = d.u32()
	m.Features = Features(d.u64())
	copy(m.Token[:], d.take(16))
	m.Generation = d.u64()
	m.BlockSize = d.u32()
	if m.Features.Has(FeaturePublishPolicy) {
		m.PublishQuiet = time.Duration(d.u32()) * time.Millisecond
		m.PublishMax = time.Duration(d.u32()) * time.Millisecond
	}
	if m.Features.Has(FeatureLabel) {
		m.Label = d.str("label", MaxLabel)
	}
	if m.Features.Has(FeatureLeaseTime) {
		m.LeaseTime = time.Duration(d.u32()) * time.Millisecond
	}
	if m.Features.Has(FeaturePin) {
		m.Pinned = d.u64()
	}
	switch {
	case d.err != nil:
	case flags&^(welcomeResumed|welcomeKept) != 0:
		d.fail("unknown flags %#x", flags)
	case m.Version == 0:
		d.fail("version 0")
	case m.MaxFrame < MinFrame || m.MaxFrame > MaxFrame:
		d.fail("max_frame %d outside [%d, %d]", m.MaxFrame, MinFrame, MaxFrame)
	case m.BlockSize < 1024 || m.BlockSize > 65536 || m.BlockSize&(m.BlockSize-1) != 0:
		d.fail("block size %d", m.BlockSize)
	}
}

// Announce.Flags: AnnounceAll, the change lists are incomplete (every
// cached block and inode must be treated as changed); AnnounceLabel, a
// label follows the lists (only to guests that asked for FeatureLabel).
const (
	AnnounceAll   uint32 = 1
	AnnounceLabel uint32 = 2
)

// MaxLabel bounds a generation's label, in bytes.
const MaxLabel = 128

// Announce makes a generation current (host → guest).
type Announce struct {
	Generation uint64
	Flags      uint32
	Blocks     []BlockRange
	Inodes     []uint32
	Label      string // with AnnounceLabel
}

func (*Announce) Type() Type { return TypeAnnounce }

func (m *Announce) Append(b []byte) []byte {
	b = putU64(b, m.Generation)
	b = putU32(b, m.Flags)
	b = appendRanges(b, m.Blocks)
	b = putU32(b, uint32(len(m.Inodes)))
	for _, ino := range m.Inodes {
		b = putU32(b, ino)
	}
	if m.Flags&AnnounceLabel != 0 {
		b = putStr(b, m.Label)
	}
	return b
}

func (m *Announce) decode(d *decoder) {
	m.Generation = d.u64()
	m.Flags = d.u32()
	if d.err == nil && m.Flags&^(AnnounceAll|AnnounceLabel) != 0 {
		d.fail("unknown flags %#x", m.Flags)
	}
	m.Blocks = decodeRanges(d, "blocks")
	if n := d.count("inodes", 4); n > 0 {
		m.Inodes = make([]uint32, n)
		for i := range m.Inodes {
			m.Inodes[i] = d.u32()
		}
	}
	if m.Flags&AnnounceLabel != 0 {
		m.Label = d.str("label", MaxLabel)
	}
}

// AnnounceAck answers Announce with the generation the guest is on.
type AnnounceAck struct{ Generation uint64 }

func (*AnnounceAck) Type() Type               { return TypeAnnounceAck }
func (m *AnnounceAck) Append(b []byte) []byte { return putU64(b, m.Generation) }
func (m *AnnounceAck) decode(d *decoder)      { m.Generation = d.u64() }

// ReadMeta asks for metadata blocks of a generation (guest → host).
type ReadMeta struct {
	Generation uint64
	Blocks     []BlockRange
}

func (*ReadMeta) Type() Type { return TypeReadMeta }

func (m *ReadMeta) Append(b []byte) []byte {
	return appendRanges(putU64(b, m.Generation), m.Blocks)
}

func (m *ReadMeta) decode(d *decoder) {
	m.Generation = d.u64()
	m.Blocks = decodeRanges(d, "blocks")
	if d.err == nil && len(m.Blocks) == 0 {
		d.fail("no blocks")
	}
}

// Meta answers ReadMeta: the blocks' bytes in request order.
type Meta struct{ Data []byte }

// bulkPayload is a message whose payload is one byte slice, written as
// it is.
type bulkPayload interface{ payload() []byte }

func (m *Meta) payload() []byte { return m.Data }
func (m *Data) payload() []byte { return m.Data }

func (*Meta) Type() Type               { return TypeMeta }
func (m *Meta) Append(b []byte) []byte { return append(b, m.Data...) }
func (m *Meta) decode(d *decoder)      { m.Data = d.rest() }

// Timespec is a timestamp: seconds and nanoseconds since the epoch.
type Timespec struct {
	Sec  int64
	Nsec uint32
}

// Open asks for a lease on an inode as it is in a generation.
type Open struct {
	Generation uint64
	Inode      uint32
	IGen       uint32 // i_generation
	Size       uint64
	Ctime      Timespec
	Layout     uint64 // 0: do not check
}

func (*Open) Type() Type { return TypeOpen }

func (m *Open) Append(b []byte) []byte {
	b = putU64(b, m.Generation)
	b = putU32(b, m.Inode)
	b = putU32(b, m.IGen)
	b = putU64(b, m.Size)
	b = putU64(b, uint64(m.Ctime.Sec))
	b = putU32(b, m.Ctime.Nsec)
	b = putU32(b, 0)
	return putU64(b, m.Layout)
}

func (m *Open) decode(d *decoder) {
	m.Generation = d.u64()
	m.Inode = d.u32()
	m.IGen = d.u32()
	m.Size = d.u64()
	m.Ctime = Timespec{Sec: int64(d.u64()), Nsec: d.u32()}
	reserved := d.u32()
	m.Layout = d.u64()
	switch {
	case d.err != nil:
	case reserved != 0:
		d.fail("reserved field is not zero")
	case m.Ctime.Nsec >= 1e9:
		d.fail("ctime nanoseconds %d", m.Ctime.Nsec)
	case m.Inode == 0:
		d.fail("inode 0")
	}
}

// Leased answers Open with a lease id.
type Leased struct{ Lease uint64 }

func (*Leased) Type() Type               { return TypeLeased }
func (m *Leased) Append(b []byte) []byte { return putU64(b, m.Lease) }
func (m *Leased) decode(d *decoder)      { m.Lease = d.u64() }

// MaxOffset bounds Read.Offset: offsets are below 2^63.
const MaxOffset = 1<<63 - 1

// Read reads file data through a lease.
type Read struct {
	Lease  uint64
	Offset uint64
	Length uint32
}

func (*Read) Type() Type { return TypeRead }

func (m *Read) Append(b []byte) []byte {
	return putU32(putU64(putU64(b, m.Lease), m.Offset), m.Length)
}

func (m *Read) decode(d *decoder) {
	m.Lease, m.Offset, m.Length = d.u64(), d.u64(), d.u32()
	if d.err == nil && m.Offset > MaxOffset {
		d.fail("offset %d", m.Offset)
	}
}

// Data answers Read.
type Data struct{ Data []byte }

func (*Data) Type() Type               { return TypeData }
func (m *Data) Append(b []byte) []byte { return append(b, m.Data...) }
func (m *Data) decode(d *decoder)      { m.Data = d.rest() }

// Release ends a lease.
type Release struct{ Lease uint64 }

func (*Release) Type() Type               { return TypeRelease }
func (m *Release) Append(b []byte) []byte { return putU64(b, m.Lease) }
func (m *Release) decode(d *decoder)      { m.Lease = d.u64() }

// Break asks for leases back (host → guest).
type Break struct{ Leases []uint64 }

func (*Break) Type() Type { return TypeBreak }

func (m *Break) Append(b []byte) []byte {
	b = putU32(b, uint32(len(m.Leases)))
	for _, id := range m.Leases {
		b = putU64(b, id)
	}
	return b
}

func (m *Break) decode(d *decoder) {
	n := d.count("leases", 8)
	if d.err == nil && n == 0 {
		d.fail("no leases")
	}
	m.Leases = make([]uint64, n)
	for i := range m.Leases {
		m.Leases[i] = d.u64()
	}
}

// Revoke ends every lease of the session (host → guest): the host is
// about to let go of the files (it stops, or the export goes), and says
// why. The guest stops reading them, and replies RevokeAck.
type Revoke struct{ Why string }

// MaxWhy bounds Revoke.Why.
const MaxWhy = 256

func (*Revoke) Type() Type               { return TypeRevoke }
func (m *Revoke) Append(b []byte) []byte { return putStr(b, m.Why) }
func (m *Revoke) decode(d *decoder)      { m.Why = d.str("why", MaxWhy) }

// ListGens asks which generations the host keeps (guest → host, with
// FeatureKept); it answers Generations, oldest first.
type ListGens struct{}

func (*ListGens) Type() Type             { return TypeListGens }
func (*ListGens) Append(b []byte) []byte { return b }
func (*ListGens) decode(*decoder)        {}

// A KeptGeneration is one generation the host keeps.
type KeptGeneration struct {
	Number    uint64
	Published time.Time // when it was captured, to the millisecond
	Label     string
}

// MaxGenerations bounds Generations.List.
const MaxGenerations = 4096

// Generations answers ListGens.
type Generations struct{ List []KeptGeneration }

func (*Generations) Type() Type { return TypeGenerations }

func (m *Generations) Append(b []byte) []byte {
	b = putU32(b, uint32(len(m.List)))
	for _, g := range m.List {
		b = putU64(b, g.Number)
		b = putU64(b, uint64(g.Published.UnixMilli()))
		b = putStr(b, g.Label)
	}
	return b
}

func (m *Generations) decode(d *decoder) {
	n := d.count("generations", 8+8+2)
	if d.err == nil && n > MaxGenerations {
		d.fail("%d generations, more than %d", n, MaxGenerations)
		return
	}
	for range n {
		g := KeptGeneration{Number: d.u64(), Published: time.UnixMilli(int64(d.u64())), Label: d.str("label", MaxLabel)}
		if d.err != nil {
			return
		}
		if g.Number == 0 || len(m.List) > 0 && g.Number <= m.List[len(m.List)-1].Number {
			d.fail("generation %d out of order", g.Number)
			return
		}
		m.List = append(m.List, g)
	}
}

// Unpin tells a guest that the host is about to drop the generation it
// pinned (host → guest), and why (its budget for kept files is spent):
// the guest moves on, and replies UnpinAck.
type Unpin struct {
	Generation uint64
	Why        string
}

func (*Unpin) Type() Type { return TypeUnpin }

func (m *Unpin) Append(b []byte) []byte { return putStr(putU64(b, m.Generation), m.Why) }

func (m *Unpin) decode(d *decoder) {
	m.Generation = d.u64()
	m.Why = d.str("why", MaxWhy)
}

// UnpinAck answers Unpin.
type UnpinAck struct{}

func (*UnpinAck) Type() Type             { return TypeUnpinAck }
func (*UnpinAck) Append(b []byte) []byte { return b }
func (*UnpinAck) decode(*decoder)        {}

// ReadDigests asks for the digests of the metadata blocks of a
// generation among Count blocks from First (guest → host, with
// FeatureDigests): a guest reads those blocks from the shared device and
// keeps only the ones whose SHA-256 is the digest.
type ReadDigests struct {
	Generation uint64
	First      uint64
	Count      uint32
}

// MaxDigestBlocks bounds ReadDigests.Count: its reply then fits in
// MaxReply whatever the block size.
const MaxDigestBlocks = 4096

// DigestSize is the size of one digest, a SHA-256.
const DigestSize = 32

func (*ReadDigests) Type() Type { return TypeReadDigests }

func (m *ReadDigests) Append(b []byte) []byte {
	return putU32(putU64(putU64(b, m.Generation), m.First), m.Count)
}

func (m *ReadDigests) decode(d *decoder) {
	m.Generation, m.First, m.Count = d.u64(), d.u64(), d.u32()
	switch {
	case d.err != nil:
	case m.Count == 0 || m.Count > MaxDigestBlocks:
		d.fail("%d blocks; from 1 to %d", m.Count, MaxDigestBlocks)
	case m.First+uint64(m.Count) < m.First:
		d.fail("range wraps")
	}
}

// Digests answers ReadDigests: which of the blocks asked for are
// metadata of the generation (bit i of Present, least significant bit
// first, for block First+i) and, for each of those in order, its
// SHA-256.
type Digests struct {
	Present []byte // ceil(Count/8) bytes
	Sums    []byte // DigestSize bytes per bit set in Present
}

func (*Digests) Type() Type { return TypeDigests }

func (m *Digests) Append(b []byte) []byte {
	b = putU32(b, uint32(len(m.Present)))
	return append(append(b, m.Present...), m.Sums...)
}

func (m *Digests) decode(d *decoder) {
	n := d.count("bitmap bytes", 1)
	if d.err == nil && n > MaxDigestBlocks/8 {
		d.fail("a bitmap of %d bytes, more than %d", n, MaxDigestBlocks/8)
		return
	}
	m.Present = d.take(n)
	m.Sums = d.rest()
	if d.err == nil && len(m.Sums) != DigestSize*ones(m.Present) {
		d.fail("%d bytes of digests for %d blocks", len(m.Sums), ones(m.Present))
	}
}

// ones counts the bits set in b.
func ones(b []byte) int {
	n := 0
	for _, x := range b {
		n += bits.OnesCount8(x)
	}
	return n
}

// Empty messages.
type (
	Released struct{} // answers Release
	BreakAck struct{} // answers Break: every lease in it has ended
	Ping     struct{} // keepalive
	Pong     struct{} // answers Ping
	// RevokeAck answers Revoke: nothing is read under the session's
	// leases any more.
	RevokeAck struct{}
)

func (*RevokeAck) Type() Type             { return TypeRevokeAck }
func (*RevokeAck) Append(b []byte) []byte { return b }
func (*RevokeAck) decode(*decoder)        {}

func (*Released) Type() Type { return TypeReleased }
func (*BreakAck) Type() Type { return TypeBreakAck }
func (*Ping) Type() Type     { return TypePing }
func (*Pong) Type() Type     { return TypePong }

func (*Released) Append(b []byte) []byte { return b }
func (*BreakAck) Append(b []byte) []byte { return b }
func (*Ping) Append(b []byte) []byte     { return b }
func (*Pong) Append(b []byte) []byte     { return b }

func (*Released) decode(*decoder) {}
func (*BreakAck) decode(*decoder) {}
func (*Ping) decode(*decoder)     {}
func (*Pong) decode(*decoder)     {}
