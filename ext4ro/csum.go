package ext4ro

import (
	"encoding/binary"
	"hash/crc32"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32c continues ext4's checksum: the kernel's crc32c_le, which neither
// inverts its input nor its output. hash/crc32 inverts both, so invert
// around it.
func crc32c(seed uint32, p []byte) uint32 {
	return ^crc32.Update(^seed, castagnoli, p)
}

func crc32cU32(seed, v uint32) uint32 {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	return crc32c(seed, b[:])
}

var zero4 [4]byte

// crc16 is the CRC-16/ARC used by the older gdt_csum (uninit_bg) feature
// for group descriptors. The standard library has no CRC-16.
func crc16(crc uint16, p []byte) uint16 {
	for _, b := range p {
		crc = crc16Table[byte(crc)^b] ^ crc>>8
	}
	return crc
}

var crc16Table = func() (t [256]uint16) {
	for i := range t {
		c := uint16(i)
		for range 8 {
			if c&1 != 0 {
				c = c>>1 ^ 0xA001
			} else {
				c >>= 1
			}
		}
		t[i] = c
	}
	return t
}()
