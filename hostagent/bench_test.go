package hostagent

import (
	"golang.org/x/sys/unix"

	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
	"github.com/leasefs/leasefs/vsockproto"
)

// BenchmarkPublish measures the freeze of a publish on an export with
// 100,000 files in 100 directories (LEASEFS_BENCH_FILES sets another
// count, in thousands of files per directory times 100): the first
// (every inode read), and after 1,000 files (LEASEFS_BENCH_CHANGED) were
// rewritten, with a full and with a narrowed scan. It reports the freeze
// in ms (the writers' only cost), the scan within it, and the
// generation's size.
func BenchmarkPublish(b *testing.B) {
	testenv.RequireLoop(b)
	dirs, per, changed := 100, 1000, 1000
	if v, err := strconv.Atoi(os.Getenv("LEASEFS_BENCH_FILES")); err == nil && v >= 100 {
		per = v / dirs
	}
	if v, err := strconv.Atoi(os.Getenv("LEASEFS_BENCH_CHANGED")); err == nil && v >= 0 {
		changed = v
	}
	x, wd := benchTree(b, dirs, per, max(2048, dirs*per/64))
	mnt := x.mnt
	open := func(watch, expedite bool) *Export {
		e, err := OpenExport(ExportConfig{Name: "bench", Device: x.dev, Mount: mnt, StateDir: x.state, Watchdog: wd,
			FreezeBudget: time.Minute, Watch: watch, FullScanEvery: -1, ExpediteRCU: expedite})
		if err != nil {
			b.Fatal(err)
		}
		return e
	}
	report := func(b *testing.B, gs []*Generation) {
		var frozen, scanned, resolved, ioctls time.Duration
		for _, g := range gs {
			frozen += g.Frozen
			scanned += g.Scan
			resolved += g.Resolve
			ioctls += g.Ioctls
		}
		per := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1e3 / float64(len(gs)) }
		b.ReportMetric(per(frozen), "freeze-ms")
		b.ReportMetric(per(scanned), "scan-ms")
		b.ReportMetric(per(resolved), "resolve-ms")
		b.ReportMetric(per(ioctls), "ioctl-ms")
		b.ReportMetric(float64(gs[len(gs)-1].Blocks()), "blocks")
	}
	b.Run(fmt.Sprintf("full-%d-inodes", dirs*per), func(b *testing.B) {
		var gs []*Generation
		for range b.N {
			e := open(false, false)
			g, err := e.Publish()
			if err != nil {
				b.Fatal(err)
			}
			gs = append(gs, g)
			e.Close()
		}
		report(b, gs)
	})
	for _, c := range []struct {
		name            string
		watch, expedite bool
	}{{"full-scan", false, false}, {"narrowed", true, false}, {"narrowed-expedited-rcu", true, true}} {
		watch := c.watch
		b.Run(fmt.Sprintf("%d-changed-of-%d/%s", changed, dirs*per, c.name), func(b *testing.B) {
			e := open(watch, c.expedite)
			defer e.Close()
			if _, err := e.Publish(); err != nil {
				b.Fatal(err)
			}
			var gs []*Generation
			for n := range b.N {
				b.StopTimer()
				for i := range changed {
					p := filepath.Join(mnt, "d"+strconv.Itoa(i%dirs), strconv.Itoa((n*changed+i)/dirs%per))
					os.WriteFile(p, []byte(strconv.Itoa(n)), 0o644)
				}
				b.StartTimer()
				g, err := e.Publish()
				if err != nil {
					b.Fatal(err)
				}
				if g.Full == watch {
					b.Fatalf("full scan %v with watch %v", g.Full, watch)
				}
				gs = append(gs, g)
				e.Drop(g.Number - 1)
			}
			report(b, gs)
		})
	}
}

// benchTree is an export of dirs directories of per one-byte files, on
// an image of sizeMB, with its watchdog; both go when b ends.
func benchTree(b *testing.B, dirs, per, sizeMB int) (export, *Watchdog) {
	img := imgtest.Mkfs(b, "ext4", "", sizeMB, "-b", "4096", "-N", strconv.Itoa(dirs*per+20000), "-O", imgtest.Features)
	mnt := imgtest.KernelMount(b, img, "rw")
	for d := range dirs {
		dir := filepath.Join(mnt, "d"+strconv.Itoa(d))
		os.Mkdir(dir, 0o755)
		for i := range per {
			os.WriteFile(filepath.Join(dir, strconv.Itoa(i)), []byte("x"), 0o644)
		}
	}
	x := export{img: img, dev: imgtest.LoopDevice(b, mnt), mnt: mnt, state: b.TempDir()}
	wd, err := StartWatchdog(watchdogCmd(mnt))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { wd.Close() })
	return x, wd
}

// BenchmarkReadMeta is one guest's metadata request and its reply, over a
// Unix socket, as a cold walk makes them one after another: 1 block, and
// the 16 of a directory's inode-table blocks.
func BenchmarkReadMeta(b *testing.B) {
	_, e, g := publishedFile(b)
	_, a := serve(b, e, ServerOptions{})
	c, _, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test"}, nil, vsockproto.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	var blocks []uint64
	for n := uint64(0); n < 1<<20 && len(blocks) < 16; n++ {
		if g.Has(n) {
			blocks = append(blocks, n)
		}
	}
	for _, n := range []int{1, len(blocks)} {
		b.Run(fmt.Sprint(n, " blocks"), func(b *testing.B) {
			req := &vsockproto.ReadMeta{Generation: g.Number, Blocks: vsockproto.Ranges(blocks[:n])}
			for range b.N {
				if _, err := c.Call(context.Background(), req); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkKeep is what keeping generations whole costs a publish: the
// first (every file of the tree taken by handle) and one after the writer
// replaced 1,000 files by rename (those taken, the replaced ones kept
// for the generation before), with and without the keeper, on a tree of
// 10,000 files (this machine allows a process 20,000 descriptors).
// Kernel memory per held file is measured by bench/keep.sh.
func BenchmarkKeep(b *testing.B) {
	testenv.RequireLoop(b)
	// LEASEFS_KEEP_FILES sets the tree's size; by default a quarter of
	// the descriptor limit (the keeper holds at most half, and replacing
	// every file holds two of each). Each publish after the first
	// replaces 1,000 of them, then all of them.
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		b.Fatal(err)
	}
	files := int(min(rl.Cur/4, 100000)) / 1000 * 1000
	if n, err := strconv.Atoi(os.Getenv("LEASEFS_KEEP_FILES")); err == nil && n >= 1000 {
		files = n / 1000 * 1000
	}
	b.Logf("a tree of %d files; the descriptor limit is %d", files, rl.Cur)
	const per = 1000
	dirs := files / per
	x, wd := benchTree(b, dirs, per, 512)
	mnt := x.mnt
	for _, keep := range []int{-1, 0} {
		name := map[int]string{-1: "without", 0: "keeping"}[keep]
		if keep == 0 && uint64(files) > rl.Cur/4 {
			// The keeper holds at most half the process's descriptors.
			b.Logf("keeping %d files and their replacements needs a descriptor limit of %d; it is %d here: only without", files, 4*files, rl.Cur)
			continue
		}
		open := func() *Export {
			e, err := OpenExport(ExportConfig{Name: "bench", Device: x.dev, Mount: mnt, StateDir: x.state, Watchdog: wd,
				FreezeBudget: time.Minute, Watch: true, FullScanEvery: -1, KeepFiles: keep})
			if err != nil {
				b.Fatal(err)
			}
			return e
		}
		b.Run(fmt.Sprintf("first-publish-%d-files/%s", dirs*per, name), func(b *testing.B) {
			for range b.N {
				e := open()
				if _, err := e.Publish(); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if keep == 0 && e.KeptFiles().Files < dirs*per {
					b.Fatalf("kept %+v", e.KeptFiles())
				}
				e.Close()
				b.StartTimer()
			}
		})
		for _, replaced := range []int{1000, files} {
			b.Run(fmt.Sprintf("%d-replaced/%s", replaced, name), func(b *testing.B) {
				e := open()
				defer e.Close()
				if _, err := e.Publish(); err != nil {
					b.Fatal(err)
				}
				for n := range b.N {
					b.StopTimer()
					for i := range replaced {
						p := filepath.Join(mnt, "d"+strconv.Itoa(i%dirs), strconv.Itoa((n*replaced+i)/dirs%per))
						os.WriteFile(p+".new", []byte(strconv.Itoa(n)), 0o644)
						os.Rename(p+".new", p)
					}
					b.StartTimer()
					g, err := e.Publish()
					if err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					if keep == 0 && e.KeptFiles().Gone != replaced {
						b.Fatalf("kept %+v", e.KeptFiles())
					}
					e.Drop(g.Number - 1)
					b.StartTimer()
				}
			})
		}
	}
}
