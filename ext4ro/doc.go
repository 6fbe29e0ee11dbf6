// Package ext4ro reads ext2, ext3 and ext4 filesystems, read-only, at the
// level of inodes: the operations a FUSE server needs and nothing that
// writes.
//
// # Model
//
// An FS is opened over an io.ReaderAt holding the image. Open reads the
// superblock and one group descriptor; everything else is read when asked
// for, through a bounded LRU cache of metadata blocks. File contents are
// read straight from Options.Data (by default the same reader) and never
// cached here: the caller's page cache does that.
//
// Metadata and data readers are separate so that a caller can serve them
// from different places: the guest agent reads a generation's metadata
// blocks from the host and file data from a shared device.
//
//	f, err := ext4ro.Open(img, &ext4ro.Options{Size: size})
//	root, err := f.Inode(ext4ro.RootIno)
//	e, err := f.Lookup(root, "etc")
//	dir, err := f.Inode(e.Ino)
//	err = f.ReadDir(dir, 0, func(e ext4ro.DirEntry) bool { … })
//
// Inodes are values (an Inode holds a copy of its on-disk bytes), so the
// caller decides how long one stays valid. Directory cookies are byte
// positions in the directory: ReadDir from an entry's Cookie continues
// after it, and any cookie resumes at the first entry at or after it.
//
// # What is read
//
// Superblock and group descriptors (32- and 64-bit, meta_bg, flex_bg,
// sparse_super and sparse_super2), inodes of 128 bytes and up with the
// extra fields (nanoseconds, times past 2038, creation time), extent trees
// of any depth and ext2/3 block maps up to triple indirection, holes and
// unwritten extents (zeros), bigalloc, linear and htree directories (the
// legacy, half-MD4 and TEA hashes, signed and unsigned, collision runs
// across leaves, large_dir's third level), inline data for files and
// directories, fast and slow symlinks, extended attributes in the inode,
// in a block and in ea_inodes, POSIX ACLs (returned in the VFS xattr
// format, as getxattr shows them), every file type, and casefolded
// directories (see casefold.go for the Unicode caveat).
//
// Checksums are verified where metadata_csum (crc32c) or gdt_csum (crc16)
// covers a structure: superblock, group descriptors, inodes, extent
// blocks, directory leaves, htree nodes and xattr blocks. A mismatch is a
// CorruptError naming the structure, the inode and the block.
//
// # What is refused
//
// Open refuses unknown incompatible features (naming them), a journal
// device, and a journal that needs recovery: the journal is not replayed,
// so such an image's metadata may be stale or inconsistent.
// Options.AllowDirtyJournal opens it anyway, for salvage. Encrypted
// (fscrypt) directories and files give ErrEncrypted: their names and bytes
// are ciphertext and are never handed out.
//
// # Damage
//
// Every length, count, offset and block pointer read from the image is
// checked before use; damage is an ErrCorrupt, never a panic, a hang or an
// allocation larger than a block. Extent trees are checked for depth,
// order and shared subtrees, htrees for levels and order. A lookup whose
// htree index is damaged or uses an unknown hash searches the directory's
// leaves linearly instead, as the kernel does, and counts it in
// Stats().HtreeFallbacks. The fuzz targets in fuzz_test.go hold the
// decoders to this.
//
// # Concurrency
//
// An FS is safe for concurrent use. It has no locks of its own; the block
// cache is sharded, each shard with its own lock, held only for a map
// operation, never across I/O.
//
// # Reads ahead
//
// A cache miss in an inode table or a directory starts reading the
// following blocks (up to 32, within the used part of the table or the
// directory's extent) as ext4 itself does: in the background with
// posix_fadvise when the metadata reader is an *os.File, else in the same
// read.
package ext4ro
