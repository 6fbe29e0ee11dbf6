package vsockproto

import (
	"bytes"
	"encoding/hex"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

// hx turns "01 02 ab" into bytes; it ignores spaces, newlines and |.
func hx(t testing.TB, s string) []byte {
	t.Helper()
	s = strings.NewReplacer(" ", "", "\n", "", "\t", "", "|", "").Replace(s)
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad vector %q: %v", s, err)
	}
	return b
}

// golden holds one frame per message, written by hand from
// docs/protocol.md: header (length, type, flags, id) | payload.
var golden = []struct {
	name  string
	id    uint64
	msg   Message
	frame string
}{
	{"Hello", 1, &Hello{Version: 1, MaxFrame: 1 << 20, Features: FeatureReadData | FeatureResume,
		Token:      Token{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16},
		Generation: 7, Export: "mirror"},
		`30000000 0100 0000 0100000000000000 |
		 0100 0000 00001000 0500000000000000 0102030405060708090a0b0c0d0e0f10
		 0700000000000000 0600 6d6972726f72`},
	{"Welcome", 1, &Welcome{Version: 1, Resumed: true, MaxFrame: 64 << 10, Features: FeatureReadData,
		Token:      Token{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff},
		Generation: 0x0102030405060708, BlockSize: 4096},
		`2c000000 0180 0000 0100000000000000 |
		 0100 0100 00000100 0100000000000000 ffffffffffffffffffffffffffffffff
		 0807060504030201 00100000`},
	{"WelcomePolicy", 1, &Welcome{Version: 1, Kept: true, MaxFrame: 64 << 10, Features: FeatureResume | FeaturePublishPolicy,
		Generation: 3, BlockSize: 1024, PublishQuiet: 2 * time.Second, PublishMax: 30 * time.Second},
		`34000000 0180 0000 0100000000000000 |
		 0100 0200 00000100 0c00000000000000 00000000000000000000000000000000
		 0300000000000000 00040000 d0070000 30750000`},
	{"WelcomeLabel", 1, &Welcome{Version: 1, MaxFrame: 64 << 10, Features: FeatureLabel, Generation: 3, BlockSize: 4096, Label: "r42"},
		`31000000 0180 0000 0100000000000000 |
		 0100 0000 00000100 1000000000000000 00000000000000000000000000000000
		 0300000000000000 00100000 0300 723432`},
	{"Announce", 5, &Announce{Generation: 9, Blocks: []BlockRange{{Start: 0x10, Count: 2}}, Inodes: []uint32{12, 13}},
		`28000000 0200 0000 0500000000000000 |
		 0900000000000000 00000000 01000000 1000000000000000 02000000
		 02000000 0c000000 0d000000`},
	{"AnnounceAll", 6, &Announce{Generation: 10, Flags: AnnounceAll},
		`14000000 0200 0000 0600000000000000 |
		 0a00000000000000 01000000 00000000 00000000`},
	{"AnnounceLabel", 6, &Announce{Generation: 11, Flags: AnnounceAll | AnnounceLabel, Label: "r42"},
		`19000000 0200 0000 0600000000000000 |
		 0b00000000000000 03000000 00000000 00000000 0300 723432`},
	{"AnnounceAck", 5, &AnnounceAck{Generation: 9},
		`08000000 0280 0000 0500000000000000 | 0900000000000000`},
	{"ReadMeta", 2, &ReadMeta{Generation: 3, Blocks: []BlockRange{{1, 1}, {0x200, 8}}},
		`24000000 0300 0000 0200000000000000 |
		 0300000000000000 02000000 0100000000000000 01000000 0002000000000000 08000000`},
	{"Meta", 2, &Meta{Data: []byte("abc")},
		`03000000 0380 0000 0200000000000000 | 616263`},
	{"Open", 3, &Open{Generation: 3, Inode: 12, IGen: 0xdeadbeef, Size: 4096,
		Ctime: Timespec{Sec: -1, Nsec: 5}, Layout: 0x1122334455667788},
		`30000000 0400 0000 0300000000000000 |
		 0300000000000000 0c000000 efbeadde 0010000000000000
		 ffffffffffffffff 05000000 00000000 8877665544332211`},
	{"Leased", 3, &Leased{Lease: 0xa1a2a3a4a5a6a7a8},
		`08000000 0480 0000 0300000000000000 | a8a7a6a5a4a3a2a1`},
	{"Read", 4, &Read{Lease: 0xa1a2a3a4a5a6a7a8, Offset: 0x1000, Length: 0x8000},
		`14000000 0500 0000 0400000000000000 | a8a7a6a5a4a3a2a1 0010000000000000 00800000`},
	{"Data", 4, &Data{Data: []byte("xyz")},
		`03000000 0580 0000 0400000000000000 | 78797a`},
	{"DataEmpty", 9, &Data{}, `00000000 0580 0000 0900000000000000`}, // a fuzz find
	{"Release", 6, &Release{Lease: 0xa1a2a3a4a5a6a7a8},
		`08000000 0600 0000 0600000000000000 | a8a7a6a5a4a3a2a1`},
	{"Released", 6, &Released{}, `00000000 0680 0000 0600000000000000`},
	{"Break", 7, &Break{Leases: []uint64{1, 2}},
		`14000000 0700 0000 0700000000000000 | 02000000 0100000000000000 0200000000000000`},
	{"BreakAck", 7, &BreakAck{}, `00000000 0780 0000 0700000000000000`},
	{"WelcomeLeaseTime", 1, &Welcome{Version: 1, MaxFrame: 64 << 10, Features: FeatureLeaseTime, Generation: 3, BlockSize: 4096, LeaseTime: 30 * time.Second},
		`30000000 0180 0000 0100000000000000 |
		 0100 0000 00000100 2000000000000000 00000000000000000000000000000000
		 0300000000000000 00100000 30750000`},
	{"Revoke", 9, &Revoke{Why: "stop"}, `06000000 0900 0000 0900000000000000 | 0400 73746f70`},
	{"RevokeAck", 9, &RevokeAck{}, `00000000 0980 0000 0900000000000000`},
	{"HelloPin", 1, &Hello{Version: 1, MaxFrame: 1 << 20, Features: FeaturePin, Export: "m", Label: "r42"},
		`30000000 0100 0000 0100000000000000 |
		 0100 0000 00001000 8000000000000000 00000000000000000000000000000000
		 0000000000000000 0100 6d 0300 723432`},
	{"WelcomePin", 1, &Welcome{Version: 1, MaxFrame: 64 << 10, Features: FeaturePin, Generation: 9, BlockSize: 4096, Pinned: 7},
		`34000000 0180 0000 0100000000000000 |
		 0100 0000 00000100 8000000000000000 00000000000000000000000000000000
		 0900000000000000 00100000 0700000000000000`},
	{"ListGens", 4, &ListGens{}, `00000000 0a00 0000 0400000000000000`},
	{"Generations", 4, &Generations{List: []KeptGeneration{{7, time.UnixMilli(1000), "r42"}, {9, time.UnixMilli(2000), ""}}},
		`2b000000 0a80 0000 0400000000000000 | 02000000
		 0700000000000000 e803000000000000 0300 723432
		 0900000000000000 d007000000000000 0000`},
	{"Unpin", 10, &Unpin{Generation: 7, Why: "budget"}, `10000000 0b00 0000 0a00000000000000 | 0700000000000000 0600 627564676574`},
	{"UnpinAck", 10, &UnpinAck{}, `00000000 0b80 0000 0a00000000000000`},
	{"ReadDigests", 11, &ReadDigests{Generation: 7, First: 0x400, Count: 9},
		`14000000 0c00 0000 0b00000000000000 | 0700000000000000 0004000000000000 09000000`},
	{"Digests", 11, &Digests{Present: []byte{0x01, 0x00}, Sums: bytes.Repeat([]byte{0xab}, DigestSize)},
		`26000000 0c80 0000 0b00000000000000 | 02000000 0100
		 abababababababababababababababababababababababababababababababab`},
	{"Ping", 8, &Ping{}, `00000000 0800 0000 0800000000000000`},
	{"Pong", 8, &Pong{}, `00000000 0880 0000 0800000000000000`},
	{"Error", 3, &Error{Code: CodeStale, Message: "gen 3"},
		`0b000000 ffff 0000 0300000000000000 | 06000000 0500 67656e2033`},
}

func TestGoldenVectors(t *testing.T) {
	for _, g := range golden {
		t.Run(g.name, func(t *testing.T) {
			want := hx(t, g.frame)
			if got := AppendFrame(nil, g.id, g.msg); !bytes.Equal(got, want) {
				t.Fatalf("encode:\n got %x\nwant %x", got, want)
			}
			h, p, err := ReadFrame(bytes.NewReader(want), DefaultFrame)
			if err != nil {
				t.Fatal(err)
			}
			if h.ID != g.id || h.Type != g.msg.Type() || int(h.Length) != len(want)-HeaderSize {
				t.Fatalf("header %+v", h)
			}
			m, err := Decode(h.Type, p)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(m, g.msg) {
				t.Fatalf("decode:\n got %+v\nwant %+v", m, g.msg)
			}
		})
	}
}

// Every message type has a golden vector.
func TestGoldenCoversEveryType(t *testing.T) {
	seen := map[Type]bool{}
	for _, g := range golden {
		seen[g.msg.Type()] = true
	}
	for ty := Type(0); ; ty++ {
		if newMessage(ty) != nil && !seen[ty] {
			t.Errorf("no golden vector for %v", ty)
		}
		if ty == 0xFFFF {
			break
		}
	}
}

func TestDecodeRejects(t *testing.T) {
	for _, c := range []struct {
		name    string
		typ     Type
		payload string
		want    string
	}{
		{"hello short", TypeHello, `0100 0000 00001000`, "too short"},
		{"hello reserved", TypeHello, `0100 0100 00001000 0000000000000000 00000000000000000000000000000000 0000000000000000 0100 61`, "reserved"},
		{"hello version 0", TypeHello, `0000 0000 00001000 0000000000000000 00000000000000000000000000000000 0000000000000000 0100 61`, "version 0"},
		{"hello no export", TypeHello, `0100 0000 00001000 0000000000000000 00000000000000000000000000000000 0000000000000000 0000`, "empty export"},
		{"hello export too long", TypeHello, `0100 0000 00001000 0000000000000000 00000000000000000000000000000000 0000000000000000 0001`, "at most 255"},
		{"hello tiny frame", TypeHello, `0100 0000 00100000 0000000000000000 00000000000000000000000000000000 0000000000000000 0100 61`, "max_frame"},
		{"hello trailing", TypeHello, `0100 0000 00001000 0000000000000000 00000000000000000000000000000000 0000000000000000 0100 61 00`, "left over"},
		{"welcome block size", TypeWelcome, `0100 0000 00001000 0000000000000000 00000000000000000000000000000000 0000000000000000 00300000`, "block size"},
		{"welcome flags", TypeWelcome, `0100 0400 00001000 0000000000000000 00000000000000000000000000000000 0000000000000000 00100000`, "flags"},
		{"announce huge count", TypeAnnounce, `0100000000000000 00000000 ffffffff`, "do not fit"},
		{"announce inode count", TypeAnnounce, `0100000000000000 00000000 00000000 02000000 01000000`, "do not fit"},
		{"announce flags", TypeAnnounce, `0100000000000000 04000000 00000000 00000000`, "flags"},
		{"announce label missing", TypeAnnounce, `0100000000000000 02000000 00000000 00000000`, "too short"},
		{"empty range", TypeReadMeta, `0100000000000000 01000000 0500000000000000 00000000`, "empty range"},
		{"wrapping range", TypeReadMeta, `0100000000000000 01000000 ffffffffffffffff 02000000`, "wraps"},
		{"readmeta nothing", TypeReadMeta, `0100000000000000 00000000`, "no blocks"},
		{"open nsec", TypeOpen, `0100000000000000 0c000000 00000000 0000000000000000 0000000000000000 00ca9a3b 00000000 0000000000000000`, "nanoseconds"},
		{"open reserved", TypeOpen, `0100000000000000 0c000000 00000000 0000000000000000 0000000000000000 00000000 01000000 0000000000000000`, "reserved"},
		{"open inode 0", TypeOpen, `0100000000000000 00000000 00000000 0000000000000000 0000000000000000 00000000 00000000 0000000000000000`, "inode 0"},
		{"read offset", TypeRead, `0100000000000000 0000000000000080 00100000`, "offset"},
		{"break none", TypeBreak, `00000000`, "no leases"},
		{"break count", TypeBreak, `03000000 0100000000000000`, "do not fit"},
		{"release short", TypeRelease, `01000000`, "too short"},
		{"generations out of order", TypeGenerations, `02000000 0700000000000000 0000000000000000 0000 0700000000000000 0000000000000000 0000`, "out of order"},
		{"generation 0", TypeGenerations, `01000000 0000000000000000 0000000000000000 0000`, "out of order"},
		{"generations count", TypeGenerations, `05000000 0700000000000000 0000000000000000 0000`, "do not fit"},
		{"unpin why missing", TypeUnpin, `0700000000000000`, "too short"},
		{"digests of nothing", TypeReadDigests, `0100000000000000 0000000000000000 00000000`, "from 1 to"},
		{"digests of too many", TypeReadDigests, `0100000000000000 0000000000000000 01100000`, "from 1 to"},
		{"digests wrapping", TypeReadDigests, `0100000000000000 ffffffffffffffff 02000000`, "wraps"},
		{"digests missing", TypeDigests, `01000000 03 ab`, "digests for 2 blocks"},
		{"digests bitmap", TypeDigests, `01020000`, "do not fit"},
		{"ping payload", TypePing, `00`, "left over"},
		{"error message too long", TypeError, `01000000 0104`, "at most 1024"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Decode(c.typ, hx(t, c.payload))
			if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want a protocol error mentioning %q", err, c.want)
			}
		})
	}
	if _, err := Decode(0x0042, nil); !errors.Is(err, ErrNotSupported) {
		t.Fatalf("unknown type: %v", err)
	}
}

func TestReadFrameRejects(t *testing.T) {
	for _, c := range []struct {
		name  string
		frame string
		limit uint32
		want  string
	}{
		{"truncated header", `0000 0000 0100`, DefaultFrame, "EOF"},
		{"over limit", `01000100 0800 0000 0100000000000000`, MinFrame, "exceeds the limit"},
		{"max length", `ffffffff 0800 0000 0100000000000000`, MaxFrame, "exceeds the limit"},
		{"flags", `00000000 0800 0100 0100000000000000`, DefaultFrame, "reserved flags"},
		{"truncated payload", `08000000 0600 0000 0100000000000000 0102`, DefaultFrame, "unexpected EOF"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := ReadFrame(bytes.NewReader(hx(t, c.frame)), c.limit)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want %q", err, c.want)
			}
		})
	}
}

// A payload's decoded form never takes much more memory than the payload
// itself, whatever its counts claim.
func TestDecodeAllocationBounded(t *testing.T) {
	huge := hx(t, `0100000000000000 00000000 ffffff7f`) // 2^31 ranges claimed
	var before, after runtimeMem
	before.read()
	for range 100 {
		_, _ = Decode(TypeAnnounce, huge)
	}
	after.read()
	if d := after.total - before.total; d > 100*1024 {
		t.Errorf("100 decodes of a 20-byte payload claiming 2^31 ranges allocated %d bytes", d)
	}
}

func TestRanges(t *testing.T) {
	got := Ranges([]uint64{3, 4, 5, 9, 11, 12})
	want := []BlockRange{{Start: 3, Count: 3}, {Start: 9, Count: 1}, {Start: 11, Count: 2}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if Ranges(nil) != nil {
		t.Fatal("no blocks, no ranges")
	}
}

// A label longer than MaxLabel is refused, in both messages that carry one.
func TestLabelBounded(t *testing.T) {
	long := strings.Repeat("x", MaxLabel+1)
	for _, m := range []Message{
		&Announce{Generation: 1, Flags: AnnounceLabel, Label: long},
		&Welcome{Version: 1, MaxFrame: MinFrame, Features: FeatureLabel, Generation: 1, BlockSize: 4096, Label: long},
	} {
		if _, err := Decode(m.Type(), m.Append(nil)); err == nil || !strings.Contains(err.Error(), "label") {
			t.Errorf("%T with a %d-byte label: %v", m, len(long), err)
		}
	}
}
