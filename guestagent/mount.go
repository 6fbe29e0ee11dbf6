package guestagent

import (
	"fmt"
	"os"
	"runtime/debug"
	"strconv"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// MountConfig says how to mount a FileSystem.
type MountConfig struct {
	FsName string // shown as the source in /proc/mounts
	Debug  bool   // log every FUSE request
	// ReadAheadKB raises the kernel's readahead for the mount (FUSE's
	// own negotiation can only lower it). 0 keeps the kernel default.
	ReadAheadKB int
}

// Mount mounts fs read-only at dir and returns once the kernel has sent
// INIT, with the server running. Unmounting (umount(8) or
// server.Unmount) ends it; server.Wait returns then.
func Mount(fs *FileSystem, dir string, cfg MountConfig) (*fuse.Server, error) {
	root := os.Geteuid() == 0
	opts := &fuse.MountOptions{
		FsName:               cfg.FsName,
		Name:                 "leasefs",
		Options:              []string{"ro", "default_permissions"},
		AllowOther:           root,
		DirectMount:          root,
		MaxWrite:             1 << 20, // also the largest read the kernel sends
		MaxReadAhead:         1 << 20,
		MaxBackground:        64,
		DisableSplice:        true, // splicing 1 MiB replies fails and logs on every read
		EnableSymlinkCaching: true,
		// The view only changes by explicit switches, which invalidate
		// pages themselves; mtime changes must not drop the cache.
		ExplicitDataCacheControl: true,
		// Mappings of files opened for direct I/O (--page-cache=host),
		// where the kernel has it (6.6): see DirectIOMmap.
		ExtraCapabilities: fuse.CAP_DIRECT_IO_ALLOW_MMAP,
		Debug:             cfg.Debug,
		// A bug in one request fails that request, not the mount.
		PanicHandler: func(r any) fuse.Status {
			fs.log.Error("a FUSE request handler panicked; answering EIO", "panic", r, "stack", string(debug.Stack()))
			return fuse.EIO
		},
	}
	srv, err := fuse.NewServer(fs, dir, opts)
	if err != nil {
		return nil, fmt.Errorf("mounting %s: %w", dir, err)
	}
	go srv.Serve()
	if err := srv.WaitMount(); err != nil {
		_ = srv.Unmount()
		return nil, fmt.Errorf("mounting %s: %w", dir, err)
	}
	if cfg.ReadAheadKB > 0 {
		if err := setReadAhead(dir, cfg.ReadAheadKB); err != nil {
			fs.log.Warn("could not raise readahead", "error", err)
		}
	}
	return srv, nil
}

// setReadAhead writes the readahead of the mount's backing device info,
// /sys/class/bdi/MAJOR:MINOR/read_ahead_kb.
func setReadAhead(dir string, kb int) error {
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		return err
	}
	path := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	return os.WriteFile(path, []byte(strconv.Itoa(kb)), 0)
}

// DirectIOMmap reports whether the kernel of a mount maps files opened
// for direct I/O (FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6). Without it a
// shared mapping of such a file fails (ENODEV); private ones — exec,
// and most programs that map files to read them — work either way.
func DirectIOMmap(srv *fuse.Server) bool {
	return srv.KernelSettings().Flags64()&fuse.CAP_DIRECT_IO_ALLOW_MMAP != 0
}
