package vmtest

// What runs inside the VM: the host agent and guests of the real binary,
// talking over AF_VSOCK loopback.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/internal/conformance"
	"github.com/leasefs/leasefs/internal/hosttest"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

const (
	helloText = "hello from the host\n"
	leasefs   = "/bin/leasefs"
	exportDev = "/dev/vda" // the image, read-write: the host's export
	sharedDev = "/dev/vdb" // the same image, read-only: the guests' device
	exportDir = "/export"
	control   = "unix:/run/leasefs/control.sock"
	port      = "5000"
)

// The scenarios, in the order they run; the test outside the VM checks
// that each passed.
var scenarios = []struct {
	name string
	run  func(*testing.T, *host)
}{
	{"demo", demo},
	{"conformance", conformanceSuite},
	{"mmap_and_exec", mmapAndExec},
	{"writer_waits_for_ack", writerWaitsForAck},
	{"open_file_survives_refill", openFileSurvivesRefill},
	{"upgrade_in_place", upgradeInPlace},
	{"torture", torture},
	{"kernel_features", kernelFeatures},
}

var scenarioNames = func() []string {
	var names []string
	for _, s := range scenarios {
		names = append(names, s.name)
	}
	return names
}()

func inside(t *testing.T) {
	h := startHost(t)
	for _, s := range scenarios {
		t.Run(s.name, func(t *testing.T) { s.run(t, h) })
	}
}

// host is the VM's host agent, exporting the image as "mirror".
type host struct{ *hosttest.Agent }

func startHost(t *testing.T) *host {
	if out, err := exec.Command("mount", "-t", "ext4", exportDev, exportDir).CombinedOutput(); err != nil {
		t.Fatalf("mounting the export: %v %s", err, out)
	}
	t.Cleanup(func() { imgtest.Unmount(t, exportDir) })
	if err := os.MkdirAll("/run/leasefs/state", 0o755); err != nil {
		t.Fatal(err)
	}
	h := &host{&hosttest.Agent{Prog: leasefs, Args: []string{"host", "--export", "mirror=" + exportDev + ":" + exportDir,
		"--listen", "vsock:" + port, "--control", control, "--state-dir", "/run/leasefs/state", "--auto-publish", "off",
		"--keep-files", "0"}, // the scenarios refill the disk to show a freed block reused: nothing is kept from reuse
		Ready: 60 * time.Second, StopWait: 20 * time.Second}}
	h.StopAtEnd(t)
	h.Start(t)
	return h
}

// publish publishes what the export holds and returns the generation.
func (h *host) publish(t testing.TB) uint64 {
	t.Helper()
	gen, err := h.publishGen()
	if err != nil {
		t.Fatal(err)
	}
	return gen
}

// publishErr is publish for a goroutine of the test's.
func (h *host) publishErr() error { _, err := h.publishGen(); return err }

func (h *host) publishGen() (uint64, error) { return hosttest.Publish(leasefs, control, "mirror") }

func (h *host) write(t testing.TB, name string, b []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(exportDir, name), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// guest is a 'leasefs guest --foreground' serving dir.
type guest struct {
	dir, log string
	cmd      *exec.Cmd
}

// mount runs a guest of the export with args (--device, --page-cache)
// and waits until its mount is up; it is unmounted, and must exit,
// when t ends.
func (h *host) mount(t *testing.T, args ...string) *guest {
	t.Helper()
	g := &guest{dir: t.TempDir(), log: filepath.Join(t.TempDir(), "guest.log")}
	all := append([]string{"guest", "--foreground", "--log", g.log, "--connect", "vsock:1:" + port, "--export", "mirror"}, args...)
	g.cmd = exec.Command(leasefs, append(all, g.dir)...)
	var stderr testenv.SyncBuffer
	g.cmd.Stdout, g.cmd.Stderr = &stderr, &stderr
	if err := g.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- g.cmd.Wait() }()
	t.Cleanup(func() {
		_ = g.cmd.Process.Signal(syscall.SIGCONT) // in case a test stopped it
		imgtest.Unmount(t, g.dir)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			t.Errorf("guest %s did not exit after its unmount; killing it", g.dir)
			_ = g.cmd.Process.Kill()
		}
	})
	for deadline := time.Now().Add(60 * time.Second); !mounted(g.dir); time.Sleep(20 * time.Millisecond) {
		select {
		case err := <-exited:
			t.Fatalf("leasefs guest exited: %v\n%s%s", err, stderr.String(), g.logText())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("leasefs guest not mounted after 60s\n%s%s", stderr.String(), g.logText())
		}
	}
	return g
}

// openInTwoGuests opens name in two new guests, one reading the shared
// device and one reading through the host; the files close when t ends.
func (h *host) openInTwoGuests(t *testing.T, name string) []*os.File {
	t.Helper()
	var files []*os.File
	for _, args := range [][]string{{"--device", sharedDev}, nil} {
		f, err := os.Open(h.mount(t, args...).path(name))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() }) // before the guest's unmount
		files = append(files, f)
	}
	return files
}

// logs is the host agent's log and g's, for a failure's message.
func (h *host) logs(g *guest) string {
	return "host agent's log:\n" + h.Log.String() + "guest's log:\n" + g.logText()
}

func (g *guest) logText() string {
	b, _ := os.ReadFile(g.log)
	return string(b)
}

func (g *guest) path(name string) string { return filepath.Join(g.dir, name) }

// waitRead waits until the guest reads want at name.
func (g *guest) waitRead(t testing.TB, name, want string) {
	t.Helper()
	var b []byte
	var err error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if b, err = os.ReadFile(g.path(name)); err == nil && string(b) == want {
			return
		}
	}
	t.Fatalf("guest %s: %s reads %q (%v), want %q", g.dir, name, b, err, want)
}

func mounted(dir string) bool {
	b, _ := os.ReadFile("/proc/self/mounts")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[1] == dir && f[2] == "fuse.leasefs" {
			return true
		}
	}
	return false
}

// kernelVersion is the running kernel's major and minor version.
func kernelVersion(t testing.TB) (int, int) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	var major, minor int
	fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &major, &minor)
	return major, minor
}

func atLeast(t testing.TB, major, minor int) bool {
	a, b := kernelVersion(t)
	return a > major || a == major && b >= minor
}

// The one-machine demo: a guest on the shared device reads the first
// generation, the host writes and publishes, the guest reads the new
// file; the status commands answer.
func demo(t *testing.T, h *host) {
	h.publish(t)
	g := h.mount(t, "--device", sharedDev)
	g.waitRead(t, "hello", helloText)
	h.write(t, "news", []byte("generation two\n"))
	h.publish(t)
	g.waitRead(t, "news", "generation two\n")
	out, err := exec.Command(leasefs, "status", "--control", control).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "mirror") {
		t.Fatalf("leasefs status: %v\n%s", err, out)
	}
	out, err = exec.Command(leasefs, "guest", "status", g.dir).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "vsock:1:"+port) {
		t.Fatalf("leasefs guest status: %v\n%s", err, out)
	}
}

// The read-only conformance suite in both page-cache modes, against a
// read-only bind of the VM kernel's own mount of the export, which shows
// the generation just published; then the coherence step on a mount of
// each kind, the device's in both modes and one without it.
func conformanceSuite(t *testing.T, h *host) {
	h.publish(t)
	oracle := t.TempDir()
	for _, args := range [][]string{{"--bind", exportDir, oracle}, {"-o", "remount,bind,ro", oracle}} {
		if out, err := exec.Command("mount", args...).CombinedOutput(); err != nil {
			t.Fatalf("mount %v: %v %s", args, err, out)
		}
	}
	t.Cleanup(func() { imgtest.Unmount(t, oracle) })
	t.Run("guest_cache", func(t *testing.T) {
		conformance.Run(t, h.mount(t, "--device", sharedDev).dir, oracle)
	})
	t.Run("host_cache", func(t *testing.T) {
		conformance.Run(t, h.mount(t, "--device", sharedDev, "--page-cache", "host").dir, oracle)
	})
	t.Run("coherence", func(t *testing.T) {
		conformance.Coherence(t, conformance.Live{Writer: exportDir, Oracle: oracle, Publish: func(t *testing.T) { h.publish(t) }},
			h.mount(t, "--device", sharedDev).dir, h.mount(t, "--device", sharedDev, "--page-cache", "host").dir, h.mount(t).dir)
	})
}

// Programs run and files map from the guest mount in both page-cache
// modes. With --page-cache=host a shared mapping needs
// FUSE_DIRECT_IO_ALLOW_MMAP (6.6): before it, it fails with ENODEV, and
// the guest has said so in one log line.
func mmapAndExec(t *testing.T, h *host) {
	if err := os.MkdirAll(filepath.Join(exportDir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	tool, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(exportDir, "bin/busybox"), tool, 0o755); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("mapped bytes, "), 100000)
	h.write(t, "data", data)
	h.publish(t)
	for _, mode := range []string{"guest", "host"} {
		t.Run(mode+"_cache", func(t *testing.T) {
			g := h.mount(t, "--device", sharedDev, "--page-cache", mode)
			if out, err := exec.Command(g.path("bin/busybox"), "echo", "ran").CombinedOutput(); err != nil || string(out) != "ran\n" {
				t.Fatalf("exec from the mount: %v %q", err, out)
			}
			f, err := os.Open(g.path("data"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			degraded := mode == "host" && !atLeast(t, 6, 6)
			for _, flags := range []int{unix.MAP_PRIVATE, unix.MAP_SHARED} {
				m, err := unix.Mmap(int(f.Fd()), 0, len(data), unix.PROT_READ, flags)
				if degraded && flags == unix.MAP_SHARED {
					if !errors.Is(err, unix.ENODEV) {
						t.Fatalf("a shared mapping without FUSE_DIRECT_IO_ALLOW_MMAP: %v, want ENODEV", err)
					}
					continue
				}
				if err != nil {
					t.Fatalf("mmap %#x: %v", flags, err)
				}
				ok := bytes.Equal(m, data)
				unix.Munmap(m)
				if !ok {
					t.Fatalf("mmap %#x: other bytes", flags)
				}
			}
			if n := strings.Count(g.logText(), "FUSE_DIRECT_IO_ALLOW_MMAP"); (n == 1) != degraded || n > 1 {
				t.Fatalf("the guest's log names FUSE_DIRECT_IO_ALLOW_MMAP %d times (degraded: %v):\n%s", n, degraded, g.logText())
			}
		})
	}
}

// An in-place writer on the host waits until the guest holding the file
// acknowledges the break: not while the guest is stopped, at once when
// it runs again (well before the kernel's lease-break-time would end
// the wait). The guest's open file is stale then, and the next
// generation has the new content.
func writerWaitsForAck(t *testing.T, h *host) {
	h.write(t, "inplace", []byte("old content"))
	h.publish(t)
	g := h.mount(t, "--device", sharedDev)
	f, err := os.Open(g.path("inplace"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(make([]byte, 3), 0); err != nil {
		t.Fatal(err)
	}
	testenv.Stop(t, g.cmd.Process.Pid)
	// Before the close above: a close waits for the guest (FLUSH).
	defer g.cmd.Process.Signal(syscall.SIGCONT)
	wrote := make(chan error, 1)
	go func() {
		w, err := os.OpenFile(filepath.Join(exportDir, "inplace"), os.O_WRONLY|os.O_TRUNC, 0)
		if err == nil {
			_, err = w.WriteString("new content")
			w.Close()
		}
		wrote <- err
	}()
	select {
	case err := <-wrote:
		t.Fatalf("the writer went ahead (%v) while the guest could not acknowledge\n%s", err, h.logs(g))
	case <-time.After(2 * time.Second):
	}
	if err := g.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("the writer still waits 15s after the guest could acknowledge\n%s", h.logs(g))
	}
	// Fenced: its reads are ESTALE once the guest has dropped the pages
	// it cached (after its ack; until then they give the old bytes).
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if _, err = f.ReadAt(make([]byte, 3), 0); errors.Is(err, syscall.ESTALE) {
			break
		}
	}
	if !errors.Is(err, syscall.ESTALE) {
		t.Fatalf("read of the broken file: %v, want ESTALE\n%s", err, h.logs(g))
	}
	h.publish(t)
	g.waitRead(t, "inplace", "new content")
}

// Files open in guests keep their bytes while the host deletes them and
// fills the filesystem with other data, and publishes.
func openFileSurvivesRefill(t *testing.T, h *host) {
	want := make([]byte, 4<<20)
	for i := range want {
		want[i] = byte(i * 7 / 5)
	}
	h.write(t, "big", want)
	h.publish(t)
	files := h.openInTwoGuests(t, "big")
	if err := os.Remove(filepath.Join(exportDir, "big")); err != nil {
		t.Fatal(err)
	}
	junk := bytes.Repeat([]byte{0xEE}, 1<<20)
	var names []string
	for i := 0; ; i++ {
		name := filepath.Join(exportDir, fmt.Sprint("junk", i))
		names = append(names, name)
		if err := os.WriteFile(name, junk, 0o644); err != nil {
			break // full
		}
	}
	t.Cleanup(func() {
		for _, n := range names {
			os.Remove(n)
		}
		h.publish(t)
	})
	h.publish(t)
	for i, f := range files {
		got := make([]byte, len(want)+10)
		n, err := f.ReadAt(got, 0)
		if n != len(want) || !bytes.Equal(got[:n], want) {
			t.Fatalf("guest %d read %d bytes (%v), the original: %v", i, n, err, bytes.Equal(got[:min(n, len(want))], want[:min(n, len(want))]))
		}
	}
}

// started is when the host agent's run began (an upgrade begins another).
func (h *host) started(t testing.TB) time.Time {
	t.Helper()
	out, err := exec.Command(leasefs, "status", "--json", "--control", control).Output()
	var st hostagent.Status
	if err == nil {
		err = json.Unmarshal(out, &st)
	}
	if err != nil {
		return time.Time{}
	}
	return st.Started
}

// The agent upgrades in place (SIGUSR2) over vsock while two guests read
// a file the host has deleted: its listening vsock socket and held file
// are handed over, the guests reconnect and resume, and both read the
// file's bytes to the end.
func upgradeInPlace(t *testing.T, h *host) {
	want := bytes.Repeat([]byte("upgrade in place\n"), 1<<17) // 2 MiB
	h.write(t, "up", want)
	h.publish(t)
	files := h.openInTwoGuests(t, "up")
	half := len(want) / 2
	for i, f := range files {
		b := make([]byte, half)
		if n, err := f.ReadAt(b, 0); n != half || !bytes.Equal(b, want[:half]) {
			t.Fatalf("guest %d: the first half: %d bytes, %v", i, n, err)
		}
	}
	if err := os.Remove(filepath.Join(exportDir, "up")); err != nil {
		t.Fatal(err)
	}
	h.publish(t)
	before := h.started(t)
	if err := h.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if now := h.started(t); !now.IsZero() && !now.Equal(before) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not come back as a new run:\n%s", h.Log.String())
		}
	}
	if !strings.Contains(h.Log.String(), "took over the last run's leases") {
		t.Errorf("the new run took over no leases:\n%s", h.Log.String())
	}
	for i, f := range files {
		b := make([]byte, len(want)-half+10)
		if n, err := f.ReadAt(b, int64(half)); n != len(want)-half || !bytes.Equal(b[:n], want[half:]) {
			t.Fatalf("guest %d after the upgrade: %d bytes (%v), not the rest of the deleted file", i, n, err)
		}
	}
}

// The consistency torture, shortened: the host replaces self-validating
// files continuously and publishes every second while readers in two
// guests (the shared device, and reads through the host) read them. No
// read may be torn.
func torture(t *testing.T, h *host) {
	d, err := time.ParseDuration(os.Getenv("LEASEFS_VM_TORTURE"))
	if err != nil {
		t.Fatalf("LEASEFS_VM_TORTURE: %v", err)
	}
	dir := filepath.Join(exportDir, "torture")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	tt := testenv.Torture{Dir: dir, Files: 300, For: d, Pause: 2 * time.Millisecond,
		Publish: h.publishErr, Min: testenv.TortureResults{Reads: 100, Generations: int64(d/time.Second) / 3, Replaced: 100}}
	tt.Populate(t)
	h.publish(t)
	for _, g := range []*guest{h.mount(t, "--device", sharedDev), h.mount(t)} {
		tt.Readers = append(tt.Readers, filepath.Join(g.dir, "torture"))
	}
	tt.Run(t)
}

// What the host agent found the kernel lacks, it said once, and worked
// around (every publish above went through): EXT4_IOC_CHECKPOINT
// arrived in 5.13.
func kernelFeatures(t *testing.T, h *host) {
	degraded := !atLeast(t, 5, 13)
	// Once per run of the agent: an upgrade in place begins another.
	runs := 1 + strings.Count(h.Log.String(), "taking over from the agent before the upgrade")
	if n := strings.Count(h.Log.String(), "EXT4_IOC_CHECKPOINT"); n != 0 && !degraded || degraded && n != runs {
		t.Fatalf("the host's log names EXT4_IOC_CHECKPOINT %d times in %d runs (kernel without it: %v):\n%s", n, runs, degraded, h.Log.String())
	}
	if strings.Contains(h.Log.String(), "rcu_expedited") {
		t.Fatalf("the host could not expedite RCU:\n%s", h.Log.String())
	}
}
