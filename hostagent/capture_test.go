package hostagent

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/guestagent"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// snapshotWhileFrozen makes e copy its device to a new file during each
// publish's freeze: a copy of exactly the state the generation captured.
func snapshotWhileFrozen(t *testing.T, e *Export) *[]string {
	var snaps []string
	e.pl.onFrozen = func() {
		p := filepath.Join(t.TempDir(), "frozen.img")
		f, err := os.Create(p)
		if err != nil {
			t.Error(err)
			return
		}
		defer f.Close()
		if _, err := io.Copy(f, io.NewSectionReader(e.dev, 0, e.dev.Size())); err != nil {
			t.Error(err)
		}
		snaps = append(snaps, p)
	}
	return &snaps
}

// sameAsFrozenCopy mounts generation g through the guest's FUSE file
// system, its file data read from the frozen copy, and compares it with
// the kernel's read-only mount of that copy.
func sameAsFrozenCopy(t *testing.T, g *Generation, frozen string) {
	t.Helper()
	testenv.RequireFUSE(t)
	data, err := os.Open(frozen)
	if err != nil {
		t.Fatal(err)
	}
	defer data.Close()
	fs, err := ext4ro.Open(g, &ext4ro.Options{Data: data})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	srv, err := guestagent.Mount(guestagent.NewFileSystem(fs, guestagent.Config{Timeout: time.Second, NoOpen: true}), dir, guestagent.MountConfig{FsName: "gen"})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Unmount(); srv.Wait() }()
	kernel := imgtest.KernelMount(t, frozen, "ro,noload")
	want := imgtest.Snapshot(t, kernel)
	imgtest.Compare(t, want, imgtest.Snapshot(t, dir))
	imgtest.CompareReads(t, kernel, dir, want, g.Number)
}

func inodeOf(t *testing.T, path string) uint32 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	return uint32(st.Ino)
}

// Generations are exactly the frozen filesystem, each of them, also
// after later ones were captured; a later generation lists what changed.
func TestGenerationsMatchFrozenCopies(t *testing.T) {
	x := newExport(t, 256)
	imgtest.Populate(t, x.mnt, imgtest.TreeSpec{Seed: 9, BlockSize: 4096, ManyEntries: 2000, NanoTimes: true})
	e := x.open(t, 30*time.Second)
	snaps := snapshotWhileFrozen(t, e)
	g1, err := e.Publish()
	if err != nil {
		t.Fatal(err)
	}
	if !g1.All || g1.Number == 0 {
		t.Fatalf("first generation %d, all %v", g1.Number, g1.All)
	}

	// Change things the way a writer does.
	grow := filepath.Join(x.mnt, "grown")
	imgtest.Run(t, "sh", "-c", "head -c 300000 /dev/urandom > "+grow)
	g2, err := e.Publish()
	if err != nil {
		t.Fatal(err)
	}
	f, _ := os.OpenFile(grow, os.O_APPEND|os.O_WRONLY, 0)
	f.Write(bytes.Repeat([]byte("more"), 100000))
	f.Close()
	newDir := filepath.Join(x.mnt, "new")
	os.Mkdir(newDir, 0o755)
	for i := range 600 { // enough to make it an htree
		os.WriteFile(filepath.Join(newDir, "entry-with-a-long-name-"+strconv.Itoa(i)), []byte(strconv.Itoa(i)), 0o644)
	}
	os.Symlink(strings.Repeat("long/", 30), filepath.Join(x.mnt, "slowlink"))
	unix.Setxattr(grow, "user.note", []byte("changed"), 0)
	os.Chmod(grow, 0o600)
	os.Rename(filepath.Join(x.mnt, "new", "entry-with-a-long-name-1"), filepath.Join(x.mnt, "moved"))
	os.Remove(filepath.Join(x.mnt, "new", "entry-with-a-long-name-2"))
	// An orphan: unlinked while held open.
	held, _ := os.Create(filepath.Join(x.mnt, "orphan"))
	held.Write([]byte("orphan"))
	os.Remove(held.Name())
	defer held.Close()

	g3, err := e.Publish()
	if err != nil {
		t.Fatal(err)
	}
	if g3.All || g3.Number != g1.Number+2 {
		t.Fatalf("generation %d, all %v", g3.Number, g3.All)
	}
	for _, p := range []string{grow, newDir, x.mnt, filepath.Join(x.mnt, "slowlink")} {
		if !slices.Contains(g3.ChangedInodes, inodeOf(t, p)) {
			t.Errorf("%s (inode %d) is not among the changed inodes %v", p, inodeOf(t, p), g3.ChangedInodes)
		}
	}
	// Blocks not listed as changed are the same as in the generation before.
	changed := map[uint64]bool{}
	for _, r := range g3.Changed {
		for b := r.Start; b < r.Start+uint64(r.Count); b++ {
			changed[b] = true
		}
	}
	for b, h := range g3.blocks {
		if !changed[b] && g2.blocks[b] != h {
			t.Fatalf("block %d differs from the generation before but is not listed as changed", b)
		}
	}

	// Nothing changes: no inode is listed.
	g4, err := e.Publish()
	if err != nil {
		t.Fatal(err)
	}
	if len(g4.ChangedInodes) != 0 {
		t.Errorf("an idle publish lists changed inodes %v", g4.ChangedInodes)
	}
	t.Logf("generations: %d blocks, frozen %v / %v / %v; g3 changed %d ranges, %d inodes",
		g3.Blocks(), g1.Frozen, g3.Frozen, g4.Frozen, len(g3.Changed), len(g3.ChangedInodes))

	for i, g := range []*Generation{g1, g3} {
		snap := (*snaps)[[]int{0, 2}[i]]
		t.Run("generation "+strconv.FormatUint(g.Number, 10), func(t *testing.T) { sameAsFrozenCopy(t, g, snap) })
	}
	// Dropping generations frees what only they held.
	before, _ := e.Store().Size()
	e.Drop(g1.Number)
	e.Drop(g2.Number)
	e.Drop(g3.Number)
	after, _ := e.Store().Size()
	if after >= before || after < g4.Blocks()/2 {
		t.Fatalf("store: %d blocks before dropping, %d after; the current generation has %d", before, after, g4.Blocks())
	}
	if e.Generation(g4.Number) == nil {
		t.Fatal("the current generation was dropped")
	}
}

// A freeze that is not ours is never thawed by us.
func TestSomeoneElsesFreezeIsLeftAlone(t *testing.T) {
	x := newExport(t, 64)
	e := x.open(t, time.Second)
	fd, _ := unix.Open(x.mnt, unix.O_RDONLY, 0)
	// Cleanups, not defers: a failing test must thaw (with the fd still
	// open) before the export is unmounted, or the frozen superblock
	// outlives the test.
	t.Cleanup(func() { unix.Close(fd) })
	if err := freezeFS(fd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { thawFS(fd) })
	if _, err := e.Publish(); !errors.Is(err, ErrFrozenByOther) {
		t.Fatalf("publish: %v", err)
	}
	time.Sleep(1500 * time.Millisecond) // past the budget: the watchdog must not thaw it either
	if err := freezeFS(fd); !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("the other freeze is gone: %v", err)
	}
	// Nor does a restarted agent.
	e.Close()
	e = x.open(t, time.Second)
	if err := freezeFS(fd); !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("the other freeze is gone after a restart: %v", err)
	}
	thawFS(fd)
	if _, err := e.Publish(); err != nil {
		t.Fatal(err)
	}
}

// A freeze that overruns its budget is thawed by the watchdog, and the
// generation is thrown away.
func TestOverrunIsThawedAndDiscarded(t *testing.T) {
	x := newExport(t, 64)
	e := x.open(t, 300*time.Millisecond)
	frozen, release := make(chan struct{}), make(chan struct{})
	e.pl.onFrozen = func() { close(frozen); <-release }
	errc := make(chan error, 1)
	go func() { _, err := e.Publish(); errc <- err }()
	<-frozen
	if !x.writable(3 * time.Second) {
		t.Fatal("the watchdog did not thaw an overrunning freeze")
	}
	close(release)
	if err := <-errc; !errors.Is(err, ErrOverrun) {
		t.Fatalf("publish: %v", err)
	}
	if e.Current() != nil {
		t.Fatal("an overrun generation was kept")
	}
	e.pl.onFrozen = nil
	if _, err := e.Publish(); err != nil {
		t.Fatal(err)
	}
}

// kill -9 of the agent while the export is frozen: the watchdog thaws it.
func TestKilledAgentIsThawed(t *testing.T) {
	x := newExport(t, 64)
	agent := startHangingAgent(t, x)
	if x.writable(300 * time.Millisecond) {
		t.Fatal("the export is not frozen")
	}
	agent.Process.Kill()
	if !x.writable(3 * time.Second) {
		t.Fatal("the export stayed frozen after the agent died")
	}
}

// A freeze the agent recorded as its own (it and its watchdog died) is
// thawed when the agent starts again.
func TestRecordedFreezeIsThawedAtStart(t *testing.T) {
	x := newExport(t, 64)
	fd, _ := unix.Open(x.mnt, unix.O_RDONLY, 0)
	t.Cleanup(func() { unix.Close(fd) }) // after the thaw below
	t.Cleanup(func() { thawFS(fd) })
	if err := WriteFileSync(filepath.Join(x.state, "test.freezing"), x.mnt); err != nil {
		t.Fatal(err)
	}
	if err := freezeFS(fd); err != nil {
		t.Fatal(err)
	}
	x.open(t, time.Second)
	if !x.writable(time.Second) {
		t.Fatal("a recorded freeze was not thawed at start")
	}
	if _, err := os.Stat(filepath.Join(x.state, "test.freezing")); !os.IsNotExist(err) {
		t.Fatalf("the record is still there: %v", err)
	}
}

func TestOpenExportChecks(t *testing.T) {
	x := newExport(t, 64)
	wd, err := StartWatchdog(watchdogCmd(x.mnt))
	if err != nil {
		t.Fatal(err)
	}
	defer wd.Close()
	other := newExport(t, 64)
	for _, c := range []struct {
		name string
		cfg  ExportConfig
		want string
	}{
		{"state on the export", ExportConfig{Device: x.dev, Mount: x.mnt, StateDir: x.mnt}, "on the export itself"},
		{"wrong device", ExportConfig{Device: other.dev, Mount: x.mnt, StateDir: x.state}, "is not mounted at"},
		{"not a device", ExportConfig{Device: x.img, Mount: x.mnt, StateDir: x.state}, "not a block device"},
		{"not mounted", ExportConfig{Device: x.dev, Mount: x.state, StateDir: x.state}, "nothing is mounted"},
	} {
		c.cfg.Name, c.cfg.Watchdog = "x", wd
		if _, err := OpenExport(c.cfg); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
	ro := imgtest.KernelMount(t, imgtest.Mkfs(t, "ext4", "", 32), "ro")
	if _, err := OpenExport(ExportConfig{Name: "x", Device: imgtest.LoopDevice(t, ro), Mount: ro, StateDir: x.state, Watchdog: wd}); err == nil || !strings.Contains(err.Error(), "read-write") {
		t.Errorf("read-only mount: %v", err)
	}
	// A state directory the block store cannot be written in.
	if _, err := OpenExport(ExportConfig{Name: "x", Device: x.dev, Mount: x.mnt, StateDir: ro, Watchdog: wd}); err == nil || !strings.Contains(err.Error(), "block store in "+ro) {
		t.Errorf("read-only state directory: %v", err)
	}
	// This kernel (5.13 or later) has all a publish uses: the agent says
	// nothing of what it lacks (internal/vmtest sees the 5.10 line).
	var log bytes.Buffer
	e, err := OpenExport(ExportConfig{Name: "x", Device: x.dev, Mount: x.mnt, StateDir: x.state, Watchdog: wd, ExpediteRCU: true,
		Logger: hclog.New(&hclog.LoggerOptions{Output: &log})})
	if err != nil {
		t.Fatal(err)
	}
	e.Close()
	if e.fr.noCheckpoint || log.Len() != 0 {
		t.Errorf("on %s: no checkpoint: %v; log:\n%s", kernelRelease(t), e.fr.noCheckpoint, log.String())
	}
}

func kernelRelease(t *testing.T) string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	return unix.ByteSliceToString(u.Release[:])
}

// A label never goes back on one export — across restarts too — unless
// forced; the generation carries it.
func TestLabelsNeverGoBack(t *testing.T) {
	x := newExport(t, 64)
	e := x.open(t, 2*time.Second)
	g, err := e.PublishLabeled("2026.12.01-10", false)
	if err != nil || g.Label != "2026.12.01-10" {
		t.Fatalf("publish: %v %+v", err, g)
	}
	if _, err := e.PublishLabeled("2026.12.01-9", false); !errors.Is(err, ErrLabelBackwards) {
		t.Fatalf("a label going back: %v", err)
	}
	if cur := e.Current(); cur.Number != g.Number {
		t.Fatalf("a refused label published generation %d", cur.Number)
	}
	if g, err := e.Publish(); err != nil || g.Label != "" {
		t.Fatalf("an unlabeled publish: %v %q", err, g.Label)
	}
	e.Close()
	e = x.open(t, 2*time.Second) // a restart
	if _, err := e.PublishLabeled("2026.12.01-9", false); !errors.Is(err, ErrLabelBackwards) {
		t.Fatalf("after a restart, a label going back: %v", err)
	}
	if g, err := e.PublishLabeled("2026.12.01-9", true); err != nil || g.Label != "2026.12.01-9" {
		t.Fatalf("forced: %v", err)
	}
	if _, err := e.PublishLabeled("bad label", false); err == nil {
		t.Fatal("a label with a space was accepted")
	}
}
