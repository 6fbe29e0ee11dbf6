package hostagent

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/mountinfo"
)

// checkMount checks that device is the ext4 filesystem mounted at
// mount, read-write, and returns its mount.
func checkMount(device, mount string) (mountinfo.Mount, error) {
	var dst unix.Stat_t
	if err := unix.Stat(device, &dst); err != nil {
		return mountinfo.Mount{}, fmt.Errorf("the export's device: %w", err)
	}
	if dst.Mode&unix.S_IFMT != unix.S_IFBLK {
		return mountinfo.Mount{}, fmt.Errorf("%s is not a block device", device)
	}
	m, ok, err := mountinfo.At(mount)
	if err != nil {
		return m, err
	}
	want := fmt.Sprintf("%d:%d", unix.Major(dst.Rdev), unix.Minor(dst.Rdev))
	switch {
	case !ok:
		return m, fmt.Errorf("nothing is mounted at %s: mount %s there first", mount, device)
	case m.Dev != want:
		return m, fmt.Errorf("%s is not mounted at %s (device %s is)", device, mount, m.Dev)
	case m.FSType != "ext4":
		return m, fmt.Errorf("%s is %s, not ext4", mount, m.FSType)
	case !m.SuperRW:
		return m, fmt.Errorf("the filesystem at %s is read-only: the writer cannot change it, so there is nothing to publish (mount it read-write)", mount)
	}
	return m, nil
}

// CheckExport checks, as OpenExport does, that device is the ext4
// filesystem mounted read-write at mount.
func CheckExport(device, mount string) error {
	_, err := checkMount(device, mount)
	return err
}

// ErrGone is what Mounted's error is when the export's filesystem is
// certainly gone (errors.Is); any other error means Mounted could not
// tell (the mount table unreadable for want of a descriptor or memory),
// and the export must not be given up for it.
var ErrGone = errors.New("the export's filesystem is gone")

type goneError string

func (e goneError) Error() string      { return string(e) }
func (goneError) Is(target error) bool { return target == ErrGone }

// Mounted checks that the export is still what it was when opened: the
// same mount of its device, read-write, its device still there. An
// export unmounted (even lazily), remounted read-only or whose device
// went away is gone (ErrGone): what the writer writes at the mount point
// now lands elsewhere, and nothing more of it may be published.
func (e *Export) Mounted() error {
	m, ok, err := mountinfo.At(e.cfg.Mount)
	if err != nil {
		return fmt.Errorf("cannot check that %s is still mounted: %w", e.cfg.Mount, err)
	}
	var dst unix.Stat_t
	switch {
	case !ok || m.ID != e.mnt.ID:
		return goneError(fmt.Sprintf("the filesystem of %s was unmounted from %s", e.cfg.Device, e.cfg.Mount))
	case !m.SuperRW:
		return goneError(fmt.Sprintf("the filesystem at %s was remounted read-only", e.cfg.Mount))
	}
	switch err := unix.Stat(e.cfg.Device, &dst); {
	case errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENXIO):
		return goneError(fmt.Sprintf("the device %s went away", e.cfg.Device))
	case err != nil:
		return fmt.Errorf("cannot check the device %s: %w", e.cfg.Device, err)
	case fmt.Sprintf("%d:%d", unix.Major(dst.Rdev), unix.Minor(dst.Rdev)) != e.mnt.Dev:
		return goneError(fmt.Sprintf("the device %s went away (%s is another device now)", e.cfg.Device, e.cfg.Device))
	}
	return nil
}
