package hostagent

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/vsockproto"
)

// ThawRecorded thaws a freeze recorded as leasefs's own, and only that.
func TestThawRecorded(t *testing.T) {
	ours, theirs, idle := newExport(t, 32), newExport(t, 32), newExport(t, 32)
	state := t.TempDir()
	for name, x := range map[string]export{"ours": ours, "idle": idle} {
		if err := WriteFileSync(filepath.Join(state, name+".freezing"), x.mnt+"\n"); err != nil {
			t.Fatal(err)
		}
	}
	for _, x := range []export{ours, theirs} {
		fd, err := unix.Open(x.mnt, unix.O_RDONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { thawFS(fd); unix.Close(fd) })
		if err := freezeFS(fd); err != nil {
			t.Fatal(err)
		}
	}
	thawed, err := ThawRecorded(state)
	if err != nil {
		t.Fatal(err)
	}
	if len(thawed) != 1 || thawed[0] != ours.mnt {
		t.Errorf("thawed %q, want just %s", thawed, ours.mnt)
	}
	if !ours.writable(time.Second) {
		t.Error("the recorded freeze is still frozen")
	}
	if theirs.writable(300 * time.Millisecond) {
		t.Error("a freeze that was not ours was thawed")
	}
	if left, _ := filepath.Glob(filepath.Join(state, "*.freezing")); len(left) != 0 {
		t.Errorf("records left: %q", left)
	}
}

// The first publish reads the inode tables in before it freezes, and
// says how far it is.
func TestFirstPublishReportsProgress(t *testing.T) {
	x := newExport(t, 64)
	var calls [][2]int64
	e := x.openWith(t, ExportConfig{FreezeBudget: 5 * time.Second, Progress: func(done, total int64) {
		calls = append(calls, [2]int64{done, total})
	}})
	if _, err := e.Publish(); err != nil {
		t.Fatal(err)
	}
	if len(calls) < 2 {
		t.Fatalf("progress called %d times", len(calls))
	}
	last := calls[len(calls)-1]
	if last[0] != last[1] || last[1] == 0 {
		t.Errorf("last progress %d of %d", last[0], last[1])
	}
	for i := 1; i < len(calls); i++ {
		if calls[i][0] < calls[i-1][0] || calls[i][1] != last[1] {
			t.Fatalf("progress went %v then %v", calls[i-1], calls[i])
		}
	}
	n := len(calls)
	x.write(t, "f", "x")
	if _, err := e.Publish(); err != nil {
		t.Fatal(err)
	}
	if len(calls) != n {
		t.Errorf("a later publish read the tables in again")
	}
}

// A buffered reader of the device (a hypervisor without O_DIRECT) that
// cached a freed block reads the block's new bytes once it belongs to a
// file of a published generation.
func TestPublishDropsStaleDeviceCache(t *testing.T) {
	x := newExport(t, 16)
	e := x.openWith(t, ExportConfig{FreezeBudget: 5 * time.Second, KeepFiles: -1}) // b must be able to reuse a's blocks
	old := bytes.Repeat([]byte("old!"), 1<<20)                                     // 4 MiB
	if err := os.WriteFile(filepath.Join(x.mnt, "a"), old, 0o644); err != nil {
		t.Fatal(err)
	}
	g1, err := e.Publish()
	if err != nil {
		t.Fatal(err)
	}
	extents := func(g *Generation, name string) []uint64 {
		t.Helper()
		var blocks []uint64
		view := openView(t, g)
		in := lookupPath(t, view, name)
		m, err := view.Map(in)
		if err != nil {
			t.Fatal(err)
		}
		for _, x := range m {
			for b := x.Physical; b < x.Physical+x.Count; b++ {
				blocks = append(blocks, b)
			}
		}
		return blocks
	}
	dev, err := os.Open(x.dev) // buffered, like Firecracker's drive
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	blk := make([]byte, 4096)
	aBlocks := extents(g1, "a")
	for _, b := range aBlocks {
		dev.ReadAt(blk, int64(b)*4096)
	}
	// a goes; b fills the space, so it reuses a's blocks.
	if err := os.Remove(filepath.Join(x.mnt, "a")); err != nil {
		t.Fatal(err)
	}
	unix.Sync()
	fresh := bytes.Repeat([]byte("new!"), 1<<20)
	if err := os.WriteFile(filepath.Join(x.mnt, "b"), fresh, 0o644); err != nil {
		t.Fatal(err)
	}
	g2, err := e.Publish()
	if err != nil {
		t.Fatal(err)
	}
	reused := 0
	inA := map[uint64]bool{}
	for _, b := range aBlocks {
		inA[b] = true
	}
	for i, b := range extents(g2, "b") {
		if inA[b] {
			reused++
		}
		if _, err := dev.ReadAt(blk, int64(b)*4096); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(blk, fresh[i*4096:(i+1)*4096]) {
			t.Fatalf("block %d of b (device block %d) reads %q… through the device's page cache", i, b, blk[:8])
		}
	}
	if reused == 0 {
		t.Fatal("b reused none of a's blocks; the test shows nothing")
	}
	t.Logf("%d of b's blocks were a's", reused)
}

// The metrics are the Prometheus text format and count what happened.
func TestMetrics(t *testing.T) {
	_, e, _ := publishedFile(t)
	s, addr := serve(t, e, ServerOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, _, err := vsockproto.DialHello(ctx, addr, vsockproto.Hello{Export: "test"}, func(context.Context, vsockproto.Message) (vsockproto.Message, error) {
		return &vsockproto.AnnounceAck{Generation: 2}, nil
	}, vsockproto.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := s.Publish("test"); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Call(ctx, &vsockproto.ReadMeta{Generation: 2, Blocks: []vsockproto.BlockRange{{Start: 0, Count: 1}}}); err != nil {
		t.Fatal(err)
	}
	var mfs map[string]*dto.MetricFamily
	deadline := time.Now().Add(5 * time.Second)
	for {
		var b strings.Builder
		if err := s.WriteMetrics(&b); err != nil {
			t.Fatal(err)
		}
		p := expfmt.NewTextParser(model.UTF8Validation)
		if mfs, err = p.TextToMetricFamilies(strings.NewReader(b.String())); err != nil {
			t.Fatalf("%v in:\n%s", err, b.String())
		}
		if h := mfs["leasefs_publish_ack_seconds"]; h != nil && h.Metric[0].Histogram.GetSampleCount() == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	value := func(name string, labels ...string) float64 {
		t.Helper()
		mf := mfs[name]
		if mf == nil {
			t.Fatalf("no metric %s", name)
		}
	next:
		for _, m := range mf.Metric {
			for i := 0; i < len(labels); i += 2 {
				found := false
				for _, l := range m.Label {
					found = found || l.GetName() == labels[i] && l.GetValue() == labels[i+1]
				}
				if !found {
					continue next
				}
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue()
			case m.Gauge != nil:
				return m.Gauge.GetValue()
			case m.Histogram != nil:
				return float64(m.Histogram.GetSampleCount())
			}
		}
		t.Fatalf("no %s%v", name, labels)
		return 0
	}
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"leasefs_generations_published_total", []string{"export", "test"}, 1}, // the first was published before the server
		{"leasefs_freeze_seconds", []string{"export", "test"}, 1},
		{"leasefs_publish_ack_seconds", []string{"export", "test"}, 1},
		{"leasefs_generation", []string{"export", "test"}, 2},
		{"leasefs_guests", []string{"export", "test"}, 1},
		{"leasefs_leases", []string{"export", "test"}, 0},
		{"leasefs_served_bytes_total", []string{"export", "test", "kind", "meta"}, 4096},
		{"leasefs_quota_rejections_total", []string{"limit", "connections"}, 0},
	} {
		if got := value(c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
}

func openView(t *testing.T, g *Generation) *ext4ro.FS {
	t.Helper()
	f, err := ext4ro.Open(g, nil)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func lookupPath(t *testing.T, f *ext4ro.FS, name string) *ext4ro.Inode {
	t.Helper()
	root, err := f.Inode(ext4ro.RootIno)
	if err != nil {
		t.Fatal(err)
	}
	ent, err := f.Lookup(root, name)
	if err != nil {
		t.Fatal(err)
	}
	in, err := f.Inode(ent.Ino)
	if err != nil {
		t.Fatal(err)
	}
	return in
}
