package hostagent

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// BenchmarkPublish measures the freeze of a publish on an export with
// 100,000 files in 100 directories: the first (every inode read) and one
// after 1,000 files were rewritten. It reports the freeze in ms (the
// writers' only cost) and the generation's size.
func BenchmarkPublish(b *testing.B) {
	testenv.RequireLoop(b)
	const dirs, per = 100, 1000
	img := imgtest.Mkfs(b, "ext4", "", 2048, "-b", "4096", "-N", "120000", "-O",
		"has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize")
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
	defer wd.Close()
	open := func(watch bool) *Export {
		e, err := OpenExport(ExportConfig{Name: "bench", Device: x.dev, Mount: mnt, StateDir: x.state, Watchdog: wd,
			FreezeBudget: time.Minute, Watch: watch, FullScanEvery: -1})
		if err != nil {
			b.Fatal(err)
		}
		return e
	}
	report := func(b *testing.B, gs []*Generation) {
		var frozen, scanned time.Duration
		for _, g := range gs {
			frozen += g.Frozen
			scanned += g.Scan
		}
		b.ReportMetric(float64(frozen.Microseconds())/1e3/float64(len(gs)), "freeze-ms")
		b.ReportMetric(float64(scanned.Microseconds())/1e3/float64(len(gs)), "scan-ms")
		b.ReportMetric(float64(gs[len(gs)-1].Blocks()), "blocks")
	}
	b.Run("full-100k-inodes", func(b *testing.B) {
		var gs []*Generation
		for range b.N {
			e := open(false)
			g, err := e.Publish()
			if err != nil {
				b.Fatal(err)
			}
			gs = append(gs, g)
			e.Close()
		}
		report(b, gs)
	})
	for _, watch := range []bool{false, true} {
		name := "1k-changed-of-100k/full-scan"
		if watch {
			name = "1k-changed-of-100k/narrowed"
		}
		b.Run(name, func(b *testing.B) {
			e := open(watch)
			defer e.Close()
			if _, err := e.Publish(); err != nil {
				b.Fatal(err)
			}
			var gs []*Generation
			for n := range b.N {
				b.StopTimer()
				for i := range 1000 {
					p := filepath.Join(mnt, "d"+strconv.Itoa(i%dirs), strconv.Itoa((n*1000+i)%per))
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
