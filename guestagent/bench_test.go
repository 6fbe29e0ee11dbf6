package guestagent

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/internal/imgtest"
)

// BenchmarkPublishToVisible measures how long after a publish returns
// (the thaw is its last step) a new file is visible in a guest's mount:
// the announcement, the guest's switch and its invalidations. It reports
// the p50 and worst in ms.
func BenchmarkPublishToVisible(b *testing.B) {
	h := startHost(b, 5*time.Second)
	h.Write(b, "seed", "x")
	if _, err := h.Srv.Publish("test"); err != nil {
		b.Fatal(err)
	}
	g := startGuest(b, h, h.Img)
	var lat []time.Duration
	for i := range b.N {
		name := fmt.Sprint("new", i)
		os.WriteFile(filepath.Join(h.Mnt, name), []byte("v"), 0o644)
		if _, err := os.Stat(filepath.Join(g.dir, name)); err == nil {
			b.Fatal("visible before the publish")
		}
		if _, err := h.Srv.Publish("test"); err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		for {
			if _, err := os.Stat(filepath.Join(g.dir, name)); err == nil {
				break
			}
			if time.Since(start) > 10*time.Second {
				b.Fatal("not visible after 10 s")
			}
			time.Sleep(50 * time.Microsecond)
		}
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1e3, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1e3, "max-ms")
}

// BenchmarkWalk walks a tree (readdir and lstat of every entry) through
// a guest mount of a generation and through an image mount of the same
// filesystem, each time from a fresh mount (no metadata cached).
func BenchmarkWalk(b *testing.B) {
	h := startHost(b, 5*time.Second)
	imgtest.Populate(b, h.Mnt, imgtest.TreeSpec{Seed: 7, BlockSize: 4096, ManyEntries: 20000})
	if _, err := h.Srv.Publish("test"); err != nil {
		b.Fatal(err)
	}
	walk := func(b *testing.B, dir string) int {
		n := 0
		err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if _, err := os.Lstat(p); err != nil {
				return err
			}
			n++
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		return n
	}
	b.Run("guest", func(b *testing.B) {
		for range b.N {
			b.StopTimer()
			g := startGuest(b, h, h.Img)
			b.StartTimer()
			walk(b, g.dir)
			b.StopTimer()
			g.stop()
			b.StartTimer()
		}
	})
	b.Run("image", func(b *testing.B) {
		for range b.N {
			b.StopTimer()
			f, err := os.Open(h.Img)
			if err != nil {
				b.Fatal(err)
			}
			// The export is mounted, so its journal is marked in use; after a
			// publish the metadata on disk is complete all the same.
			v, err := ext4ro.Open(f, &ext4ro.Options{AllowDirtyJournal: true})
			if err != nil {
				b.Fatal(err)
			}
			dir := b.TempDir()
			srv, err := Mount(NewFileSystem(v, Config{Timeout: time.Hour, NoOpen: true}), dir, MountConfig{FsName: "image"})
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			walk(b, dir)
			b.StopTimer()
			srv.Unmount()
			f.Close()
			b.StartTimer()
		}
	})
}

// BenchmarkReadPath measures what an application's open and read cost
// through a guest with the device: "open" opens, reads and closes small
// files in turn (the kernel keeps their pages; each open is a FUSE
// OPEN, answered from a lease kept idle after the first); "read" reads
// 64 KiB at a time from one file opened for direct I/O (--page-cache
// host), every read a FUSE READ served from the device.
func BenchmarkReadPath(b *testing.B) {
	h := startHost(b, 5*time.Second)
	const files = 1000
	for i := range files {
		h.Write(b, fmt.Sprint("small", i), strings.Repeat("x", 16<<10))
	}
	h.Write(b, "big", strings.Repeat("0123456789abcdef", 8<<20/16))
	h.Publish(b)
	buf := make([]byte, 64<<10)
	b.Run("open", func(b *testing.B) {
		g := startGuest(b, h, h.Img)
		b.ResetTimer()
		for i := range b.N {
			f, err := os.Open(filepath.Join(g.dir, fmt.Sprint("small", i%files)))
			if err != nil {
				b.Fatal(err)
			}
			if _, err := f.Read(buf); err != nil {
				b.Fatal(err)
			}
			f.Close()
		}
	})
	b.Run("read", func(b *testing.B) {
		g := startGuestWith(b, h, ClientConfig{Device: h.Img, PageCache: PageCacheHost})
		f, err := os.Open(filepath.Join(g.dir, "big"))
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		b.SetBytes(int64(len(buf)))
		b.ResetTimer()
		for i := range b.N {
			if _, err := f.ReadAt(buf, int64(i%(8<<20/len(buf)))*int64(len(buf))); err != nil {
				b.Fatal(err)
			}
		}
	})
}
