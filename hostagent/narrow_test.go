package hostagent

import (
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/internal/directio"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
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
		e.pl.needFull = true
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

// At scale, with a writer running through every publish: each generation,
// narrowed or full, is block for block what a capture from scratch reads
// in the same freeze, and every block holds the device's bytes then.
func TestCapturesEqualScratchAtScale(t *testing.T) {
	const dirs, per = 120, 1000 // 120,000 files
	x := newExport(t, 2048, "-N", "140000")
	names := make([]string, 0, dirs*per)
	for d := range dirs {
		dir := filepath.Join(x.mnt, fmt.Sprintf("d%03d", d))
		os.Mkdir(dir, 0o755)
		for i := range per {
			p := filepath.Join(dir, fmt.Sprintf("f%d", i))
			if err := os.WriteFile(p, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			names = append(names, p)
		}
	}
	varied := filepath.Join(x.mnt, "varied")
	imgtest.Populate(t, varied, imgtest.TreeSpec{Seed: 12, BlockSize: 4096, ManyEntries: 300, NoSpecial: true})
	e := x.openWith(t, ExportConfig{Watch: true, FullScanEvery: -1, FreezeBudget: 5 * time.Minute})

	// The oracle: in the freeze, after the publish's own scan, a first
	// capture into a store of its own, and the device's bytes.
	oracle := &struct {
		blocks map[uint64]Hash
		store  *Store
	}{}
	e.pl.onFrozen = func() {
		s, err := NewStore(t.TempDir())
		if err != nil {
			t.Error(err)
			return
		}
		d, err := capture(scan{dev: e.dev, tables: e.cached, store: s})
		if err != nil {
			t.Error(err)
			return
		}
		g, err := d.generation()
		if err != nil {
			t.Error(err)
			return
		}
		oracle.blocks, oracle.store = g.blocks, s
		buf := directio.AlignedBuf(g.BlockSize)
		for b, h := range g.blocks {
			if _, err := e.dev.ReadAt(buf, int64(b)*int64(g.BlockSize)); err != nil {
				t.Error(err)
				return
			}
			if Hash(sha256.Sum256(buf)) != h {
				t.Errorf("the scratch capture's block %d is not the device's", b)
			}
		}
	}
	check := func(what string, g *Generation) {
		t.Helper()
		if t.Failed() {
			t.FailNow()
		}
		defer oracle.store.Close()
		if len(g.blocks) != len(oracle.blocks) {
			t.Fatalf("%s: %d blocks, a capture from scratch %d", what, len(g.blocks), len(oracle.blocks))
		}
		for b, h := range oracle.blocks {
			if gh, ok := g.blocks[b]; !ok || gh != h {
				t.Fatalf("%s: block %d: has it %v, same bytes %v", what, b, ok, gh == h)
			}
		}
	}
	g, err := e.Publish()
	if err != nil {
		t.Fatal(err)
	}
	check("first publish", g)
	if len(g.blocks) < 7500 {
		t.Fatalf("only %d metadata blocks: not the size this test is about", len(g.blocks))
	}

	r := rand.New(rand.NewPCG(7, 8))
	for round := range 6 {
		// Changes made before the publish, and a writer that keeps on
		// through it: before the freeze, blocked in it, after it.
		for range 300 {
			p := names[r.IntN(len(names))]
			switch r.IntN(4) {
			case 0:
				os.Remove(p)
			case 1:
				os.WriteFile(p+"-new", make([]byte, r.IntN(20000)), 0o644)
			default:
				os.WriteFile(p, make([]byte, r.IntN(20000)), 0o644)
			}
		}
		mutate(t, r, varied, 20)
		if round == 2 { // a directory renamed: its names all move
			os.Rename(filepath.Join(x.mnt, "d007"), filepath.Join(x.mnt, "d007-moved"))
		}
		full := round%2 == 1
		e.pl.needFull = full
		stop, done := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(done)
			wr := rand.New(rand.NewPCG(uint64(round), 9))
			testenv.Until(stop, func(i int) bool {
				p := names[wr.IntN(len(names))]
				os.WriteFile(p, []byte(strconv.Itoa(i)), 0o644)
				os.WriteFile(filepath.Join(x.mnt, fmt.Sprintf("d%03d", wr.IntN(dirs)), fmt.Sprintf("w%d-%d", round, i)), nil, 0o644)
				return true
			})
		}()
		g, err := e.Publish()
		close(stop)
		<-done
		if err != nil {
			t.Fatal(err)
		}
		if g.Full != full && round != 2 {
			t.Fatalf("round %d: full scan %v, want %v", round, g.Full, full)
		}
		check(fmt.Sprintf("round %d (full %v)", round, g.Full), g)
		t.Logf("round %d: full %v, %d blocks, %d inodes changed; freeze %v: %+v", round, g.Full, len(g.blocks), len(g.ChangedInodes), g.Frozen, g.Phases)
		e.Drop(g.Number - 1)
	}
}
