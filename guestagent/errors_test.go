package guestagent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
	"github.com/leasefs/leasefs/vsockproto"
)

// Every answer the host can give reaches applications as a definite
// errno, and a new protocol code cannot be added without deciding which.
func TestErrnoOfEveryProtocolCode(t *testing.T) {
	want := map[vsockproto.Code]syscall.Errno{
		vsockproto.CodeProtocol:     syscall.EIO,
		vsockproto.CodeNotSupported: syscall.EIO,
		vsockproto.CodeInvalid:      syscall.ESTALE, // e.g. a layout the host's copy disagrees with
		vsockproto.CodeVersion:      syscall.EIO,
		vsockproto.CodeNoExport:     syscall.EIO,
		vsockproto.CodeStale:        syscall.ESTALE,
		vsockproto.CodeBusy:         syscall.EBUSY,
		vsockproto.CodeNotFound:     syscall.ESTALE,
		vsockproto.CodeQuota:        syscall.EMFILE,
		vsockproto.CodeBadLease:     syscall.ESTALE,
		vsockproto.CodeRevoked:      syscall.ESTALE,
		vsockproto.CodeTooBig:       syscall.EIO,
		vsockproto.CodeInternal:     syscall.EIO,
		vsockproto.CodeGone:         syscall.ESTALE,
		vsockproto.CodeNotRegular:   syscall.ESTALE,
		vsockproto.CodeRetry:        syscall.EAGAIN,
	}
	for code := vsockproto.Code(1); ; code++ {
		if strings.HasPrefix(code.String(), "code(") {
			if len(want) != int(code)-1 {
				t.Fatalf("the protocol has %d codes, the test knows %d", code-1, len(want))
			}
			break
		}
		if _, ok := protoErrnos[code]; !ok {
			t.Errorf("code %v has no errno", code)
		}
		// As a call returns it: wrapped.
		err := fmt.Errorf("generation 3: %w", vsockproto.Errorf(code, "something"))
		if got, _ := errnoOf(err); got != want[code] {
			t.Errorf("%v: %v, want %v", code, got, want[code])
		}
	}
	for _, c := range []struct {
		err  error
		want syscall.Errno
	}{
		{fmt.Errorf("%w: unix:/run/x", errNotConnected), syscall.EIO},
		{vsockproto.ErrClosed, syscall.EIO},
		{fmt.Errorf("x: %w", ErrStale), syscall.ESTALE},
		{fmt.Errorf("x: %w", ext4ro.ErrNotExist), syscall.ENOENT},
		{fmt.Errorf("x: %w", ext4ro.ErrCorrupt), syscall.EUCLEAN},
	} {
		if got, _ := errnoOf(c.err); got != c.want {
			t.Errorf("%v: %v, want %v", c.err, got, c.want)
		}
	}
}

// panicFiles panics on every open.
type panicFiles struct{}

func (panicFiles) Open(<-chan struct{}, *ext4ro.FS, *ext4ro.Inode, bool) (OpenFile, error) {
	panic("a bug")
}

// A panic in a request handler answers that request with EIO and a log
// line; the mount goes on serving.
func TestPanicInAHandlerIsEIO(t *testing.T) {
	testenv.RequireFUSE(t)
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "f"), []byte("x"), 0o644)
	img := imgtest.Mkfs(t, "ext4", src, 16, "-O", "extent,metadata_csum,64bit")
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	view, err := ext4ro.Open(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	var log testenv.SyncBuffer
	fsys := NewFileSystem(view, Config{Timeout: time.Hour, Files: panicFiles{}, Logger: hclog.New(&hclog.LoggerOptions{Output: &log})})
	dir := t.TempDir()
	srv, err := Mount(fsys, dir, MountConfig{FsName: img})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Unmount() })
	if _, err := os.ReadFile(filepath.Join(dir, "f")); !errors.Is(err, syscall.EIO) {
		t.Fatalf("open: %v, want EIO", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "f")); err != nil {
		t.Fatalf("the mount after the panic: %v", err)
	}
	if !strings.Contains(log.String(), "panicked") || !strings.Contains(log.String(), "a bug") {
		t.Fatalf("no log line for the panic:\n%s", log.String())
	}
}
