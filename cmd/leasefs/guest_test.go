package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/guestagent"
	"github.com/leasefs/leasefs/internal/hosttest"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

func newAgent(t *testing.T, mnt string, args ...string) *hostProc {
	return newAgentOf(t, "", mnt, args...)
}

// newAgentOf runs prog (leasefsBin if "") with args, a host agent of the
// export at mnt, until t ends.
func newAgentOf(t *testing.T, prog, mnt string, args ...string) *hostProc {
	return supervise(t, &hostProc{Agent: &hosttest.Agent{Prog: prog, Args: args}}, mnt)
}

// guestMount runs 'leasefs guest' in the background on a new directory
// and unmounts it when t ends.
func guestMount(t *testing.T, args ...string) string {
	t.Helper()
	return guestMountOf(t, leasefsBin, args...)
}

// guestMountOf is guestMount running the binary bin (leasefsBinNoRace,
// where many guests would starve the two cores under -race).
func guestMountOf(t *testing.T, bin string, args ...string) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command(bin, append(append([]string{"guest"}, args...), dir)...).CombinedOutput(); err != nil {
		t.Fatalf("leasefs guest: %v\n%s", err, out)
	}
	t.Cleanup(func() { imgtest.Unmount(t, dir); waitGone(t, dir) })
	return dir
}

// The host agent is killed (SIGKILL) or stopped (SIGTERM) and started
// again, again and again, while processes in two guests (one reading the
// shared device, one reading through the host) read a file that the host
// replaces and publishes between restarts. Every read gives the bytes of
// one version or fails with ESTALE; none hangs; the mounts answer
// throughout; at the end both read the last version.
func TestGuestsAcrossHostAgentRestarts(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	t.Setenv("LEASEFS_RUN_DIR", filepath.Join(run, "guests"))
	const size = 2 << 20
	version := func(v int) []byte { return bytes.Repeat([]byte{byte('A' + v)}, size) }
	replace := func(v int) {
		tmp := filepath.Join(mnt, "big.tmp")
		if err := os.WriteFile(tmp, version(v), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(mnt, "big")); err != nil {
			t.Fatal(err)
		}
	}
	replace(0)
	control, guest := "unix:"+filepath.Join(run, "control.sock"), "unix:"+filepath.Join(run, "guest.sock")
	a := newAgent(t, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", guest, "--control", control,
		"--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	dirs := []string{
		guestMount(t, "--connect", guest, "--export", "mirror", "--device", dev),
		guestMount(t, "--connect", guest, "--export", "mirror"),
	}

	var mu sync.Mutex
	written := map[byte]bool{'A': true}
	var reads, stale int
	var failures []string
	fail := func(format string, args ...any) {
		mu.Lock()
		failures = append(failures, fmt.Sprintf(format, args...))
		mu.Unlock()
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, dir := range dirs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), 11))
			buf := make([]byte, 128<<10)
			for {
				select {
				case <-stop:
					return
				default:
				}
				type result struct {
					n   int
					err error
				}
				done := make(chan result, 1)
				go func() {
					f, err := os.Open(filepath.Join(dir, "big"))
					if err != nil {
						done <- result{0, err}
						return
					}
					defer f.Close()
					n, err := f.ReadAt(buf, rng.Int64N(size-int64(len(buf))))
					done <- result{n, err}
				}()
				var r result
				select {
				case r = <-done:
				case <-time.After(45 * time.Second):
					fail("guest %d: an open or read hangs", i)
					return
				}
				mu.Lock()
				switch {
				case r.err == nil && r.n == len(buf) && bytes.Count(buf, buf[:1]) == r.n && written[buf[0]]:
					reads++
				case errors.Is(r.err, syscall.ESTALE):
					stale++
				case r.err != nil:
					failures = append(failures, fmt.Sprintf("guest %d: %v", i, r.err))
				default:
					failures = append(failures, fmt.Sprintf("guest %d: %d bytes, not one version", i, r.n))
				}
				mu.Unlock()
			}
		}()
	}
	for round := 1; round <= 6; round++ {
		mu.Lock()
		written[byte('A'+round)] = true
		mu.Unlock()
		replace(round)
		if out, err := leasefs(t, "publish", "--control", control, "mirror"); err != nil {
			t.Fatalf("publish: %v\n%s", err, out)
		}
		time.Sleep(100 * time.Millisecond)
		sig := syscall.SIGTERM
		if round%2 == 1 {
			sig = syscall.SIGKILL
		}
		a.stop(sig)
		time.Sleep(time.Duration(round%3) * 300 * time.Millisecond)
		a.start()
		for _, dir := range dirs {
			start := time.Now()
			if _, err := os.Stat(filepath.Join(dir, "big")); err != nil && !errors.Is(err, syscall.ESTALE) {
				t.Errorf("round %d: stat after the restart: %v", round, err)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("round %d: the mount took %v to answer", round, d)
			}
		}
	}
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()
	t.Logf("%d reads of one version, %d ESTALE", reads, stale)
	for _, f := range failures {
		t.Error(f)
	}
	if reads < 50 {
		t.Fatalf("only %d good reads", reads)
	}
	for i, dir := range dirs {
		var b []byte
		var err error
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if b, err = os.ReadFile(filepath.Join(dir, "big")); err == nil && bytes.Equal(b, version(6)) {
				break
			}
		}
		if !bytes.Equal(b, version(6)) {
			t.Fatalf("guest %d does not read the last version: %v", i, err)
		}
	}
}

// eioDisk is a disk image whose every read fails.
type eioDisk struct{ fs.Inode }

var _ = (fs.NodeOpener)((*eioDisk)(nil))
var _ = (fs.NodeReader)((*eioDisk)(nil))
var _ = (fs.NodeGetattrer)((*eioDisk)(nil))

func (*eioDisk) Open(context.Context, uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

func (*eioDisk) Read(context.Context, fs.FileHandle, []byte, int64) (fuse.ReadResult, syscall.Errno) {
	return nil, syscall.EIO
}

func (*eioDisk) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode, out.Size = 0o444|syscall.S_IFREG, 64<<20
	return 0
}

// A guest given the wrong disk, or one that cannot be read, is refused
// with an error naming it, and leaves no mount and no process behind.
func TestGuestRefusesAWrongDevice(t *testing.T) {
	h, _, _ := startHostCmd(t)
	t.Setenv("LEASEFS_RUN_DIR", t.TempDir())
	other := imgtest.Mkfs(t, "ext4", "", 64, "-b", "4096", "-O", "has_journal,extent,metadata_csum,64bit")

	failing := t.TempDir()
	root := &fs.Inode{}
	srv, err := fs.Mount(failing, root, &fs.Options{OnAdd: func(ctx context.Context) {
		root.AddChild("disk.img", root.NewPersistentInode(ctx, &eioDisk{}, fs.StableAttr{Mode: syscall.S_IFREG}), false)
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Unmount() })

	for _, c := range []struct{ name, device, want string }{
		{"another filesystem", other, "does not hold the export's filesystem"},
		{"a disk that fails", filepath.Join(failing, "disk.img"), "input/output error"},
		{"no such disk", "/nonexistent/disk", "no such file"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			out, err := leasefs(t, "guest", "--connect", h.guest, "--export", "mirror", "--device", c.device, dir)
			if err == nil {
				imgtest.Unmount(t, dir)
				t.Fatalf("mounted with %s as its device", c.name)
			}
			if !strings.Contains(out, c.want) || !strings.Contains(out, c.device) {
				t.Fatalf("leasefs guest said %q; want it to say %q and name %s", out, c.want, c.device)
			}
			if isFuseMount(t, dir) {
				t.Fatal("a mount was left behind")
			}
			waitGone(t, dir)
		})
	}
}

// 'leasefs guest status' shows what a guest serves; a background guest
// logs to syslog when told, and says so when it has nowhere to log; a
// second guest on the same mount point is refused.
func TestGuestStatusAndLogs(t *testing.T) {
	h, mnt, dev := startHostCmd(t)
	t.Setenv("LEASEFS_RUN_DIR", t.TempDir())
	sock := filepath.Join(t.TempDir(), "syslog.sock")
	syslogd, err := net.ListenPacket("unixgram", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer syslogd.Close()
	var logged testenv.SyncBuffer
	go func() {
		buf := make([]byte, 8192)
		for {
			n, _, err := syslogd.ReadFrom(buf)
			if err != nil {
				return
			}
			logged.Write(append(buf[:n:n], '\n'))
		}
	}()
	dir := guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev, "--log", "syslog:"+sock)
	f, err := os.Open(filepath.Join(dir, "hello"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	out, err := leasefs(t, "guest", "status", dir)
	if err != nil {
		t.Fatalf("guest status: %v\n%s", err, out)
	}
	for _, want := range []string{`export mirror: connected`, `(?m)^generation +1, `, `(?m)^device +/dev/loop\d+: verified`,
		`(?m)^open files +1; file data cached in the guest's page cache$`, `the host publishes explicit`, `(?m)^metadata cache +\d+ KiB of 8192 KiB`} {
		if !regexp.MustCompile(want).MatchString(out) {
			t.Errorf("guest status does not say %q:\n%s", want, out)
		}
	}
	out, err = leasefs(t, "guest", "status", "--json", dir)
	if err != nil {
		t.Fatalf("guest status --json: %v\n%s", err, out)
	}
	var st guestagent.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if st.Export != "mirror" || st.Generation != 1 || st.OpenFiles != 1 || st.Device == nil || st.Device.State != guestagent.DeviceVerified ||
		st.Cache.LimitBytes != guestagent.DefaultCacheBytes || !st.Connected {
		t.Fatalf("status %+v", st)
	}

	// A writer on the host breaks the lease: the file is fenced, which
	// status and the log show.
	w, err := os.OpenFile(filepath.Join(mnt, "hello"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		out, _ = leasefs(t, "guest", "status", dir)
		if strings.Contains(out, "fenced files") && strings.Contains(out, "/hello") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status does not show the fenced file:\n%s", out)
		}
	}
	for _, want := range []string{"mounted", "device verified", "fenced"} {
		if !strings.Contains(logged.String(), want) {
			t.Errorf("syslog did not get %q:\n%s", want, logged.String())
		}
	}

	out, err = leasefs(t, "guest", "--connect", h.guest, "--export", "mirror", dir)
	if err == nil || !strings.Contains(out, "is already a leasefs mount") {
		t.Fatalf("a second guest on %s: %v\n%s", dir, err, out)
	}
	if _, err := os.Stat("/dev/log"); os.IsNotExist(err) {
		other := guestMountOut(t, "--connect", h.guest, "--export", "mirror")
		if !strings.Contains(other, "will log nothing in the background") {
			t.Errorf("no word that the background guest logs nowhere: %q", other)
		}
	}
	if out, err := leasefs(t, "guest", "status", t.TempDir()); err == nil || !strings.Contains(out, "status socket") {
		t.Fatalf("status of a directory nobody serves: %v\n%s", err, out)
	}
}

// A guest with --follow manual stays on its generation until SIGHUP to
// the pid its status shows, and then moves to the newest.
func TestManualGuestMovesOnSIGHUP(t *testing.T) {
	h, mnt, _ := startHostCmd(t)
	t.Setenv("LEASEFS_RUN_DIR", t.TempDir())
	dir := guestMount(t, "--connect", h.guest, "--export", "mirror", "--follow", "manual")
	on := guestStatus(t, dir).Generation
	if err := os.WriteFile(filepath.Join(mnt, "new"), []byte("published\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	cur := hostStatus(t, h.control).Exports[0].Generation
	waitFor(t, "the guest to hear of the new generation", func() bool { return guestStatus(t, dir).Latest == cur })
	st := guestStatus(t, dir)
	if _, err := os.Stat(filepath.Join(dir, "new")); st.Generation != on || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("before SIGHUP: on %d (was %d), the new file: %v", st.Generation, on, err)
	}
	out, err := leasefs(t, "guest", "status", dir)
	if want := fmt.Sprintf("follows manual (kill -HUP %d moves it", st.Pid); err != nil || !strings.Contains(out, want) {
		t.Fatalf("guest status does not say %q: %v\n%s", want, err, out)
	}
	// The pid is the server of this mount, the process this test started.
	if cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", st.Pid)); err != nil || !bytes.Contains(cmdline, []byte(dir)) {
		t.Fatalf("pid %d is not the mount's server: %q %v", st.Pid, cmdline, err)
	}
	if err := syscall.Kill(st.Pid, syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the guest to move on SIGHUP", func() bool { return guestStatus(t, dir).Generation == cur })
	if b, err := os.ReadFile(filepath.Join(dir, "new")); err != nil || string(b) != "published\n" {
		t.Fatalf("after SIGHUP, the new file: %q %v", b, err)
	}
}

// guestMountOut is guestMount, returning what the command said.
func guestMountOut(t *testing.T, args ...string) string {
	t.Helper()
	dir := t.TempDir()
	out, err := leasefs(t, append(append([]string{"guest"}, args...), dir)...)
	if err != nil {
		t.Fatalf("leasefs guest: %v\n%s", err, out)
	}
	t.Cleanup(func() { imgtest.Unmount(t, dir); waitGone(t, dir) })
	return out
}

// With its host agent gone, a guest whose mount is unmounted from outside
// (lazily: a read is still waiting for the host) exits at once: the read
// ends, and the server does not wait out the read's deadline.
func TestGuestExitsWhenUnmountedWithoutItsHost(t *testing.T) {
	mnt, dev := hostExport(t)
	os.WriteFile(filepath.Join(mnt, "big"), bytes.Repeat([]byte("x"), 8<<20), 0o644)
	run := t.TempDir()
	t.Setenv("LEASEFS_RUN_DIR", filepath.Join(run, "guests"))
	guest := "unix:" + filepath.Join(run, "guest.sock")
	a := newAgent(t, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", guest, "--control", "unix:"+filepath.Join(run, "control.sock"),
		"--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	dir := t.TempDir()
	if out, err := leasefs(t, "guest", "--connect", guest, "--export", "mirror", dir); err != nil {
		t.Fatalf("leasefs guest: %v\n%s", err, out)
	}
	f, err := os.Open(filepath.Join(dir, "big"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	a.stop(syscall.SIGKILL)
	read := make(chan error, 1)
	go func() { _, err := f.ReadAt(make([]byte, 10), 7<<20); read <- err }()
	time.Sleep(300 * time.Millisecond)
	if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	select {
	case err := <-read:
		if err == nil {
			t.Fatal("a read with no host and no mount succeeded")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the read waits on")
	}
	f.Close()
	waitGone(t, dir)
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("the guest took %v to exit", d)
	}
	a.start() // for the cleanup's clean stop
}

// Programs run and files map from a guest mount in both page-cache
// modes: exec, a private mapping, and a shared read-only mapping (with
// --page-cache=host it needs FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6; the
// guest says so in its log when the kernel lacks it).
func TestMmapAndExecInBothPageCacheModes(t *testing.T) {
	h, mnt, dev := startHostCmd(t)
	t.Setenv("LEASEFS_RUN_DIR", t.TempDir())
	tool, err := os.ReadFile("/bin/true")
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(mnt, "tool"), tool, 0o755)
	data := bytes.Repeat([]byte("mapped bytes, "), 10000)
	os.WriteFile(filepath.Join(mnt, "data"), data, 0o644)
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	for _, c := range []struct {
		name string
		args []string
	}{
		{"guest, device", []string{"--device", dev}},
		{"host, device", []string{"--device", dev, "--page-cache", "host"}},
		{"host, no device", []string{"--page-cache", "host"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := guestMount(t, append([]string{"--connect", h.guest, "--export", "mirror"}, c.args...)...)
			if out, err := exec.Command(filepath.Join(dir, "tool")).CombinedOutput(); err != nil {
				t.Fatalf("exec from the mount: %v %s", err, out)
			}
			f, err := os.Open(filepath.Join(dir, "data"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			for _, flags := range []int{unix.MAP_PRIVATE, unix.MAP_SHARED} {
				m, err := unix.Mmap(int(f.Fd()), 0, len(data), unix.PROT_READ, flags)
				if err != nil {
					t.Fatalf("mmap %#x: %v", flags, err)
				}
				ok := bytes.Equal(m, data)
				unix.Munmap(m)
				if !ok {
					t.Fatalf("mmap %#x: other bytes", flags)
				}
			}
		})
	}
}
