package ext4ro

import (
	"errors"
	"fmt"
	"io"
)

// ReadAt reads the bytes of regular file in at offset off into p, as
// pread(2) would: holes and unwritten extents read as zeros, and a read
// that reaches the end of the file returns io.EOF with the bytes before it.
// Contents come from the data reader (Options.Data).
func (f *FS) ReadAt(in *Inode, p []byte, off int64) (int, error) {
	switch {
	case in.IsDir():
		return 0, fmt.Errorf("ext4ro: inode %d: %w", in.Ino, ErrIsDir)
	case !in.IsRegular():
		return 0, fmt.Errorf("ext4ro: inode %d is not a regular file: %w", in.Ino, ErrInvalid)
	case in.Encrypted():
		return 0, fmt.Errorf("ext4ro: inode %d: %w", in.Ino, ErrEncrypted)
	}
	return f.readFile(in, p, off, f.data)
}

// readFile reads any inode's bytes through its block map from r.
func (f *FS) readFile(in *Inode, p []byte, off int64, r io.ReaderAt) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("ext4ro: inode %d: negative offset %d: %w", in.Ino, off, ErrInvalid)
	}
	if uint64(off) >= in.Size {
		return 0, io.EOF
	}
	want := len(p)
	n := int(min(uint64(len(p)), in.Size-uint64(off)))
	p = p[:n]
	if in.hasInlineData() {
		data, err := f.inlineData(in)
		if err != nil {
			return 0, err
		}
		if in.Size > uint64(len(data)) {
			return 0, corrupt("inline data", in.Ino, 0, "size %d but %d bytes stored", in.Size, len(data))
		}
		copy(p, data[off:])
	} else if err := f.readMapped(in, p, off, r); err != nil {
		return 0, err
	}
	if n < want {
		return n, io.EOF
	}
	return n, nil
}

// readMapped fills p with the file bytes at off: device bytes where the
// map has written extents, zeros elsewhere.
func (f *FS) readMapped(in *Inode, p []byte, off int64, r io.ReaderAt) error {
	bs := f.bs
	start, end := uint64(off), uint64(off)+uint64(len(p))
	pos := start // the next byte of p not yet filled
	err := f.walkMap(in, start/bs, (end+bs-1)/bs, func(m run) error {
		rs, re := m.logical*bs, (m.logical+m.length)*bs
		s, e := max(rs, start), min(re, end)
		if s >= e {
			return nil
		}
		clear(p[pos-start : s-start])
		pos = e
		dst := p[s-start : e-start]
		if m.unwritten {
			clear(dst)
			return nil
		}
		if _, err := r.ReadAt(dst, int64(m.physical*bs+(s-rs))); err != nil {
			if errors.Is(err, io.EOF) {
				return corrupt("extent", in.Ino, m.physical, "data beyond the end of the device")
			}
			return fmt.Errorf("ext4ro: inode %d: reading block %d: %w", in.Ino, m.physical+(s-rs)/bs, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	clear(p[pos-start:])
	return nil
}

// Readlink returns the target of symlink in.
func (f *FS) Readlink(in *Inode) ([]byte, error) {
	if !in.IsSymlink() {
		return nil, fmt.Errorf("ext4ro: inode %d is not a symlink: %w", in.Ino, ErrInvalid)
	}
	if in.Encrypted() {
		return nil, fmt.Errorf("ext4ro: inode %d: %w", in.Ino, ErrEncrypted)
	}
	if in.Size == 0 || in.Size >= f.bs || in.Size > 4095 {
		return nil, corrupt("symlink", in.Ino, 0, "target length %d is invalid", in.Size)
	}
	if f.isFastSymlink(in) {
		if in.Size > 60 {
			return nil, corrupt("symlink", in.Ino, 0, "fast symlink of %d bytes", in.Size)
		}
		return append([]byte(nil), in.iblock()[:in.Size]...), nil
	}
	// Slow symlinks keep their target in a block: metadata, so read it
	// from the metadata reader.
	t := make([]byte, in.Size)
	if _, err := f.readFile(in, t, 0, f.meta); err != nil {
		return nil, err
	}
	return t, nil
}

// isFastSymlink follows the kernel: a symlink with no blocks of its own
// (an xattr block does not count) keeps its target in i_block.
func (f *FS) isFastSymlink(in *Inode) bool {
	if in.Flags&flagEAInode != 0 {
		return in.Size < 60
	}
	if in.hasInlineData() {
		return false
	}
	ea := uint64(0)
	if in.XattrBlock != 0 {
		ea = uint64(f.sb.ClusterSize) / 512
	}
	return in.Blocks-ea == 0
}
