package ext4ro

import (
	"encoding/binary"
	"fmt"
	"strings"
)

const xattrMagic = 0xEA020000

// Name indexes of xattr entries, and the prefixes they stand for.
const (
	xattrUser       = 1
	xattrACLAccess  = 2
	xattrACLDefault = 3
	xattrTrusted    = 4
	xattrSecurity   = 6
	xattrSystem     = 7
)

// xattrPrefixes lists the namespaces the kernel shows in listxattr, in
// index order. system.data (inline data) and the fscrypt context are
// internal and never listed.
var xattrPrefixes = map[uint8]string{
	xattrUser:       "user.",
	xattrACLAccess:  "system.posix_acl_access",
	xattrACLDefault: "system.posix_acl_default",
	xattrTrusted:    "trusted.",
	xattrSecurity:   "security.",
}

// maxXattrValue bounds a value read from an ea_inode (the kernel's limit).
const maxXattrValue = 64 << 10

// xattrEntry is one decoded entry. value is nil for ea_inode values until
// loaded.
type xattrEntry struct {
	index     uint8
	name      []byte
	value     []byte
	valueIno  uint32
	valueSize uint32
}

// xattrs returns the inode's extended attributes: those in the inode body
// first, then those in its xattr block.
func (f *FS) xattrs(in *Inode) ([]xattrEntry, error) {
	var out []xattrEntry
	if len(in.raw) > 128 {
		start := 128 + in.extraIsize()
		if start+4 <= len(in.raw) && binary.LittleEndian.Uint32(in.raw[start:]) == xattrMagic {
			region := in.raw[start+4:]
			var err error
			out, err = parseXattrEntries(out, region, region, in.Ino, 0, "inode xattrs")
			if err != nil {
				return nil, err
			}
		}
	}
	if in.XattrBlock != 0 {
		b, err := f.block(in.XattrBlock)
		if err != nil {
			return nil, fmt.Errorf("inode %d: xattr block: %w", in.Ino, err)
		}
		le := binary.LittleEndian
		if le.Uint32(b) != xattrMagic {
			return nil, corrupt("xattr block", in.Ino, in.XattrBlock, "bad magic %#x", le.Uint32(b))
		}
		if le.Uint32(b[8:]) != 1 {
			return nil, corrupt("xattr block", in.Ino, in.XattrBlock, "h_blocks is %d, not 1", le.Uint32(b[8:]))
		}
		if f.csum {
			var nb [8]byte
			le.PutUint64(nb[:], in.XattrBlock)
			c := crc32c(f.seed, nb[:])
			c = crc32c(c, b[:0x10])
			c = crc32c(c, zero4[:])
			c = crc32c(c, b[0x14:])
			if c != le.Uint32(b[0x10:]) {
				return nil, badChecksum("xattr block", in.Ino, in.XattrBlock)
			}
		}
		var err2 error
		out, err2 = parseXattrEntries(out, b[32:], b, in.Ino, in.XattrBlock, "xattr block")
		if err2 != nil {
			return nil, err2
		}
	}
	return out, nil
}

// parseXattrEntries decodes entries from ents until the 4-zero-byte end
// marker. Value offsets are relative to base (ents is a suffix of base).
func parseXattrEntries(out []xattrEntry, ents, base []byte, ino uint32, blk uint64, what string) ([]xattrEntry, error) {
	le := binary.LittleEndian
	for len(ents) >= 4 && le.Uint32(ents) != 0 {
		if len(ents) < 16 {
			return nil, corrupt(what, ino, blk, "entry runs past the end")
		}
		nameLen := int(ents[0])
		e := xattrEntry{
			index:     ents[1],
			valueIno:  le.Uint32(ents[4:]),
			valueSize: le.Uint32(ents[8:]),
		}
		size := (16 + nameLen + 3) &^ 3
		if size > len(ents) { // an empty name is valid: ACLs have none
			return nil, corrupt(what, ino, blk, "entry name of %d bytes is invalid", nameLen)
		}
		e.name = ents[16 : 16+nameLen]
		if e.valueIno == 0 {
			off := int(le.Uint16(ents[2:]))
			if uint64(off)+uint64(e.valueSize) > uint64(len(base)) {
				return nil, corrupt(what, ino, blk, "value of %q (%d bytes at %d) runs past the end", e.name, e.valueSize, off)
			}
			e.value = base[off : off+int(e.valueSize)]
		} else if e.valueSize > maxXattrValue {
			return nil, corrupt(what, ino, blk, "ea_inode value of %q is %d bytes", e.name, e.valueSize)
		}
		out = append(out, e)
		ents = ents[size:]
	}
	return out, nil
}

// ListXattr returns the names of the inode's extended attributes, as the
// kernel lists them.
func (f *FS) ListXattr(in *Inode) ([]string, error) {
	es, err := f.xattrs(in)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(es))
	for _, e := range es {
		p, ok := xattrPrefixes[e.index]
		if !ok {
			continue
		}
		if e.index == xattrACLAccess || e.index == xattrACLDefault {
			names = append(names, p)
		} else {
			names = append(names, p+string(e.name))
		}
	}
	return names, nil
}

// GetXattr returns the value of the extended attribute name. POSIX ACLs
// come back in the kernel's xattr format, as getxattr(2) shows them.
func (f *FS) GetXattr(in *Inode, name string) ([]byte, error) {
	index, suffix, ok := splitXattrName(name)
	if !ok {
		return nil, fmt.Errorf("ext4ro: inode %d: xattr %q: %w", in.Ino, name, ErrNoXattr)
	}
	es, err := f.xattrs(in)
	if err != nil {
		return nil, err
	}
	for _, e := range es {
		if e.index != index || string(e.name) != suffix && index != xattrACLAccess && index != xattrACLDefault {
			continue
		}
		v, err := f.xattrValue(in, e)
		if err != nil {
			return nil, err
		}
		if index == xattrACLAccess || index == xattrACLDefault {
			return aclToXattr(v, in.Ino)
		}
		return v, nil
	}
	return nil, fmt.Errorf("ext4ro: inode %d: xattr %q: %w", in.Ino, name, ErrNoXattr)
}

func splitXattrName(name string) (uint8, string, bool) {
	switch name {
	case "system.posix_acl_access":
		return xattrACLAccess, "", true
	case "system.posix_acl_default":
		return xattrACLDefault, "", true
	}
	for idx, p := range xattrPrefixes {
		if idx != xattrACLAccess && idx != xattrACLDefault && strings.HasPrefix(name, p) && len(name) > len(p) {
			return idx, name[len(p):], true
		}
	}
	return 0, "", false
}

// xattrValue returns an entry's value, reading an ea_inode if it has one.
func (f *FS) xattrValue(owner *Inode, e xattrEntry) ([]byte, error) {
	if e.valueIno == 0 {
		return append([]byte(nil), e.value...), nil
	}
	vi, err := f.Inode(e.valueIno)
	if err != nil {
		return nil, fmt.Errorf("inode %d: xattr %q in ea_inode %d: %w", owner.Ino, e.name, e.valueIno, err)
	}
	if vi.Flags&flagEAInode == 0 || vi.Size != uint64(e.valueSize) {
		return nil, corrupt("ea_inode", owner.Ino, 0, "inode %d does not hold a %d-byte value", e.valueIno, e.valueSize)
	}
	v := make([]byte, e.valueSize)
	if _, err := f.readFile(vi, v, 0, f.meta); err != nil {
		return nil, err
	}
	return v, nil
}

// ext4 stores POSIX ACLs compactly (version 1, 4-byte entries for the
// owner, group, mask and other); getxattr shows the VFS format (version 2,
// 8-byte entries, id -1 where none applies).
const (
	aclUserObj  = 0x01
	aclUser     = 0x02
	aclGroupObj = 0x04
	aclGroup    = 0x08
	aclMask     = 0x10
	aclOther    = 0x20
)

func aclToXattr(v []byte, ino uint32) ([]byte, error) {
	le := binary.LittleEndian
	if len(v) < 4 || le.Uint32(v) != 1 {
		return nil, corrupt("ACL", ino, 0, "bad header")
	}
	out := le.AppendUint32(make([]byte, 0, 4+2*len(v)), 2)
	for p := v[4:]; len(p) > 0; {
		if len(p) < 4 {
			return nil, corrupt("ACL", ino, 0, "truncated entry")
		}
		tag, perm := le.Uint16(p), le.Uint16(p[2:])
		id := ^uint32(0)
		switch tag {
		case aclUserObj, aclGroupObj, aclMask, aclOther:
			p = p[4:]
		case aclUser, aclGroup:
			if len(p) < 8 {
				return nil, corrupt("ACL", ino, 0, "truncated entry")
			}
			id = le.Uint32(p[4:])
			p = p[8:]
		default:
			return nil, corrupt("ACL", ino, 0, "unknown tag %#x", tag)
		}
		out = le.AppendUint16(out, tag)
		out = le.AppendUint16(out, perm)
		out = le.AppendUint32(out, id)
	}
	return out, nil
}

// inlineData returns an inline-data inode's bytes: the 60 bytes of i_block
// followed by the value of its system.data xattr.
func (f *FS) inlineData(in *Inode) ([]byte, error) {
	es, err := f.xattrs(in)
	if err != nil {
		return nil, err
	}
	data := append([]byte(nil), in.iblock()...)
	for _, e := range es {
		if e.index == xattrSystem && string(e.name) == "data" {
			if e.valueIno != 0 {
				return nil, corrupt("inline data", in.Ino, 0, "system.data in an ea_inode")
			}
			data = append(data, e.value...)
			break
		}
	}
	return data, nil
}
