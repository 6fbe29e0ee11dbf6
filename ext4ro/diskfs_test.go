package ext4ro

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path"
	"path/filepath"
	"testing"

	diskfs "github.com/diskfs/go-diskfs"
	"github.com/diskfs/go-diskfs/disk"
	"github.com/diskfs/go-diskfs/filesystem"

	"github.com/leasefs/leasefs/internal/imgtest"
)

// go-diskfs is an independent ext4 implementation: images it writes must
// read back through ext4ro, and where it can read an mkfs image, it must
// see what ext4ro sees. (It cannot read everything — see DESIGN.md — so
// the kernel stays the oracle; this is a second opinion.)

func TestReadsGoDiskfsImage(t *testing.T) {
	img := filepath.Join(t.TempDir(), "diskfs.img")
	d, err := diskfs.Create(img, 64<<20, diskfs.SectorSizeDefault)
	if err != nil {
		t.Fatal(err)
	}
	gfs, err := d.CreateFilesystem(disk.FilesystemSpec{Partition: 0, FSType: filesystem.TypeExt4, VolumeLabel: "leasefs"})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(4, 5))
	want := map[string][]byte{}
	for _, dir := range []string{"a", "a/b", "c"} {
		if err := gfs.Mkdir(dir); err != nil {
			t.Fatal(err)
		}
	}
	for i, size := range []int{0, 1, 100, 1024, 4096, 4097, 70000, 1 << 20} {
		name := fmt.Sprintf("%s/f%d", []string{"a", "a/b", "c"}[i%3], size)
		data := make([]byte, size)
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		f, err := gfs.OpenFile(name, os.O_CREATE|os.O_RDWR)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Write(data); err != nil {
			t.Fatal(err)
		}
		f.Close()
		want[name] = data
	}
	if err := gfs.Symlink("/a/f1", "link"); err != nil {
		t.Fatal(err)
	}
	d.Close()

	f := openImage(t, img, nil)
	if got := f.Superblock().VolumeName; got != "leasefs" {
		t.Errorf("volume name %q", got)
	}
	for name, data := range want {
		in := resolve(t, f, name)
		got := make([]byte, len(data)+1)
		n, err := f.ReadAt(in, got, 0)
		if n != len(data) || err != io.EOF || !bytes.Equal(got[:n], data) {
			t.Errorf("%s: %d bytes, %v; want the %d written", name, n, err, len(data))
		}
	}
	if tgt, err := f.Readlink(resolve(t, f, "link")); err != nil || string(tgt) != "/a/f1" {
		t.Errorf("symlink: %q, %v", tgt, err)
	}
}

func TestGoDiskfsAgrees(t *testing.T) {
	imgtest.RequireTools(t, "mkfs.ext4")
	// A plain tree: go-diskfs 1.9.4 panics on names of 248 bytes or more
	// (it adds the name length in 8 bits) and on directories of several
	// blocks with checksum tails.
	src := t.TempDir()
	if err := os.Mkdir(filepath.Join(src, "many"), 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range 60 {
		if err := os.WriteFile(filepath.Join(src, "many", fmt.Sprintf("entry-%d", i)), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	rng := rand.New(rand.NewPCG(6, 7))
	for i, size := range []int{0, 1, 60, 4095, 4096, 4097, 123457, 3 << 20} {
		dir := filepath.Join(src, "sizes", fmt.Sprint(i%3), "nested")
		data := make([]byte, size)
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprint("f", size)), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	img := imgtest.Mkfs(t, "ext4", src, 64, "-b", "4096", "-I", "256", "-O", "extent,metadata_csum,64bit,flex_bg,^has_journal")
	d, err := diskfs.Open(img, diskfs.WithOpenMode(diskfs.ReadOnly))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	gfs, err := d.GetFilesystem(0)
	if err != nil {
		t.Fatal(err)
	}
	f := openImage(t, img, nil)
	compared := 0
	var walk func(dir string)
	walk = func(dir string) {
		ents, err := gfs.ReadDir(dir)
		if err != nil {
			t.Fatalf("go-diskfs: %s: %v", dir, err)
		}
		in := resolve(t, f, dir)
		var ours []string
		for _, e := range listDir(t, f, in) {
			if e.Name != "." && e.Name != ".." {
				ours = append(ours, e.Name)
			}
		}
		var theirs []string
		for _, e := range ents {
			theirs = append(theirs, e.Name())
		}
		if fmt.Sprint(sortedCopy(ours)) != fmt.Sprint(sortedCopy(theirs)) {
			t.Errorf("%s: ext4ro lists %q, go-diskfs %q", dir, ours, theirs)
			return
		}
		for _, e := range ents {
			p := path.Join(dir, e.Name()) // io/fs paths: no leading slash
			compared++
			switch {
			case e.IsDir():
				walk(p)
			case e.Type().IsRegular():
				theirs, err := gfs.ReadFile(p)
				if err != nil {
					t.Fatalf("go-diskfs: %s: %v", p, err)
				}
				in := resolve(t, f, p)
				ours := make([]byte, in.Size)
				if _, err := f.ReadAt(in, ours, 0); err != nil && err != io.EOF {
					t.Fatal(err)
				}
				if !bytes.Equal(ours, theirs) {
					t.Errorf("%s: contents differ", p)
				}
			}
		}
	}
	walk(".")
	if compared < 70 {
		t.Fatalf("only %d entries compared", compared)
	}
}
