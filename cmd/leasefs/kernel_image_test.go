package main

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// TestMountMatchesKernelWrittenImage covers what only the kernel writes:
// nanosecond timestamps before 1970 and after 2038, kernel-built htrees,
// extent trees several levels deep, unwritten extents, xattr values in
// their own inodes (ea_inode), and block-mapped files written by the
// kernel's ext3 code.
func TestMountMatchesKernelWrittenImage(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireLoop(t)
	const ext4 = "has_journal,extent,huge_file,flex_bg,dir_nlink,extra_isize,metadata_csum,64bit"
	cases := []struct {
		name, fstype string
		bs           int
		args         []string
		deepExtents  int // punch this many holes into one file
	}{
		{name: "ext4-4k", fstype: "ext4", bs: 4096, args: []string{"-O", ext4 + ",ea_inode"}, deepExtents: 3000},
		// With 1 KiB blocks an extent leaf holds 84 entries: 30,000
		// extents need a tree of depth 3.
		{name: "ext4-1k-depth3", fstype: "ext4", bs: 1024, args: []string{"-O", ext4}, deepExtents: 30000},
		{name: "ext3-1k", fstype: "ext3", bs: 1024, args: []string{"-I", "256"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			args := append([]string{"-b", strconv.Itoa(c.bs)}, c.args...)
			img := imgtest.Mkfs(t, c.fstype, "", 512, args...)
			rw := imgtest.KernelMount(t, img, "rw")
			imgtest.Populate(t, rw, imgtest.TreeSpec{Seed: 99, BlockSize: c.bs, ManyEntries: 5000, NanoTimes: true})
			shapeKernelImage(t, rw, c.bs, c.deepExtents, c.fstype == "ext4")
			imgtest.Unmount(t, rw)
			imgtest.Fsck(t, img, "-n") // the kernel left it consistent
			checkAgainstKernel(t, img)
		})
	}
}

// shapeKernelImage adds, through the kernel, what mkfs -d cannot make.
func shapeKernelImage(t *testing.T, root string, bs, holes int, extents bool) {
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "kernel"), 0o755))
	if extents && holes > 0 {
		// Write a file, then punch every other block: one extent per
		// remaining block, which needs a deep tree.
		f, err := os.Create(filepath.Join(root, "kernel/fragmented"))
		must(err)
		buf := make([]byte, bs)
		for i := range 2 * holes {
			for j := range buf {
				buf[j] = byte(i*7 + j)
			}
			_, err := f.Write(buf)
			must(err)
		}
		must(f.Sync())
		for i := 0; i < 2*holes; i += 2 {
			must(unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(i*bs), int64(bs)))
		}
		must(f.Close())

		// Unwritten extents: preallocated, partly written, and
		// preallocated past the end of the file.
		g, err := os.Create(filepath.Join(root, "kernel/unwritten"))
		must(err)
		must(unix.Fallocate(int(g.Fd()), 0, 0, 1<<20))
		_, err = g.WriteAt([]byte("written in the middle"), 300000)
		must(err)
		must(unix.Fallocate(int(g.Fd()), unix.FALLOC_FL_KEEP_SIZE, 1<<20, 1<<20))
		must(g.Close())
	}
	if bs >= 4096 && extents {
		// A value larger than a block lives in its own inode (ea_inode).
		big := []byte(strings.Repeat("ea_inode value ", 800))
		must(os.WriteFile(filepath.Join(root, "kernel/ea"), []byte("x"), 0o644))
		must(unix.Setxattr(filepath.Join(root, "kernel/ea"), "user.huge", big, 0))
	}
	// Overwrite in place, append, truncate: the kernel reuses and frees
	// blocks and rewrites extents.
	p := filepath.Join(root, "kernel/rewritten")
	must(os.WriteFile(p, []byte(strings.Repeat("a", 3*bs+5)), 0o644))
	f, err := os.OpenFile(p, os.O_RDWR|os.O_APPEND, 0)
	must(err)
	_, err = f.Write([]byte("appended"))
	must(err)
	must(f.Truncate(int64(2*bs + 1)))
	must(f.Close())
}

// TestEncryptedFilesAreRefused: fscrypt-encrypted directories and files
// are never served as ciphertext; they give EACCES.
func TestEncryptedFilesAreRefused(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireLoop(t)
	img := imgtest.Mkfs(t, "ext4", "", 64, "-b", "4096", "-O", "has_journal,extent,metadata_csum,64bit,encrypt")
	rw := imgtest.KernelMount(t, img, "rw")
	enc := filepath.Join(rw, "secret")
	if err := os.Mkdir(enc, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := encryptDir(rw, enc); err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTTY) {
			testenv.Unavailable(t, "kernel without fscrypt for ext4: %v", err)
		}
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(enc, "plain.txt"), []byte("the plaintext"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rw, "public.txt"), []byte("public"), 0o644); err != nil {
		t.Fatal(err)
	}
	imgtest.Unmount(t, rw)

	dir := startMount(t, img)
	if b, err := os.ReadFile(filepath.Join(dir, "public.txt")); err != nil || string(b) != "public" {
		t.Fatalf("public file: %q, %v", b, err)
	}
	st, err := os.Stat(filepath.Join(dir, "secret"))
	if err != nil || !st.IsDir() {
		t.Fatalf("stat of the encrypted directory: %v, %v", st, err)
	}
	if _, err := os.ReadDir(filepath.Join(dir, "secret")); !errors.Is(err, unix.EACCES) {
		t.Fatalf("listing the encrypted directory: %v, want EACCES", err)
	}
}

// encryptDir sets a v2 fscrypt policy on the empty directory dir with a
// fresh key added to the filesystem at root.
func encryptDir(root, dir string) error {
	rootFd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	defer unix.Close(rootFd)
	// struct fscrypt_add_key_arg followed by the raw key.
	const keySize = 64
	buf := make([]byte, unsafe.Sizeof(unix.FscryptAddKeyArg{})+keySize)
	arg := (*unix.FscryptAddKeyArg)(unsafe.Pointer(&buf[0]))
	arg.Key_spec.Type = unix.FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER
	arg.Raw_size = keySize
	for i := range keySize {
		buf[unsafe.Sizeof(unix.FscryptAddKeyArg{})+uintptr(i)] = byte(i*31 + 7)
	}
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(rootFd), unix.FS_IOC_ADD_ENCRYPTION_KEY, uintptr(unsafe.Pointer(&buf[0]))); e != 0 {
		return e
	}
	var id [unix.FSCRYPT_KEY_IDENTIFIER_SIZE]byte
	copy(id[:], (*[32]byte)(unsafe.Pointer(&arg.Key_spec.U))[:len(id)])
	policy := unix.FscryptPolicyV2{
		Version:                   unix.FSCRYPT_POLICY_V2,
		Contents_encryption_mode:  unix.FSCRYPT_MODE_AES_256_XTS,
		Filenames_encryption_mode: unix.FSCRYPT_MODE_AES_256_CTS,
		Flags:                     unix.FSCRYPT_POLICY_FLAGS_PAD_32,
		Master_key_identifier:     id,
	}
	dirFd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	defer unix.Close(dirFd)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(dirFd), unix.FS_IOC_SET_ENCRYPTION_POLICY, uintptr(unsafe.Pointer(&policy))); e != 0 {
		return e
	}
	return nil
}
