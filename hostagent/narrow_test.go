package hostagent

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/imgtest"
)

// mutate makes n random changes of every kind a writer makes, below dir.
func mutate(t *testing.T, r *rand.Rand, dir string, n int) {
	t.Helper()
	pick := func(wantDir bool) string {
		var all []string
		filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
			if err == nil && p != dir && fi.IsDir() == wantDir && fi.Mode()&os.ModeSymlink == 0 && filepath.Base(p) != "lost+found" {
				all = append(all, p)
			}
			return nil
		})
		if len(all) == 0 {
			return ""
		}
		return all[r.IntN(len(all))]
	}
	someDir := func() string {
		if d := pick(true); d != "" && r.IntN(3) > 0 {
			return d
		}
		return dir
	}
	for i := range n {
		name := fmt.Sprintf("m%d-%d", r.Uint32(), i)
		f := pick(false)
		switch op := r.IntN(12); {
		case op == 0 || f == "":
			os.WriteFile(filepath.Join(someDir(), name), make([]byte, r.IntN(100000)), 0o644)
		case op == 1:
			fh, err := os.OpenFile(f, os.O_APPEND|os.O_WRONLY, 0)
			if err == nil {
				fh.Write(make([]byte, r.IntN(300000)))
				fh.Close()
			}
		case op == 2:
			fh, err := os.OpenFile(f, os.O_WRONLY, 0)
			if err == nil {
				fh.WriteAt([]byte("in place"), int64(r.IntN(1000)))
				fh.Close()
			}
		case op == 3:
			os.Truncate(f, int64(r.IntN(5000)))
		case op == 4:
			os.Remove(f)
		case op == 5:
			os.Rename(f, filepath.Join(someDir(), name))
		case op == 6:
			os.Mkdir(filepath.Join(someDir(), name), 0o755)
		case op == 7:
			if d := pick(true); d != "" {
				os.Remove(d) // only if empty
			}
		case op == 8:
			os.Link(f, filepath.Join(someDir(), name))
		case op == 9:
			os.Symlink(f, filepath.Join(someDir(), name))
		case op == 10:
			os.Chmod(f, os.FileMode(0o600+r.IntN(0o177)))
		default:
			unix.Setxattr(f, "user.k", make([]byte, r.IntN(3000)), 0)
		}
	}
}

// A narrowed publish (inotify names the inodes to read again) captures
// exactly what a full scan of the same frozen state captures.
func TestNarrowedScanEqualsFullScan(t *testing.T) {
	x := newExport(t, 256)
	imgtest.Populate(t, x.mnt, imgtest.TreeSpec{Seed: 11, BlockSize: 4096, ManyEntries: 500})
	e := x.openWith(t, ExportConfig{Watch: true, FullScanEvery: -1})
	if _, err := e.Publish(); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(5, 6))
	sb := uint64(0) // the superblock: 1024 bytes in, block 0 of 4096
	for round := range 8 {
		mutate(t, r, x.mnt, 60)
		narrow, err := e.Publish()
		if err != nil {
			t.Fatal(err)
		}
		if narrow.Full {
			t.Fatalf("round %d: the publish was a full scan", round)
		}
		e.needFull = true
		full, err := e.Publish()
		if err != nil {
			t.Fatal(err)
		}
		for b, h := range full.blocks {
			if b == sb {
				continue // the second freeze rewrote the superblock
			}
			if nh, ok := narrow.blocks[b]; !ok || nh != h {
				t.Fatalf("round %d: block %d: narrowed scan has it %v, equal %v", round, b, ok, nh == h)
			}
		}
		if len(full.blocks) != len(narrow.blocks) {
			t.Fatalf("round %d: full scan %d blocks, narrowed %d", round, len(full.blocks), len(narrow.blocks))
		}
		t.Logf("round %d: %d blocks, %d inodes changed; narrowed: freeze %v, scan %v; full: freeze %v, scan %v",
			round, len(full.blocks), len(narrow.ChangedInodes), narrow.Frozen, narrow.Scan, full.Frozen, full.Scan)
	}
}
