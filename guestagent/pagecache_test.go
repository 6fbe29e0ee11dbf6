package guestagent

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/layout"
)

// With --page-cache=guest a file read twice is read from the device once
// (the second read is the guest kernel's page cache), past the host's
// cache of the device (O_DIRECT). With --page-cache=host the guest caches
// nothing: every read reaches the device, which on an image file is read
// through its page cache — the host's, one copy for every guest.
func TestPageCacheModes(t *testing.T) {
	h := startHost(t, 3e9)
	data := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	if err := os.WriteFile(filepath.Join(h.Mnt, "f"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	h.Publish(t)
	// Where the file's bytes are in the image.
	hf, err := os.Open(filepath.Join(h.Mnt, "f"))
	if err != nil {
		t.Fatal(err)
	}
	runs, err := layout.Fiemap(int(hf.Fd()), 4096)
	hf.Close()
	if err != nil || len(runs) == 0 {
		t.Fatalf("fiemap: %v %v", runs, err)
	}
	img, err := os.Open(h.Img)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	resident := func() int { // the image's pages of the file in the page cache
		off, n := int64(runs[0].Physical*4096), int(runs[0].Count*4096)
		m, err := unix.Mmap(int(img.Fd()), off, n, unix.PROT_READ, unix.MAP_SHARED)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Munmap(m)
		vec := make([]byte, n/4096)
		if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(n), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
			t.Fatal(e)
		}
		in := 0
		for _, v := range vec {
			in += int(v & 1)
		}
		return in
	}
	for _, mode := range []PageCache{PageCacheGuest, PageCacheHost} {
		t.Run(string(mode), func(t *testing.T) {
			unix.Fadvise(int(img.Fd()), 0, 0, unix.FADV_DONTNEED)
			g := startGuestWith(t, h, ClientConfig{Device: h.Img, PageCache: mode})
			for range 2 {
				if got := g.read(t, "f"); got != string(data) {
					t.Fatal("read other bytes")
				}
			}
			fromDevice := counterValue(g.c.m.data.WithLabelValues("device"))
			pages := resident()
			t.Logf("%s: %.0f bytes read from the device for two reads of %d; %d of the file's %d pages in the image's page cache",
				mode, fromDevice, len(data), pages, runs[0].Count)
			switch mode {
			case PageCacheGuest:
				if fromDevice != float64(len(data)) || pages != 0 {
					t.Fatal("the guest's page cache did not serve the second read, or the device was read through the host's cache")
				}
			case PageCacheHost:
				if fromDevice != 2*float64(len(data)) || pages == 0 {
					t.Fatal("the guest cached data, or the device was not read through the host's cache")
				}
			}
		})
	}
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return -1
	}
	return m.GetCounter().GetValue()
}
