package guestagent

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// TestOpenModes: with per-open handles (as the guest agent uses) and
// without (NoOpen, as image mounts use), files read and directories list
// the same, and a closed handle is gone from the table.
func TestOpenModes(t *testing.T) {
	testenv.RequireFUSE(t)
	imgtest.RequireTools(t, "mkfs.ext4")
	src := t.TempDir()
	want := bytes.Repeat([]byte("0123456789abcdef"), 40000)
	if err := os.WriteFile(filepath.Join(src, "data"), want, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(src, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range 300 {
		if err := os.WriteFile(filepath.Join(src, "dir", fmt.Sprint("n", i)), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	img := imgtest.Mkfs(t, "ext4", src, 32, "-O", "extent,metadata_csum,64bit")
	for _, noOpen := range []bool{false, true} {
		t.Run(fmt.Sprintf("NoOpen=%v", noOpen), func(t *testing.T) {
			f, err := os.Open(img)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			view, err := ext4ro.Open(f, nil)
			if err != nil {
				t.Fatal(err)
			}
			fsys := NewFileSystem(view, Config{Timeout: time.Hour, NoOpen: noOpen})
			dir := t.TempDir()
			srv, err := Mount(fsys, dir, MountConfig{FsName: img})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := srv.Unmount(); err != nil {
					t.Errorf("unmount: %v", err)
				}
			})
			got, err := os.ReadFile(filepath.Join(dir, "data"))
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("read %d bytes, %v; want the %d written", len(got), err, len(want))
			}
			ents, err := os.ReadDir(filepath.Join(dir, "dir"))
			if err != nil || len(ents) != 300 {
				t.Fatalf("listed %d entries, %v; want 300", len(ents), err)
			}
			// Release is asynchronous in the kernel: wait for the table to
			// empty (it never fills in NoOpen mode).
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				fsys.mu.Lock()
				n, opened := len(fsys.handles), fsys.nextFh
				fsys.mu.Unlock()
				if noOpen && opened != 0 {
					t.Fatalf("%d handles made in NoOpen mode", opened)
				}
				if !noOpen && opened == 0 {
					t.Fatal("no handles made: the open path did not run")
				}
				if n == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%d handles still open after every file was closed", n)
				}
			}
		})
	}
}

// An inode number that comes to name another file (the host freed it and
// reused it) is another node: a name the kernel still caches for the old
// file never reaches the new one, even before any invalidation.
func TestReusedInodeNumberIsAnotherNode(t *testing.T) {
	testenv.RequireFUSE(t)
	imgtest.RequireTools(t, "mkfs.ext4", "debugfs")
	mk := func(name, content string, gen int) *ext4ro.FS {
		src := t.TempDir()
		os.WriteFile(filepath.Join(src, name), []byte(content), 0o644)
		img := imgtest.Mkfs(t, "ext4", src, 32, "-O", "extent,metadata_csum,64bit")
		imgtest.Debugfs(t, img, fmt.Sprintf("sif <12> generation %d", gen))
		f, err := os.Open(img)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		v, err := ext4ro.Open(f, nil)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	before, after := mk("old", "old content", 5), mk("new", "NEW", 7) // both inode 12
	fsys := NewFileSystem(before, Config{Timeout: time.Hour})
	dir := t.TempDir()
	srv, err := Mount(fsys, dir, MountConfig{FsName: "reuse"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Unmount() })
	if b, err := os.ReadFile(filepath.Join(dir, "old")); err != nil || string(b) != "old content" {
		t.Fatalf("before: %q %v", b, err)
	}
	fsys.SetView(after, 2)
	// The kernel drops what it cached of the inode (as an expired
	// attribute timeout or an invalidation would) but keeps the name.
	oldIn, _ := before.Inode(12)
	srv.InodeNotify(NodeID(oldIn), 0, 0)
	b, err := os.ReadFile(filepath.Join(dir, "old"))
	if err == nil && string(b) == "NEW" {
		t.Fatal("a cached name reached the file that reused its inode number")
	}
	if err == nil && string(b) != "old content" {
		t.Fatalf("read %q", b)
	}
}
