package ext4ro

import (
	"fmt"
	"math/bits"
)

// Directory hash versions as stored in the htree root. The unsigned
// variants are not stored; the superblock's unsigned-hash flag selects them.
const (
	hashLegacy  = 0
	hashHalfMD4 = 1
	hashTEA     = 2
)

var defaultHashSeed = [4]uint32{0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476}

// dirHash computes the 31-bit major hash of name as ext4's htree orders it
// (the low bit is reserved for the collision flag).
func (f *FS) dirHash(name []byte, version uint8) (uint32, error) {
	var hash uint32
	signed := f.hashSigned
	switch version {
	case hashLegacy:
		hash = legacyHash(name, signed)
	case hashHalfMD4, hashTEA:
		buf := f.sb.HashSeed
		if buf == [4]uint32{} {
			buf = defaultHashSeed
		}
		var in [8]uint32
		if version == hashHalfMD4 {
			for p := name; ; p = p[32:] {
				packName(p, in[:8], signed)
				halfMD4(&buf, &in)
				if len(p) <= 32 {
					break
				}
			}
			hash = buf[1]
		} else {
			for p := name; ; p = p[16:] {
				packName(p, in[:4], signed)
				tea(&buf, in[:4])
				if len(p) <= 16 {
					break
				}
			}
			hash = buf[0]
		}
	default:
		return 0, fmt.Errorf("hash version %d: %w", version, ErrUnsupported)
	}
	hash &^= 1
	if hash == 0x7fffffff<<1 { // reserved as the end-of-directory marker
		hash = (0x7fffffff - 1) << 1
	}
	return hash, nil
}

func nameByte(c byte, signed bool) uint32 {
	if signed {
		return uint32(int32(int8(c)))
	}
	return uint32(c)
}

// legacyHash is the original ext3 directory hash.
func legacyHash(name []byte, signed bool) uint32 {
	h0, h1 := uint32(0x12a3fe2d), uint32(0x37abe8f9)
	for _, c := range name {
		h := h1 + (h0 ^ nameByte(c, signed)*7152373)
		if h&0x80000000 != 0 {
			h -= 0x7fffffff
		}
		h1, h0 = h0, h
	}
	return h0 << 1
}

// packName packs up to 4*len(out) bytes of name into big-endian-ish words,
// padding with a pattern derived from the remaining name length, as the
// ext4 hashes expect.
func packName(name []byte, out []uint32, signed bool) {
	pad := uint32(len(name)) | uint32(len(name))<<8
	pad |= pad << 16
	n := min(len(name), 4*len(out))
	val := pad
	j := 0
	for i := range n {
		val = nameByte(name[i], signed) + val<<8
		if i%4 == 3 {
			out[j] = val
			j++
			val = pad
		}
	}
	if j < len(out) {
		out[j] = val
		j++
	}
	for ; j < len(out); j++ {
		out[j] = pad
	}
}

// halfMD4 is the MD4 compression function cut to three rounds over
// eight words, as ext4 uses it.
func halfMD4(buf *[4]uint32, in *[8]uint32) {
	a, b, c, d := buf[0], buf[1], buf[2], buf[3]
	f := func(x, y, z uint32) uint32 { return z ^ (x & (y ^ z)) }
	g := func(x, y, z uint32) uint32 { return (x & y) + ((x ^ y) & z) }
	h := func(x, y, z uint32) uint32 { return x ^ y ^ z }
	const k2, k3 = 0x5A827999, 0x6ED9EBA1
	round := func(fn func(x, y, z uint32) uint32, a *uint32, b, c, d, x uint32, s int) {
		*a = bits.RotateLeft32(*a+fn(b, c, d)+x, s)
	}
	round(f, &a, b, c, d, in[0], 3)
	round(f, &d, a, b, c, in[1], 7)
	round(f, &c, d, a, b, in[2], 11)
	round(f, &b, c, d, a, in[3], 19)
	round(f, &a, b, c, d, in[4], 3)
	round(f, &d, a, b, c, in[5], 7)
	round(f, &c, d, a, b, in[6], 11)
	round(f, &b, c, d, a, in[7], 19)

	round(g, &a, b, c, d, in[1]+k2, 3)
	round(g, &d, a, b, c, in[3]+k2, 5)
	round(g, &c, d, a, b, in[5]+k2, 9)
	round(g, &b, c, d, a, in[7]+k2, 13)
	round(g, &a, b, c, d, in[0]+k2, 3)
	round(g, &d, a, b, c, in[2]+k2, 5)
	round(g, &c, d, a, b, in[4]+k2, 9)
	round(g, &b, c, d, a, in[6]+k2, 13)

	round(h, &a, b, c, d, in[3]+k3, 3)
	round(h, &d, a, b, c, in[7]+k3, 9)
	round(h, &c, d, a, b, in[2]+k3, 11)
	round(h, &b, c, d, a, in[6]+k3, 15)
	round(h, &a, b, c, d, in[1]+k3, 3)
	round(h, &d, a, b, c, in[5]+k3, 9)
	round(h, &c, d, a, b, in[0]+k3, 11)
	round(h, &b, c, d, a, in[4]+k3, 15)

	buf[0] += a
	buf[1] += b
	buf[2] += c
	buf[3] += d
}

// tea runs 16 rounds of the Tiny Encryption Algorithm over buf[0:2].
func tea(buf *[4]uint32, in []uint32) {
	var sum uint32
	b0, b1 := buf[0], buf[1]
	a, b, c, d := in[0], in[1], in[2], in[3]
	for range 16 {
		sum += 0x9E3779B9
		b0 += ((b1 << 4) + a) ^ (b1 + sum) ^ ((b1 >> 5) + b)
		b1 += ((b0 << 4) + c) ^ (b0 + sum) ^ ((b0 >> 5) + d)
	}
	buf[0] += b0
	buf[1] += b1
}
