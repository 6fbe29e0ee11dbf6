package main

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/guestagent"
)

// The lease contract: a guest returns its file's bytes or an error, never
// anyone else's, whatever the host does. These tests break it the ways a
// user did, through the binary: the host lets go of a held file and
// refills its blocks; a file changes in place under readers; a fenced
// file meets the new version in the page cache; a held file is reopened
// through /proc; the device is checked again after a reconnect.

// randomBytes is n bytes no refill of the disk repeats.
func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// contractHost is a host agent from a settings file, on a fresh export
// "mirror", publishing only when told.
type contractHost struct {
	*hostProc
	conf, control, guest string
	lines                []string // the settings without the export
	export               []string
}

func newContractHost(t *testing.T, withSpare bool) (h *contractHost, mnt, dev string) {
	t.Helper()
	mnt, dev = hostExport(t)
	run := t.TempDir()
	t.Setenv("LEASEFS_RUN_DIR", filepath.Join(run, "guests"))
	h = &contractHost{conf: filepath.Join(run, "host.toml"), control: "unix:" + filepath.Join(run, "control.sock"),
		guest: "unix:" + filepath.Join(run, "guest.sock")}
	h.lines = []string{
		fmt.Sprintf("state_dir = %q", filepath.Join(run, "state")),
		fmt.Sprintf("control = %q", h.control),
		fmt.Sprintf("listen = [%q]", h.guest),
		`auto-publish = "off"`,
	}
	h.export = []string{"[export.mirror]", fmt.Sprintf("device = %q", dev), fmt.Sprintf("mount = %q", mnt)}
	if withSpare {
		// Another export, so that the settings still have one when
		// this one is removed.
		smnt, sdev := hostExport(t)
		h.lines = append(h.lines, "[export.spare]", fmt.Sprintf("device = %q", sdev), fmt.Sprintf("mount = %q", smnt))
	}
	hostConfig(t, h.conf, append(h.lines, h.export...)...)
	h.hostProc = newAgent(t, mnt, "host", "--config", h.conf)
	return h, mnt, dev
}

// reload rewrites the settings, with or without the export, and sends
// SIGHUP, waiting for the reload to be done.
func (h *contractHost) reload(t *testing.T, withExport bool) {
	t.Helper()
	lines := h.lines
	if withExport {
		lines = append(append([]string(nil), h.lines...), h.export...)
	}
	hostConfig(t, h.conf, lines...)
	if got := reloadAndWait(t, h.hostProc); !strings.Contains(got, "reloaded") {
		t.Fatalf("reload: %s\n%s", got, h.Log)
	}
}

func (h *contractHost) publish(t *testing.T) {
	t.Helper()
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
}

// A guest reading a held file from the device: the host lets go of it
// (stopped, killed without an fd store, the export removed), the file is
// deleted on the host and its blocks filled with other bytes. Reading
// on through the open file gives an error, never those bytes; once the
// host is back the file is ESTALE, and the guest's status says what
// happened, with the time of the disconnect.
func TestLettingGoNeverServesOtherBytes(t *testing.T) {
	for _, how := range []string{"stopped", "killed", "export removed"} {
		t.Run(how, func(t *testing.T) {
			h, mnt, dev := newContractHost(t, how == "export removed")
			const size = 16 << 20
			data := randomBytes(t, size)
			if err := os.WriteFile(filepath.Join(mnt, "big"), data, 0o644); err != nil {
				t.Fatal(err)
			}
			h.publish(t)
			dir := guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev, "--down", "soft=3s")
			f, err := os.Open(filepath.Join(dir, "big"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			head := make([]byte, 1<<20)
			if _, err := f.ReadAt(head, 0); err != nil || !bytes.Equal(head, data[:len(head)]) {
				t.Fatalf("the first MiB: %v", err)
			}
			time.Sleep(1500 * time.Millisecond) // the status's times must tell the disconnect from the start
			letGo := time.Now()
			switch how {
			case "stopped":
				h.stop(syscall.SIGTERM)
			case "killed":
				h.stop(syscall.SIGKILL)
			case "export removed":
				h.reload(t, false)
			}
			fillExport(t, mnt, "big")
			if out, err := exec.Command("blockdev", "--flushbufs", dev).CombinedOutput(); err != nil {
				t.Fatalf("blockdev --flushbufs: %v\n%s", err, out)
			}

			// Far from what was read, so past any readahead.
			read := func(what string, off int64, within time.Duration) error {
				t.Helper()
				b := make([]byte, 1<<20)
				start := time.Now()
				n, err := f.ReadAt(b, off)
				if !bytes.Equal(b[:n], data[off:off+int64(n)]) {
					t.Fatalf("%s: read %d bytes (%v) that are not the file's: %q…", what, n, err, b[:min(n, 16)])
				}
				took := time.Since(start)
				t.Logf("%s: %d bytes, %v, after %v", what, n, err, took.Round(time.Millisecond))
				if took > within {
					t.Fatalf("%s: the read took %v, want at most %v", what, took, within)
				}
				return err
			}
			wait := time.Second // ESTALE at once
			if how == "killed" {
				wait = 5 * time.Second // --down soft=3s
			}
			err = read("after the host let go", 12<<20, wait)
			switch {
			case err == nil:
				t.Fatal("a read after the host let go gave the file's bytes: from where?")
			case how == "killed" && !errors.Is(err, syscall.EIO) && !errors.Is(err, syscall.ESTALE):
				t.Fatalf("read with the host killed: %v, want EIO (down) or ESTALE", err)
			case how != "killed" && !errors.Is(err, syscall.ESTALE):
				t.Fatalf("read after the host let go (%s): %v, want ESTALE at once", how, err)
			}

			if how == "killed" {
				// Down already: the next read fails at once.
				if err := read("again with the host down", 8<<20, time.Second); !errors.Is(err, syscall.EIO) {
					t.Fatalf("a second read with the host down: %v, want EIO at once", err)
				}
			}
			st := guestStatus(t, dir)
			if st.Connected || st.Since.Before(letGo.Add(-time.Second)) {
				t.Fatalf("status: connected %v since %v; the host let go at %v", st.Connected, st.Since, letGo)
			}
			switch how {
			case "export removed":
				waitFor(t, "the guest to learn that the export is gone", func() bool { st = guestStatus(t, dir); return st.Gone != "" })
				if !strings.Contains(st.LastError, "no export") {
					t.Fatalf("status does not say the export is gone: %+v", st)
				}
				start := time.Now()
				if _, err := os.Open(filepath.Join(dir, "hello")); !errors.Is(err, syscall.ESTALE) || time.Since(start) > time.Second {
					t.Fatalf("an open in a removed export: %v after %v, want ESTALE at once", err, time.Since(start))
				}
				h.reload(t, true)
			default:
				h.start()
			}
			waitFor(t, "the guest to reconnect", func() bool { return guestStatus(t, dir).Connected })
			if err := read("with the host back", 12<<20, time.Second); !errors.Is(err, syscall.ESTALE) {
				t.Fatalf("read with the host back: %v, want ESTALE", err)
			}
			if _, err := os.Stat(filepath.Join(dir, "big")); !errors.Is(err, os.ErrNotExist) {
				// The host published nothing since: the guest's
				// generation still has it, and an open is refused.
				if _, err := os.ReadFile(filepath.Join(dir, "big")); err == nil {
					t.Fatal("the deleted file opened again")
				}
			}
			st = guestStatus(t, dir)
			if len(st.Fenced) == 0 {
				t.Fatalf("status lists no fenced file: %+v", st)
			}
			if how == "stopped" && !strings.Contains(st.Fenced[0].Why, "stopped") {
				t.Fatalf("fenced because %q; want the host's word that it stopped", st.Fenced[0].Why)
			}
		})
	}
}

// Small files rewritten in place (truncated, then written in pieces, as a
// naive mirror tool writes Packages and Release) and published again and
// again, while processes in two guests (one reading the device, one
// through the host) read them: every read gives one version, whole, at
// its own size — never one generation's size with another's bytes.
func TestSizeAndBytesFromOneGeneration(t *testing.T) {
	h, mnt, dev := newContractHost(t, false)
	names := []string{"Packages", "Release"}
	var mu sync.Mutex
	versions := map[string]bool{} // every content ever published, by string
	content := func(name string, round int) []byte {
		// Sizes that differ by little, as an index's do.
		n := 18387 + 13*(round%3) + len(name)
		b := bytes.Repeat([]byte(fmt.Sprintf("%s round %04d\n", name, round)), n/16+1)
		return b[:n]
	}
	rewrite := func(name string, b []byte) {
		f, err := os.OpenFile(filepath.Join(mnt, name), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			t.Error(err)
			return
		}
		pieces := 2 + mrand.IntN(3)
		for i := range pieces {
			if _, err := f.Write(b[i*len(b)/pieces : (i+1)*len(b)/pieces]); err != nil {
				t.Error(err)
			}
		}
		f.Close()
	}
	for _, n := range names {
		b := content(n, 0)
		versions[string(b)] = true
		rewrite(n, b)
	}
	h.publish(t)
	dirs := []string{
		guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev),
		guestMount(t, "--connect", h.guest, "--export", "mirror"),
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var good, refused int
	var failures []string
	for _, dir := range append(dirs, dirs...) {
		// A process that holds each file a while and reads it again to
		// its end, as a long-running reader does (a read to the end
		// asks the kernel to refresh the size, through this open file).
		wg.Go(func() {
			for {
				for _, name := range names {
					f, err := os.Open(filepath.Join(dir, name))
					if err != nil {
						continue
					}
					for range 100 {
						_, _ = io.Copy(io.Discard, io.NewSectionReader(f, 0, 1<<20))
						select {
						case <-stop:
							f.Close()
							return
						case <-time.After(5 * time.Millisecond):
						}
					}
					f.Close()
				}
			}
		})
	}
	for gi, dir := range dirs {
		for r := range 2 {
			wg.Go(func() {
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					name := names[(i+r)%len(names)]
					f, err := os.Open(filepath.Join(dir, name))
					if err != nil {
						mu.Lock()
						if errors.Is(err, syscall.ESTALE) || errors.Is(err, syscall.EBUSY) {
							refused++
						} else {
							failures = append(failures, fmt.Sprintf("guest %d: open: %v", gi, err))
						}
						mu.Unlock()
						continue
					}
					var st unix.Stat_t
					serr := unix.Fstat(int(f.Fd()), &st)
					b, rerr := io.ReadAll(f)
					f.Close()
					mu.Lock()
					switch {
					case serr != nil || rerr != nil:
						if !errors.Is(rerr, syscall.ESTALE) {
							failures = append(failures, fmt.Sprintf("guest %d: %s: stat %v, read %v", gi, name, serr, rerr))
						}
					case int64(len(b)) != st.Size || !versions[string(b)]:
						failures = append(failures, fmt.Sprintf("guest %d: %s: size %d, read %d bytes: %q…%q", gi, name, st.Size, len(b),
							b[:min(len(b), 24)], b[max(0, len(b)-24):]))
					default:
						good++
					}
					mu.Unlock()
				}
			})
		}
	}
	for round := 1; round <= 30; round++ {
		for _, n := range names {
			b := content(n, round)
			mu.Lock()
			versions[string(b)] = true
			mu.Unlock()
			rewrite(n, b)
		}
		h.publish(t)
		time.Sleep(time.Duration(100+mrand.IntN(300)) * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("%d whole reads of one version, %d opens refused while a rewrite was unpublished", good, refused)
	for i, f := range failures {
		if i == 10 {
			t.Errorf("… and %d more", len(failures)-10)
			break
		}
		t.Error(f)
	}
	if good < 100 {
		t.Fatalf("only %d good reads", good)
	}
}

// A file is overwritten in place on the host (cp over it: the same
// inode, truncated and written) while a guest process holds it open and
// has read part of it. That process reads on: the old bytes, or ESTALE,
// never the new — even after another process of the guest opened the
// file anew and read the new bytes into its page cache.
func TestFencedFileNeverReadsNewBytes(t *testing.T) {
	h, mnt, dev := newContractHost(t, false)
	const size = 8 << 20
	oldData, newData := randomBytes(t, size), randomBytes(t, size)
	if err := os.WriteFile(filepath.Join(mnt, "file"), oldData, 0o644); err != nil {
		t.Fatal(err)
	}
	newPath := filepath.Join(t.TempDir(), "new")
	if err := os.WriteFile(newPath, newData, 0o644); err != nil {
		t.Fatal(err)
	}
	h.publish(t)
	dirs := []string{
		guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev),
		guestMount(t, "--connect", h.guest, "--export", "mirror"),
	}
	files := make([]*os.File, len(dirs))
	for i, dir := range dirs {
		f, err := os.Open(filepath.Join(dir, "file"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		first := make([]byte, 2500000)
		if _, err := io.ReadFull(f, first); err != nil || !bytes.Equal(first, oldData[:len(first)]) {
			t.Fatalf("%s: the first 2.5 MB: %v", dir, err)
		}
		files[i] = f
	}
	checkOld := func(i int, what string, off int64) {
		t.Helper()
		b := make([]byte, 1<<20)
		n, err := files[i].ReadAt(b, off)
		if n > 0 && !bytes.Equal(b[:n], oldData[off:off+int64(n)]) {
			which := "other"
			if bytes.Equal(b[:n], newData[off:off+int64(n)]) {
				which = "the new version's"
			}
			t.Fatalf("guest %d: %s: the held file read %s bytes at %d (%v)", i, what, which, off, err)
		}
		if err != nil && !errors.Is(err, syscall.ESTALE) && !errors.Is(err, io.EOF) {
			t.Fatalf("guest %d: %s: %v, want the old bytes or ESTALE", i, what, err)
		}
	}
	if out, err := exec.Command("cp", newPath, filepath.Join(mnt, "file")).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v\n%s", err, out)
	}
	h.publish(t)
	for i, dir := range dirs {
		checkOld(i, "after the overwrite", 2500000)
		waitFor(t, "a new open to read the new version", func() bool {
			b, err := os.ReadFile(filepath.Join(dir, "file"))
			return err == nil && bytes.Equal(b, newData)
		})
		for _, off := range []int64{0, 2500000, 4 << 20, size - 1<<20} {
			checkOld(i, "after a new open read the new version", off)
		}
	}
}

// A running program whose binary the host replaces by rename (as dpkg
// does), and a file a process holds: each can be opened again through
// /proc (/proc/PID/exe, /proc/self/fd/N), as on a local filesystem, and
// reads the version held.
func TestHeldFileCanBeReopened(t *testing.T) {
	h, mnt, dev := newContractHost(t, false)
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatal(err)
	}
	prog, err := os.ReadFile(sleep)
	if err != nil {
		t.Fatal(err)
	}
	oldData := randomBytes(t, 3<<20)
	for name, b := range map[string][]byte{"sleep": prog, "data": oldData} {
		if err := os.WriteFile(filepath.Join(mnt, name), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	h.publish(t)
	dirs := []string{
		guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev),
		guestMount(t, "--connect", h.guest, "--export", "mirror"),
	}
	type held struct {
		pid int
		f   *os.File
	}
	var helds []held
	for _, dir := range dirs {
		cmd := exec.Command(filepath.Join(dir, "sleep"), "60")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		f, err := os.Open(filepath.Join(dir, "data"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		helds = append(helds, held{cmd.Process.Pid, f})
	}
	// dpkg: NAME.dpkg-new, then renamed over NAME.
	for name, b := range map[string][]byte{"sleep": append(bytes.Clone(prog), "new"...), "data": randomBytes(t, 3<<20)} {
		tmp := filepath.Join(mnt, name+".dpkg-new")
		if err := os.WriteFile(tmp, b, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(mnt, name)); err != nil {
			t.Fatal(err)
		}
	}
	h.publish(t)
	for i, dir := range dirs {
		waitFor(t, "the guest to serve the new version", func() bool {
			st, err := os.Stat(filepath.Join(dir, "sleep"))
			return err == nil && st.Size() == int64(len(prog))+3
		})
		for what, c := range map[string]struct {
			path string
			want []byte
		}{
			"/proc/PID/exe of a program replaced": {fmt.Sprintf("/proc/%d/exe", helds[i].pid), prog},
			"/proc/self/fd/N of a file replaced":  {fmt.Sprintf("/proc/self/fd/%d", helds[i].f.Fd()), oldData},
		} {
			b, err := os.ReadFile(c.path)
			if err != nil {
				t.Fatalf("guest %d: %s: %v", i, what, err)
			}
			if !bytes.Equal(b, c.want) {
				t.Fatalf("guest %d: %s: %d bytes, not the version held (%d bytes)", i, what, len(b), len(c.want))
			}
			if st, err := os.Stat(c.path); err != nil || st.Size() != int64(len(c.want)) {
				t.Fatalf("guest %d: %s: stat: %v", i, what, err)
			}
		}
	}
}

// The guest reconnects (the host agent upgrades in place) to a host that
// wrote much since its last publish: the device, checked again, is
// still the export's disk, and file data still comes from it.
func TestDeviceVerifiesAfterAReconnect(t *testing.T) {
	h, mnt, dev := newContractHost(t, false)
	dir := guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev)
	if st := guestStatus(t, dir); st.Device == nil || st.Device.State != guestagent.DeviceVerified {
		t.Fatalf("device at the mount: %+v", st.Device)
	}
	// Every inode-table block the check samples changes, and reaches
	// the disk (a freeze writes the journal home).
	for i := range 400 {
		if err := os.WriteFile(filepath.Join(mnt, fmt.Sprintf("f%03d", i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, arg := range []string{"-f", "-u"} {
		if out, err := exec.Command("fsfreeze", arg, mnt).CombinedOutput(); err != nil {
			t.Fatalf("fsfreeze %s: %v\n%s", arg, err, out)
		}
	}
	before := guestStatus(t, dir)
	if err := h.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	var st *guestagent.Status
	waitFor(t, "the guest to check its device again", func() bool {
		st = guestStatus(t, dir)
		return st.Connected && st.Reconnects > before.Reconnects && st.Device != nil && st.Device.Checked.After(before.Device.Checked)
	})
	if st.Device.State != guestagent.DeviceVerified {
		t.Fatalf("after the reconnect the device is %s: %s", st.Device.State, st.Device.Detail)
	}
	t.Logf("device after the reconnect: %s", st.Device.Detail)
	if b, err := os.ReadFile(filepath.Join(dir, "hello")); err != nil || string(b) != "generation one\n" {
		t.Fatalf("hello: %q %v", b, err)
	}
}

// The host agent stalls (SIGSTOP) past its lease time (--grace): the
// guests stop reading held files from the device, since they can no
// longer know that the host holds them; a soft mount fails such reads
// with EIO, a hard one waits. When the host answers again, the session
// goes on and so do the reads, with the file's bytes.
func TestLeaseTimeBoundsDeviceReads(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	t.Setenv("LEASEFS_RUN_DIR", filepath.Join(run, "guests"))
	const size = 16 << 20
	data := randomBytes(t, size)
	if err := os.WriteFile(filepath.Join(mnt, "big"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	guest := "unix:" + filepath.Join(run, "guest.sock")
	a := newAgent(t, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", guest, "--control", "unix:"+filepath.Join(run, "control.sock"),
		"--state-dir", filepath.Join(run, "state"), "--auto-publish", "off", "--grace", "2s")
	var files []*os.File
	for _, down := range []string{"soft=1s", "hard"} {
		dir := guestMount(t, "--connect", guest, "--export", "mirror", "--device", dev, "--down", down)
		f, err := os.Open(filepath.Join(dir, "big"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files = append(files, f)
	}
	read := func(f *os.File, off int64) error {
		b := make([]byte, 256<<10)
		n, err := f.ReadAt(b, off)
		if !bytes.Equal(b[:n], data[off:off+int64(n)]) {
			t.Errorf("read %d bytes at %d that are not the file's (%v)", n, off, err)
		}
		return err
	}
	for _, f := range files {
		if err := read(f, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	defer func() {
		if stopped {
			_ = a.Signal(syscall.SIGCONT)
		}
	}()
	time.Sleep(2500 * time.Millisecond) // past the lease time, less its margin
	if err := read(files[0], 8<<20); !errors.Is(err, syscall.EIO) {
		t.Fatalf("soft: a read past the lease time with the host stalled: %v, want EIO", err)
	}
	hard := make(chan error, 1)
	go func() { hard <- read(files[1], 8<<20) }()
	select {
	case err := <-hard:
		t.Fatalf("hard: a read past the lease time with the host stalled returned: %v", err)
	case <-time.After(1500 * time.Millisecond):
	}
	if err := a.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	stopped = false
	select {
	case err := <-hard:
		if err != nil {
			t.Fatalf("hard: the read waiting for the host: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("hard: the read still waits with the host back")
	}
	if err := read(files[0], 12<<20); err != nil {
		t.Fatalf("soft: a read with the host back: %v", err)
	}
}
