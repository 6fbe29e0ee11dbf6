package guestagent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/hosttest"
	"github.com/leasefs/leasefs/internal/imgtest"
)

// A device that is not the export's disk is refused at connect, with an
// error that names it and the export: another filesystem, a copy of this
// one that has fallen behind, an empty file.
func TestWrongDeviceIsRefused(t *testing.T) {
	h := startHost(t, 3*time.Second)
	h.Write(t, "f", "the real bytes")
	h.Publish(t)

	other := imgtest.Mkfs(t, "ext4", "", 128, "-b", "4096", "-O", "has_journal,extent,flex_bg,metadata_csum,64bit")
	empty := filepath.Join(t.TempDir(), "empty.img")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// A copy of the disk taken now, then the export changes every inode.
	stale := filepath.Join(t.TempDir(), "stale.img")
	copyFile(t, h.Img, stale)
	for i := range 300 {
		h.Write(t, fmt.Sprintf("later-%d", i), "x")
	}
	filepath.WalkDir(h.Mnt, func(p string, d os.DirEntry, err error) error {
		if err == nil {
			os.Chmod(p, 0o751)
		}
		return nil
	})
	h.Publish(t)

	for _, c := range []struct{ name, device, want string }{
		{"another filesystem", other, "it holds filesystem"},
		{"a stale copy", stale, "a different copy of the filesystem"},
		{"an empty file", empty, "empty"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := NewClient(context.Background(), ClientConfig{Addr: h.Addr, Export: "test", Device: c.device})
			if err == nil {
				t.Fatalf("a guest with %s as its device connected", c.name)
			}
			if !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), c.device) {
				t.Fatalf("error %q does not say %q and name the device", err, c.want)
			}
			if c.name != "an empty file" && (!errors.Is(err, ErrWrongDevice) || !strings.Contains(err.Error(), "export test")) {
				t.Fatalf("error %q is not ErrWrongDevice naming the export", err)
			}
		})
	}
	g := startGuest(t, h, h.Img)
	if st := g.c.Status().Device; st == nil || st.State != DeviceVerified {
		t.Fatalf("the right device: %+v", st)
	}
	if got := g.read(t, "f"); got != "the real bytes" {
		t.Fatalf("read %q", got)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.Create(to)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
}

// The host agent comes back serving another disk under the export's
// name: the guest moves to its generation, finds that its device does not
// hold it, and reads file data through the host (the right bytes) until
// the agent serves the device's filesystem again.
func TestDeviceMismatchAfterReconnect(t *testing.T) {
	a := startHost(t, 3*time.Second)
	a.Write(t, "f", "from disk A")
	a.Publish(t)
	g := startGuest(t, a, a.Img)
	if got := g.read(t, "f"); got != "from disk A" {
		t.Fatalf("read %q", got)
	}
	a.Shutdown()

	b := &host{Addr: a.Addr}
	b = hosttest.StartInProcess(t, b)
	b.Write(t, "f", "from disk B, longer")
	b.Shutdown()
	b.Serve(t, true)
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := g.c.Status()
		if st.Device != nil && st.Device.State == DeviceMismatch && st.Connected {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the device was not found to mismatch: %+v", st.Device)
		}
		time.Sleep(20 * time.Millisecond)
	}
	g.waitFor(t, 1) // moved to B's generation, whatever its number
	read := func(want string) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			b, err := os.ReadFile(filepath.Join(g.dir, "f"))
			if err == nil && string(b) == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("read %q, %v; want %q", b, err, want)
			}
		}
	}
	read("from disk B, longer")
	if st := g.c.Status(); !strings.Contains(st.LastError, "does not hold the export") {
		t.Fatalf("last error %q", st.LastError)
	}

	b.Shutdown()
	a.Serve(t, true)
	for deadline := time.Now().Add(10 * time.Second); g.c.Status().Device.State != DeviceVerified; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the device did not verify again: %+v", g.c.Status().Device)
		}
	}
	read("from disk A")
}
