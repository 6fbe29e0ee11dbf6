package guestagent

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/internal/directio"
	"github.com/leasefs/leasefs/vsockproto"
)

// The device is the export's disk attached to this VM read-only, file
// data is read from it, and nothing but the host's word says it is the
// right disk. So it is checked at connect and after every reconnect: its
// superblock must name the export's filesystem (UUID, block size, block
// count, inode count), and most of a sample of metadata blocks of the
// generation (inode-table blocks spread over the filesystem) must read
// on the device as the host serves them. Blocks the host wrote since the
// generation may differ; a disk that is another filesystem, or a stale
// copy of this one, differs in its identity or in most of them. A
// mismatch refuses the mount; after a reconnect it sends reads through
// the host (logged) until a later check matches.

// DeviceState is where the device's verification stands.
type DeviceState string

// Device states.
const (
	DeviceUnchecked DeviceState = "unchecked"
	DeviceVerified  DeviceState = "verified"
	DeviceMismatch  DeviceState = "mismatch" // it holds something else: data comes through the host
	DeviceFailing   DeviceState = "failing"  // reading it failed: data comes through the host
)

// DeviceStatus is the device's verification state.
type DeviceStatus struct {
	Path    string      `json:"path"`
	State   DeviceState `json:"state"`
	Detail  string      `json:"detail,omitempty"`
	Checked time.Time   `json:"checked"`
}

// ErrWrongDevice: the device does not hold the export's filesystem.
var ErrWrongDevice = errors.New("the device does not hold the export's filesystem")

// ErrNeedsDevice: the host serves no file data, and no device was given
// (ClientConfig.Device) to read it from.
var ErrNeedsDevice = errors.New("the host does not serve file data, and no device was given to read it from")

// A DeviceError is a shared device (ClientConfig.Device) that cannot be
// used, and why.
type DeviceError struct {
	Path string
	Err  error
}

func (e *DeviceError) Error() string { return "device " + e.Path + ": " + e.Err.Error() }
func (e *DeviceError) Unwrap() error { return e.Err }

// openDevice opens the device and reads its first block with O_DIRECT:
// a device that cannot be read past the page cache is no use (the
// guest's own cache of it would go stale as the host writes).
func openDevice(path string) (*directio.File, error) {
	d, err := directio.Open(path)
	if err != nil {
		return nil, &DeviceError{path, fmt.Errorf("%w (the device is read with O_DIRECT, past this machine's page cache)", err)}
	}
	buf := directio.AlignedBuf(directio.Align)
	if _, err := d.ReadAt(buf, 0); err != nil {
		d.Close()
		if errors.Is(err, io.EOF) {
			return nil, &DeviceError{path, errors.New("empty: it is not the export's disk")}
		}
		return nil, &DeviceError{path, fmt.Errorf("reading with O_DIRECT: %w", err)}
	}
	return d, nil
}

// deviceOK reports whether file data may be read from the device.
func (c *Client) deviceOK() bool { return c.dev != nil && c.devData.Load() }

// verifyDevice checks the device against generation gv's reader f and
// records the outcome; an error means the device must not be used.
func (c *Client) verifyDevice(gv *genView, f *ext4ro.FS) error {
	state, detail := c.checkDevice(gv, f)
	// What reads go by first (no lock on the read path), then status.
	c.devMeta.Store(state == DeviceVerified)
	c.devData.Store(state == DeviceVerified || state == DeviceUnchecked)
	c.mu.Lock()
	c.device = DeviceStatus{Path: c.cfg.Device, State: state, Detail: detail, Checked: time.Now()}
	c.mu.Unlock()
	if state != DeviceVerified {
		return &DeviceError{c.cfg.Device, fmt.Errorf("%w: export %s at %v: %s", ErrWrongDevice, c.cfg.Export, c.cfg.Addr, detail)}
	}
	c.log.Info("device verified", "device", c.cfg.Device, "detail", detail)
	return nil
}

// reverifyDevice checks the device again after a reconnect, against the
// generation the host welcomed us with.
func (c *Client) reverifyDevice(w *vsockproto.Welcome) {
	gv := &genView{c: c, gen: w.Generation, bs: int64(w.BlockSize)}
	f, err := c.open(gv)
	if err == nil {
		err = c.verifyDevice(gv, f)
	}
	if err != nil {
		c.log.Error("the device does not verify after a reconnect; reading file data through the host until it does", "error", err)
		c.noteError(err)
		return
	}
}

// checkDevice compares the device with generation view f.
func (c *Client) checkDevice(gv *genView, f *ext4ro.FS) (DeviceState, string) {
	if gv == nil {
		return DeviceFailing, "no view of the generation to compare with"
	}
	want := f.Superblock()
	dev, err := ext4ro.Open(c.dev, &ext4ro.Options{AllowDirtyJournal: true, CacheBytes: 1 << 18, ReadAhead: 1})
	if err != nil {
		if errors.Is(err, ext4ro.ErrCorrupt) || errors.Is(err, ext4ro.ErrUnsupported) {
			return DeviceMismatch, fmt.Sprintf("it does not hold an ext4 filesystem the reader accepts: %v", err)
		}
		return DeviceFailing, fmt.Sprintf("reading its superblock: %v", err)
	}
	got := dev.Superblock()
	if got.UUID != want.UUID || got.BlockSize != want.BlockSize || got.BlocksCount != want.BlocksCount || got.InodesCount != want.InodesCount {
		return DeviceMismatch, fmt.Sprintf("it holds filesystem %s (%d blocks of %d bytes, %d inodes); the export is %s (%d blocks of %d bytes, %d inodes)",
			fmtUUID(got.UUID), got.BlocksCount, got.BlockSize, got.InodesCount,
			fmtUUID(want.UUID), want.BlocksCount, want.BlockSize, want.InodesCount)
	}
	blocks := sampleBlocks(f, 16)
	bs := int64(want.BlockSize)
	buf := directio.AlignedBuf(int(max(bs, directio.Align)))[:bs]
	same := 0
	for _, n := range blocks {
		hostCopy, err := gv.ReadBlock(n, 1)
		if err != nil {
			return DeviceFailing, fmt.Sprintf("fetching block %d of generation %d from the host: %v", n, gv.gen, err)
		}
		if _, err := c.dev.ReadAt(buf, int64(n)*bs); err != nil {
			return DeviceFailing, fmt.Sprintf("reading block %d: %v", n, err)
		}
		if bytes.Equal(buf, hostCopy) {
			same++
		}
	}
	detail := fmt.Sprintf("filesystem %s; %d of %d sampled metadata blocks of generation %d match", fmtUUID(want.UUID), same, len(blocks), gv.gen)
	if len(blocks) == 0 || 2*same >= len(blocks) {
		return DeviceVerified, detail
	}
	// Most differ. The live disk does when the host wrote much since
	// the generation (a reconnect to a host that has not published
	// since): its superblock, written at every freeze and thaw, then
	// counts more writes than the generation's, which a copy of the
	// filesystem made before the generation cannot.
	if got.KbytesWritten > want.KbytesWritten {
		return DeviceVerified, fmt.Sprintf("%s; the device was written since (%d KiB written over its life, %d at the generation)",
			detail, got.KbytesWritten, want.KbytesWritten)
	}
	return DeviceMismatch, fmt.Sprintf("%s, and its superblock counts no writes since (%d KiB written over its life, %d at the generation): a different copy of the filesystem",
		detail, got.KbytesWritten, want.KbytesWritten)
}

// sampleBlocks picks up to n inode-table blocks in use, spread over the
// filesystem's groups and over each table.
func sampleBlocks(f *ext4ro.FS, n int) []uint64 {
	var all []uint64
	sb := f.Superblock()
	groups := sb.GroupCount()
	for g := range groups {
		start, used, err := f.InodeTable(g)
		if err != nil || used == 0 {
			continue
		}
		for _, i := range []uint64{0, used / 2, used - 1} {
			if len(all) == 0 || all[len(all)-1] != start+i {
				all = append(all, start+i)
			}
		}
	}
	if len(all) <= n {
		return all
	}
	out := make([]uint64, n)
	for i := range out {
		out[i] = all[i*len(all)/n]
	}
	return out
}

func fmtUUID(u [16]byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}
