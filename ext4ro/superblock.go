package ext4ro

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"strings"
)

const (
	superblockOffset = 1024
	superblockSize   = 1024
	ext4Magic        = 0xEF53
)

// Feature bits (s_feature_compat, s_feature_incompat, s_feature_ro_compat).
const (
	compatHasJournal = 0x4
	compatDirIndex   = 0x20
	compatSparse2    = 0x200

	incompatCompression = 0x1
	incompatFiletype    = 0x2
	incompatRecover     = 0x4
	incompatJournalDev  = 0x8
	incompatMetaBG      = 0x10
	incompatExtents     = 0x40
	incompat64bit       = 0x80
	incompatMMP         = 0x100
	incompatFlexBG      = 0x200
	incompatEAInode     = 0x400
	incompatDirData     = 0x1000
	incompatCsumSeed    = 0x2000
	incompatLargeDir    = 0x4000
	incompatInlineData  = 0x8000
	incompatEncrypt     = 0x10000
	incompatCasefold    = 0x20000

	roCompatSparseSuper  = 0x1
	roCompatLargeFile    = 0x2
	roCompatHugeFile     = 0x8
	roCompatGdtCsum      = 0x10
	roCompatDirNlink     = 0x20
	roCompatExtraIsize   = 0x40
	roCompatBigalloc     = 0x200
	roCompatMetadataCsum = 0x400
)

// incompatKnown are the incompat features this reader implements.
// incompatRecover is checked separately.
const incompatKnown = incompatFiletype | incompatRecover | incompatMetaBG |
	incompatExtents | incompat64bit | incompatMMP | incompatFlexBG |
	incompatEAInode | incompatCsumSeed | incompatLargeDir |
	incompatInlineData | incompatEncrypt | incompatCasefold

var incompatNames = map[uint32]string{
	incompatCompression: "compression",
	incompatJournalDev:  "journal_dev",
	incompatDirData:     "dirdata",
}

const flagUnsignedHash = 0x2 // s_flags: directory hashes use unsigned chars

// Superblock holds the fields of the superblock that the reader and its
// callers use. All sizes are in bytes unless named otherwise.
type Superblock struct {
	InodesCount     uint32
	BlocksCount     uint64
	FreeBlocks      uint64
	FreeInodes      uint32
	ReservedBlocks  uint64
	FirstDataBlock  uint32
	BlockSize       uint32
	ClusterSize     uint32
	BlocksPerGroup  uint32
	InodesPerGroup  uint32
	InodeSize       uint16
	FirstIno        uint32
	RevLevel        uint32
	FeatureCompat   uint32
	FeatureIncompat uint32
	FeatureRoCompat uint32
	UUID            [16]byte
	VolumeName      string
	HashSeed        [4]uint32
	DefHashVersion  uint8
	DescSize        uint16
	FirstMetaBG     uint32
	Flags           uint32
	MinExtraIsize   uint16
	BackupBGs       [2]uint32
	ChecksumSeed    uint32
	Encoding        uint16
	// KbytesWritten is s_kbytes_written: what the filesystem has written
	// to its device over its life, as of the last time the kernel wrote
	// the superblock (a freeze, a thaw, an unmount). It only grows.
	KbytesWritten uint64
}

func (sb *Superblock) incompat(f uint32) bool { return sb.FeatureIncompat&f != 0 }
func (sb *Superblock) roCompat(f uint32) bool { return sb.FeatureRoCompat&f != 0 }
func (sb *Superblock) compat(f uint32) bool   { return sb.FeatureCompat&f != 0 }

// GroupCount is the number of block groups.
func (sb *Superblock) GroupCount() uint32 {
	n := (sb.BlocksCount - uint64(sb.FirstDataBlock) + uint64(sb.BlocksPerGroup) - 1) / uint64(sb.BlocksPerGroup)
	return uint32(n)
}

// parseSuperblock decodes and validates the 1024 bytes of a superblock.
// It checks everything later code divides by or allocates from.
func parseSuperblock(b []byte) (*Superblock, error) {
	if len(b) < superblockSize {
		return nil, corrupt("superblock", 0, 0, "short: %d bytes", len(b))
	}
	le := binary.LittleEndian
	if m := le.Uint16(b[0x38:]); m != ext4Magic {
		return nil, corrupt("superblock", 0, 0, "bad magic %#x (not ext2/3/4)", m)
	}
	sb := &Superblock{
		InodesCount:     le.Uint32(b[0x0:]),
		BlocksCount:     uint64(le.Uint32(b[0x4:])),
		ReservedBlocks:  uint64(le.Uint32(b[0x8:])),
		FreeBlocks:      uint64(le.Uint32(b[0xC:])),
		FreeInodes:      le.Uint32(b[0x10:]),
		FirstDataBlock:  le.Uint32(b[0x14:]),
		BlocksPerGroup:  le.Uint32(b[0x20:]),
		InodesPerGroup:  le.Uint32(b[0x28:]),
		RevLevel:        le.Uint32(b[0x4C:]),
		FeatureCompat:   le.Uint32(b[0x5C:]),
		FeatureIncompat: le.Uint32(b[0x60:]),
		FeatureRoCompat: le.Uint32(b[0x64:]),
		DefHashVersion:  b[0xFC],
		DescSize:        le.Uint16(b[0xFE:]),
		FirstMetaBG:     le.Uint32(b[0x104:]),
		Flags:           le.Uint32(b[0x160:]),
		MinExtraIsize:   le.Uint16(b[0x15C:]),
		BackupBGs:       [2]uint32{le.Uint32(b[0x24C:]), le.Uint32(b[0x250:])},
		ChecksumSeed:    le.Uint32(b[0x270:]),
		Encoding:        le.Uint16(b[0x27C:]),
		KbytesWritten:   le.Uint64(b[0x178:]),
	}
	copy(sb.UUID[:], b[0x68:0x78])
	sb.VolumeName = string(bytes.TrimRight(b[0x78:0x88], "\x00"))
	for i := range sb.HashSeed {
		sb.HashSeed[i] = le.Uint32(b[0xEC+4*i:])
	}
	logBlock := le.Uint32(b[0x18:])
	logCluster := le.Uint32(b[0x1C:])
	if logBlock > 6 { // 1 KiB << 6 = 64 KiB, the largest ext4 block
		return nil, corrupt("superblock", 0, 0, "block size 2^%d KiB is out of range", logBlock)
	}
	sb.BlockSize = 1024 << logBlock
	sb.ClusterSize = sb.BlockSize
	if sb.roCompat(roCompatBigalloc) {
		if logCluster < logBlock || logCluster > 29 {
			return nil, corrupt("superblock", 0, 0, "cluster size 2^%d KiB is out of range", logCluster)
		}
		sb.ClusterSize = 1024 << logCluster
	}
	if sb.RevLevel == 0 {
		sb.InodeSize = 128
		sb.FirstIno = 11
	} else {
		sb.InodeSize = le.Uint16(b[0x58:])
		sb.FirstIno = le.Uint32(b[0x54:])
	}
	if sb.InodeSize < 128 || sb.InodeSize&(sb.InodeSize-1) != 0 || uint32(sb.InodeSize) > sb.BlockSize {
		return nil, corrupt("superblock", 0, 0, "inode size %d is invalid", sb.InodeSize)
	}
	if sb.incompat(incompat64bit) {
		sb.BlocksCount |= uint64(le.Uint32(b[0x150:])) << 32
		sb.ReservedBlocks |= uint64(le.Uint32(b[0x154:])) << 32
		sb.FreeBlocks |= uint64(le.Uint32(b[0x158:])) << 32
		if sb.DescSize < 64 || sb.DescSize > 1024 || sb.DescSize&(sb.DescSize-1) != 0 {
			return nil, corrupt("superblock", 0, 0, "group descriptor size %d is invalid", sb.DescSize)
		}
	} else {
		sb.DescSize = 32
	}
	if sb.BlocksPerGroup == 0 || sb.BlocksPerGroup > 8*sb.BlockSize && !sb.roCompat(roCompatBigalloc) {
		return nil, corrupt("superblock", 0, 0, "blocks per group %d is invalid", sb.BlocksPerGroup)
	}
	if sb.InodesPerGroup == 0 || sb.InodesPerGroup > 8*sb.BlockSize {
		return nil, corrupt("superblock", 0, 0, "inodes per group %d is invalid", sb.InodesPerGroup)
	}
	if uint64(sb.FirstDataBlock) >= sb.BlocksCount {
		return nil, corrupt("superblock", 0, 0, "first data block %d is beyond the %d blocks", sb.FirstDataBlock, sb.BlocksCount)
	}
	if sb.BlocksCount > 1<<48 || sb.BlocksCount > (1<<63-1)/uint64(sb.BlockSize) {
		return nil, corrupt("superblock", 0, 0, "block count %d is beyond ext4's limit", sb.BlocksCount)
	}
	if uint64(sb.GroupCount())*uint64(sb.InodesPerGroup) != uint64(sb.InodesCount) {
		return nil, corrupt("superblock", 0, 0, "inode count %d does not match %d groups of %d",
			sb.InodesCount, sb.GroupCount(), sb.InodesPerGroup)
	}
	if sb.FirstIno < 11 || sb.FirstIno > sb.InodesCount {
		return nil, corrupt("superblock", 0, 0, "first inode %d is invalid", sb.FirstIno)
	}
	if sb.roCompat(roCompatMetadataCsum) {
		if t := b[0x175]; t != 1 {
			return nil, corrupt("superblock", 0, 0, "checksum type %d is not crc32c", t)
		}
		want := le.Uint32(b[0x3FC:])
		if got := crc32c(^uint32(0), b[:0x3FC]); got != want {
			return nil, badChecksum("superblock", 0, 0)
		}
	}
	return sb, nil
}

// checkFeatures refuses what the reader cannot read correctly.
func (sb *Superblock) checkFeatures(allowDirtyJournal bool) error {
	if unknown := sb.FeatureIncompat &^ incompatKnown; unknown != 0 {
		var names []string
		for bit := uint32(1); bit != 0; bit <<= 1 {
			if unknown&bit != 0 {
				if n, ok := incompatNames[bit]; ok {
					names = append(names, n)
				} else {
					names = append(names, fmt.Sprintf("%#x", bit))
				}
			}
		}
		return fmt.Errorf("ext4ro: %w incompatible feature(s): %s", ErrUnsupported, strings.Join(names, ", "))
	}
	if sb.incompat(incompatCasefold) && sb.Encoding != encodingUTF8 {
		return fmt.Errorf("ext4ro: %w casefold encoding %d (only utf8 is defined)", ErrUnsupported, sb.Encoding)
	}
	if sb.incompat(incompatRecover) && !allowDirtyJournal {
		return fmt.Errorf("ext4ro: %w: the journal needs recovery (the filesystem was not cleanly unmounted "+
			"or frozen); replay it with e2fsck or a kernel mount, or open with AllowDirtyJournal to read the "+
			"possibly stale and inconsistent on-disk state without it", ErrUnsupported)
	}
	return nil
}

// readSuperblock reads and parses the primary superblock.
func readSuperblock(r io.ReaderAt) (*Superblock, error) {
	b := make([]byte, superblockSize)
	if _, err := r.ReadAt(b, superblockOffset); err != nil {
		return nil, fmt.Errorf("ext4ro: reading superblock: %w", err)
	}
	return parseSuperblock(b)
}
