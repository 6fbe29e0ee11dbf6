package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/guestagent"
	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/internal/hosttest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// jsonOf runs leasefs with args, which print JSON, and decodes it.
func jsonOf[T any](t *testing.T, args ...string) *T {
	t.Helper()
	out, err := leasefs(t, args...)
	if err != nil {
		t.Fatalf("leasefs %v: %v\n%s", args, err, out)
	}
	var v T
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return &v
}

// hostStatus asks the agent on control for its status.
func hostStatus(t *testing.T, control string) *hostagent.Status {
	t.Helper()
	return jsonOf[hostagent.Status](t, "status", "--json", "--control", control)
}

func guestStatus(t *testing.T, dir string) *guestagent.Status {
	t.Helper()
	return jsonOf[guestagent.Status](t, "guest", "status", "--json", dir)
}

// fillExport deletes name from the export at mnt and fills the
// filesystem with other bytes until it is full, so that the deleted
// file's blocks would be reused were they free.
func fillExport(t *testing.T, mnt, name string) {
	t.Helper()
	if err := os.Remove(filepath.Join(mnt, name)); err != nil {
		t.Fatal(err)
	}
	junk := bytes.Repeat([]byte{0xEE}, 1<<20)
	for i := 0; ; i++ {
		if err := os.WriteFile(filepath.Join(mnt, "junk"+strconv.Itoa(i)), junk, 0o644); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	unix.Sync()
}

// unreaped is zombies(pid) once it is 0 or 5 s have passed: the watchdog
// a run leaves is reaped by the next as it exits, a moment after the
// upgrade, not never.
func unreaped(pid int) int {
	n := zombies(pid)
	for deadline := time.Now().Add(5 * time.Second); n > 0 && time.Now().Before(deadline); n = zombies(pid) {
		time.Sleep(20 * time.Millisecond)
	}
	return n
}

// zombies counts pid's children that have exited and not been waited
// for.
func zombies(pid int) int {
	n := 0
	tasks, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/children")
	for _, p := range tasks {
		b, _ := os.ReadFile(p)
		for _, c := range strings.Fields(string(b)) {
			st, _ := os.ReadFile("/proc/" + c + "/stat")
			if f := strings.Fields(string(st)); len(f) > 2 && f[2] == "Z" {
				n++
			}
		}
	}
	return n
}

// The agent is upgraded in place, by SIGUSR2 and by 'leasefs host
// --upgrade', twice each, while two guests (one reading the shared
// device, one through the host) read a file the host has deleted, and
// whose blocks would have been reused: they read its original bytes to
// the end. The agent keeps its pid and sockets; guests resume their
// sessions on their generation, with nothing fenced; a writer's break
// still reaches the guests after the upgrade; an upgrade to a binary that
// does not run is refused and the agent goes on.
func TestUpgradeInPlace(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	t.Setenv("LEASEFS_RUN_DIR", filepath.Join(run, "guests"))
	data := make([]byte, 8<<20)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	if err := os.WriteFile(filepath.Join(mnt, "big"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	// The agent runs from a copy, which the test replaces as an
	// operator installs a new version.
	bin := filepath.Join(run, "bin", "leasefs")
	install := func(from string) {
		t.Helper()
		tmp := bin + ".new"
		if out, err := exec.Command("install", "-D", "-m", "0755", from, tmp).CombinedOutput(); err != nil {
			t.Fatalf("install: %v\n%s", err, out)
		}
		if err := os.Rename(tmp, bin); err != nil {
			t.Fatal(err)
		}
	}
	install(leasefsBin)
	control, guest := "unix:"+filepath.Join(run, "control.sock"), "unix:"+filepath.Join(run, "guest.sock")
	a := &hostProc{t: t, mnt: mnt, Agent: &hosttest.Agent{Prog: bin, Args: []string{"host", "--export", "mirror=" + dev + ":" + mnt,
		"--listen", guest, "--control", control, "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off"}}}
	a.start()
	t.Cleanup(func() {
		if a.Pid() != 0 {
			a.stop(syscall.SIGTERM)
		}
		waitGone(t, mnt)
	})
	pid := a.Pid()
	dirs := []string{
		guestMount(t, "--connect", guest, "--export", "mirror", "--device", dev),
		guestMount(t, "--connect", guest, "--export", "mirror"),
	}
	const chunk = 1 << 20
	var files, small []*os.File
	for _, dir := range dirs {
		f, err := os.Open(filepath.Join(dir, "big"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		s, err := os.Open(filepath.Join(dir, "hello"))
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		files, small = append(files, f), append(small, s)
	}
	got := make([][]byte, len(files))
	readChunk := func(what string) {
		t.Helper()
		for i, f := range files {
			b := make([]byte, chunk)
			n, err := io.ReadFull(f, b)
			if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
				t.Fatalf("%s: guest %d reading the deleted file: %v\nagent log:\n%s", what, i, err, a.Log)
			}
			got[i] = append(got[i], b[:n]...)
		}
	}
	readChunk("before")
	fillExport(t, mnt, "big")
	if out, err := leasefs(t, "publish", "--control", control, "mirror"); err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	readChunk("after the refill")

	upgraded := func(before time.Time) *hostagent.Status {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			out, err := leasefs(t, "status", "--json", "--control", control)
			var st hostagent.Status
			if err == nil && json.Unmarshal([]byte(out), &st) == nil && !st.Started.Equal(before) {
				return &st
			}
		}
		t.Fatalf("the agent did not come back as a new run:\n%s", a.Log)
		return nil
	}
	for round := 1; round <= 4; round++ {
		before := hostStatus(t, control)
		gen := before.Exports[0].Generation
		for deadline := time.Now().Add(10 * time.Second); guestStatus(t, dirs[0]).Generation != gen; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the guest is not on generation %d", gen)
			}
		}
		if before.Exports[0].Files < 2 {
			t.Fatalf("round %d: the agent holds %d files before the upgrade, want big and hello", round, before.Exports[0].Files)
		}
		if round%2 == 1 {
			if err := a.Signal(syscall.SIGUSR2); err != nil {
				t.Fatal(err)
			}
			if round == 3 {
				// A reload asked for at once: in the moment of the exec
				// it must not end the agent.
				for range 20 {
					_ = a.Signal(syscall.SIGHUP)
					time.Sleep(5 * time.Millisecond)
				}
			}
		} else {
			out, err := leasefs(t, "host", "--upgrade", "--control", control)
			if err != nil || !strings.Contains(out, "upgraded:") {
				t.Fatalf("host --upgrade: %v\n%s", err, out)
			}
		}
		after := upgraded(before.Started)
		if a.Pid() != pid || after.Exports[0].Generation != before.Exports[0].Generation ||
			after.Exports[0].Kept != before.Exports[0].Kept || after.Exports[0].Files != before.Exports[0].Files ||
			after.Exports[0].Leases != before.Exports[0].Leases {
			t.Fatalf("round %d: before %+v\nafter %+v", round, before.Exports[0], after.Exports[0])
		}
		readChunk("after upgrade " + strconv.Itoa(round))
		for i, dir := range dirs {
			st := guestStatus(t, dir)
			for deadline := time.Now().Add(10 * time.Second); st.Resumes < round && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
				st = guestStatus(t, dir)
			}
			if len(st.Fenced) > 0 || st.OpenFiles != 2 || st.Resumes < round {
				t.Fatalf("round %d: guest %d after the upgrade: %d open, %d resumes, fenced %+v", round, i, st.OpenFiles, st.Resumes, st.Fenced)
			}
			if i == 0 && st.Generation != gen {
				t.Fatalf("round %d: the guest moved from generation %d to %d: its generation was not kept", round, gen, st.Generation)
			}
		}
		if n := unreaped(pid); n > 0 {
			t.Errorf("round %d: %d exited children not reaped (the old watchdogs)", round, n)
		}
	}
	if strings.Count(a.Log.String(), "taking over from the agent before the upgrade") != 4 {
		t.Errorf("the log does not show 4 takeovers:\n%s", a.Log)
	}
	for len(got[0]) < len(data) || len(got[1]) < len(data) {
		readChunk("to the end")
	}
	for i := range got {
		if !bytes.Equal(got[i], data) {
			t.Fatalf("guest %d read %d bytes, not the deleted file's", i, len(got[i]))
		}
	}

	// The leases were taken again for the new run: a writer's open
	// waits for the guests' acks (a break nobody hears would hold it
	// for the kernel's lease-break-time), and their handles go stale.
	start := time.Now()
	if err := os.WriteFile(filepath.Join(mnt, "hello"), nil, 0o644); err != nil && !errors.Is(err, syscall.ENOSPC) {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("the writer waited %v: the upgraded agent did not hear the break", d)
	}
	for i, s := range small {
		if _, err := s.ReadAt(make([]byte, 4), 0); !errors.Is(err, syscall.ESTALE) {
			t.Fatalf("guest %d: a broken file reads %v, want ESTALE", i, err)
		}
	}

	// A binary that does not run is not exec'd: the agent goes on.
	bad := filepath.Join(run, "bad")
	if err := os.WriteFile(bad, []byte("#!/bin/sh\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	install(bad)
	before := hostStatus(t, control)
	out, err := leasefs(t, "upgrade", "--control", control)
	if err == nil || !strings.Contains(out, "does not run") {
		t.Fatalf("an upgrade to a broken binary: %v\n%s", err, out)
	}
	if err := a.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(a.Log.String(), "upgrade refused"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no word of the refused upgrade:\n%s", a.Log)
		}
	}
	if st := hostStatus(t, control); !st.Started.Equal(before.Started) {
		t.Fatal("the agent restarted on a broken binary")
	}
	// Nor one from before upgrades in place, which would not take over.
	old := filepath.Join(run, "old")
	if err := os.WriteFile(old, []byte("#!/bin/sh\n[ \"$2\" = --handover ] && exit 2\necho leasefs 0.9\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	install(old)
	out, err = leasefs(t, "upgrade", "--control", control)
	if err == nil || !strings.Contains(out, "cannot take over from this one") || !strings.Contains(out, "leasefs 0.9") {
		t.Fatalf("an upgrade to a binary that cannot take over: %v\n%s", err, out)
	}
	if st := hostStatus(t, control); !st.Started.Equal(before.Started) {
		t.Fatal("the agent restarted on a binary that cannot take over")
	}
	install(leasefsBin) // for the stop's 'leasefs thaw', and the cleanup
}

// prepare sets up a's next start as systemd would (testenv.FakeSystemd).
func (s *fakeSystemd) prepare(a *hostProc, bin string, args []string, v254 bool) {
	a.Prog, a.Args, a.Env, a.Extra = s.Start(bin, args, v254)
}

type fakeSystemd struct{ *testenv.FakeSystemd }

func newFakeSystemd(t *testing.T) fakeSystemd { return fakeSystemd{testenv.NewFakeSystemd(t)} }

// The agent keeps the files guests hold in systemd's fd store: it is
// killed (a crash) and stopped (systemctl restart) and started again
// with what the store kept, while two guests (device, and through the
// host) read a file the host deleted and whose blocks would be reused.
// A device read while no agent runs waits for the next (the guest cannot
// know that the store keeps the lease). They resume their sessions and read its original bytes to the end. A
// writer that opens a held file while no agent runs waits for it (the
// store kept the lease), is let go as soon as the next run starts, and
// the guests' handles of that file go stale. A file the guests close
// leaves the store.
func TestRestartWithFDStore(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	t.Setenv("LEASEFS_RUN_DIR", filepath.Join(run, "guests"))
	data := make([]byte, 8<<20)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	for name, b := range map[string][]byte{"big": data, "wanted": []byte("written while the agent is away\n")} {
		if err := os.WriteFile(filepath.Join(mnt, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	sd := newFakeSystemd(t)
	control, guest := "unix:"+filepath.Join(run, "control.sock"), "unix:"+filepath.Join(run, "guest.sock")
	args := []string{"host", "--export", "mirror=" + dev + ":" + mnt, "--listen", guest, "--control", control,
		"--state-dir", filepath.Join(run, "state"), "--auto-publish", "off", "--grace", "60s"}
	a := &hostProc{t: t, mnt: mnt, Agent: &hosttest.Agent{}}
	sd.prepare(a, leasefsBin, args, true)
	a.start()
	t.Cleanup(func() {
		if a.Pid() != 0 {
			a.stop(syscall.SIGTERM)
		}
		waitGone(t, mnt)
	})
	// Closed files' leases linger 2 s, then leave the store.
	dirs := []string{
		guestMount(t, "--connect", guest, "--export", "mirror", "--device", dev, "--lease-linger", "2s"),
		guestMount(t, "--connect", guest, "--export", "mirror", "--lease-linger", "2s"),
	}
	var files, wanted []*os.File
	for _, dir := range dirs {
		for _, name := range []string{"big", "wanted"} {
			f, err := os.Open(filepath.Join(dir, name))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if name == "big" {
				files = append(files, f)
			} else {
				wanted = append(wanted, f)
			}
		}
	}
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(mnt, "big"), &st); err != nil {
		t.Fatal(err)
	}
	bigName := "lease.mirror." + strconv.FormatUint(st.Ino, 10)
	for deadline := time.Now().Add(5 * time.Second); len(sd.Names()) != 2; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the store holds %v, want big and wanted", sd.Names())
		}
	}
	got := make([][]byte, len(files))
	readChunk := func(what string, only ...int) {
		t.Helper()
		for i, f := range files {
			if only != nil && !slices.Contains(only, i) {
				continue
			}
			b := make([]byte, 1<<20)
			n, err := io.ReadFull(f, b)
			if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
				t.Fatalf("%s: guest %d reading the deleted file: %v\nagent log:\n%s", what, i, err, a.Log)
			}
			got[i] = append(got[i], b[:n]...)
		}
	}
	readChunk("before")
	fillExport(t, mnt, "big")

	for round, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM} {
		a.stop(sig)
		var writer chan error
		if round == 0 {
			writer = make(chan error, 1)
			go func() {
				f, err := os.OpenFile(filepath.Join(mnt, "wanted"), os.O_WRONLY|os.O_APPEND, 0)
				if err == nil {
					_, err = f.WriteString("more\n")
					f.Close()
				}
				writer <- err
			}()
			select {
			case err := <-writer:
				t.Fatalf("a writer went past a file the store holds leased: %v", err)
			case <-time.After(500 * time.Millisecond):
			}
		}
		// The guest reading the device cannot know that the store
		// keeps its lease: its read waits for the host (--down).
		type result struct {
			b   []byte
			err error
		}
		const off = 7 << 20
		waiting := make(chan result, 1)
		go func() {
			// Not from the page cache.
			if err := unix.Fadvise(int(files[0].Fd()), off, 1<<20, unix.FADV_DONTNEED); err != nil {
				waiting <- result{nil, err}
				return
			}
			b := make([]byte, 256<<10)
			n, err := files[0].ReadAt(b, off)
			waiting <- result{b[:n], err}
		}()
		select {
		case r := <-waiting:
			t.Fatalf("a read of the device while no agent runs returned: %d bytes, %v", len(r.b), r.err)
		case <-time.After(500 * time.Millisecond):
		}
		sd.prepare(a, leasefsBin, args, round == 1)
		a.start()
		select {
		case r := <-waiting:
			if r.err != nil || !bytes.Equal(r.b, data[off:off+len(r.b)]) {
				t.Fatalf("the read that waited for the host: %d bytes, %v\nagent log:\n%s", len(r.b), r.err, a.Log)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("the read that waited for the host still waits with the host back")
		}
		if writer != nil {
			select {
			case err := <-writer:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("the writer still waits after the restart:\n%s", a.Log)
			}
		}
		readChunk("after restart " + strconv.Itoa(round))
		for i, dir := range dirs {
			st := guestStatus(t, dir)
			for deadline := time.Now().Add(10 * time.Second); st.Resumes <= round && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
				st = guestStatus(t, dir)
			}
			if st.Resumes <= round || len(st.Fenced) != 1 || !strings.HasSuffix(st.Fenced[0].Path, "/wanted") {
				t.Fatalf("round %d: guest %d: %d resumes, fenced %+v; want %d resumes and wanted fenced\nagent:\n%s", round, i, st.Resumes, st.Fenced, round+1, a.Log)
			}
		}
	}
	for i, w := range wanted {
		if _, err := w.ReadAt(make([]byte, 4), 0); !errors.Is(err, syscall.ESTALE) {
			t.Fatalf("guest %d: the file written while the agent was away reads %v, want ESTALE", i, err)
		}
	}
	for len(got[0]) < len(data) || len(got[1]) < len(data) {
		readChunk("to the end")
	}
	for i := range got {
		if !bytes.Equal(got[i], data) {
			t.Fatalf("guest %d read %d bytes, not the deleted file's", i, len(got[i]))
		}
	}
	if !strings.Contains(a.Log.String(), "took over the last run's leases") {
		t.Errorf("the log does not say what was taken over:\n%s", a.Log)
	}
	for _, f := range files {
		f.Close()
	}
	for deadline := time.Now().Add(10 * time.Second); slices.Contains(sd.Names(), bigName); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the store still holds the closed file: %v", sd.Names())
		}
	}
}

// An upgrade reads the settings again, as the new binary starts: an
// export the file no longer has is let go (its held file's writer is not
// held up), and a listen address that went is closed and its socket removed; the export kept is
// taken over with its guest's open file.
func TestUpgradeWithChangedSettings(t *testing.T) {
	mntA, devA := hostExport(t)
	mntB, devB := hostExport(t)
	run := t.TempDir()
	t.Setenv("LEASEFS_RUN_DIR", filepath.Join(run, "guests"))
	conf := filepath.Join(run, "host.toml")
	control := "unix:" + filepath.Join(run, "control.sock")
	guest1, guest2 := filepath.Join(run, "guest1.sock"), filepath.Join(run, "guest2.sock")
	write := func(listen string, exports ...string) {
		lines := []string{fmt.Sprintf("state_dir = %q", filepath.Join(run, "state")), fmt.Sprintf("control = %q", control),
			`auto-publish = "off"`, "listen = [" + listen + "]"}
		hostConfig(t, conf, append(lines, exports...)...)
	}
	exportA := fmt.Sprintf("[export.a]\ndevice = %q\nmount = %q", devA, mntA)
	exportB := fmt.Sprintf("[export.b]\ndevice = %q\nmount = %q", devB, mntB)
	write(fmt.Sprintf("%q, %q", "unix:"+guest1, "unix:"+guest2), exportA, exportB)
	a := &hostProc{t: t, mnt: mntA, Agent: &hosttest.Agent{Args: []string{"host", "--config", conf}}}
	a.start()
	t.Cleanup(func() {
		if a.Pid() != 0 {
			a.stop(syscall.SIGTERM)
		}
		waitGone(t, mntA)
		waitGone(t, mntB)
	})
	ga := guestMount(t, "--connect", "unix:"+guest1, "--export", "a", "--device", devA)
	gb := guestMount(t, "--connect", "unix:"+guest2, "--export", "b", "--device", devB)
	fa, err := os.Open(filepath.Join(ga, "hello"))
	if err != nil {
		t.Fatal(err)
	}
	defer fa.Close()
	fb, err := os.Open(filepath.Join(gb, "hello"))
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	before := hostStatus(t, control)

	// Settings the new binary would refuse: the upgrade is refused, and
	// the agent goes on (the new run would have ended on them).
	hostConfig(t, conf, "listen = [", "bogus = 1")
	out, err := leasefs(t, "upgrade", "--control", control)
	if err == nil || !strings.Contains(out, "refuses the agent's settings") || !strings.Contains(out, conf) {
		t.Fatalf("an upgrade with broken settings: %v\n%s", err, out)
	}
	if st := hostStatus(t, control); !st.Started.Equal(before.Started) || len(st.Exports) != 2 {
		t.Fatalf("after a refused upgrade: started %v (was %v), %d exports", st.Started, before.Started, len(st.Exports))
	}

	write(fmt.Sprintf("%q", "unix:"+guest1), exportA)
	out, err = leasefs(t, "upgrade", "--control", control)
	if err != nil {
		t.Fatalf("upgrade: %v\n%s", err, out)
	}
	after := hostStatus(t, control)
	if len(after.Exports) != 1 || after.Exports[0].Name != "a" || after.Exports[0].Generation != before.Exports[0].Generation ||
		after.Exports[0].Files != 1 {
		t.Fatalf("after the upgrade: %+v", after.Exports)
	}
	if _, err := os.Lstat(guest2); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the socket of the address that went is still there: %v", err)
	}
	// b's file was let go: a writer goes on at once.
	start := time.Now()
	if err := os.WriteFile(filepath.Join(mntB, "hello"), []byte("rewritten\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("a writer of a file of the export let go waited %v", d)
	}
	if b, err := io.ReadAll(io.NewSectionReader(fa, 0, 100)); err != nil || string(b) != "generation one\n" {
		t.Fatalf("the open file of the export kept: %q %v", b, err)
	}
}

// Upgrades at the worst moment: a writer replaces files continuously,
// 'leasefs publish' runs every second (as a mirror's sync job does) and
// processes in two guests read, while the agent is upgraded again and
// again. No read is torn, no publish fails, the guests follow the
// generations, and every upgrade is a new run in the same process.
func TestUpgradeUnderLoad(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	t.Setenv("LEASEFS_RUN_DIR", filepath.Join(run, "guests"))
	control, guest := "unix:"+filepath.Join(run, "control.sock"), "unix:"+filepath.Join(run, "guest.sock")
	// Under -race an upgrade takes over a second (the new binary's
	// 'leasefs version' runs first), and publishes wait for it.
	tt := testenv.Torture{Dir: mnt, Files: 200, For: 12 * time.Second, Pause: 2 * time.Millisecond,
		Min: testenv.TortureResults{Reads: 200, Generations: 3, Replaced: 200}}
	tt.Populate(t)
	a := newAgent(t, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", guest, "--control", control,
		"--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	pid := a.Pid()
	tt.Readers = []string{
		guestMount(t, "--connect", guest, "--export", "mirror", "--device", dev),
		guestMount(t, "--connect", guest, "--export", "mirror"),
	}
	// The clients, which run many times, without the race detector.
	tt.Publish = func() error {
		if out, err := exec.Command(leasefsBinNoRace, "publish", "--control", control, "mirror").CombinedOutput(); err != nil {
			return fmt.Errorf("%v\n%s\nagent log:\n%s", err, out, a.Log)
		}
		return nil
	}

	// The upgrader ends with the test however it ends: a goroutine of
	// the test's that outlives it panics the whole test binary, and
	// every other test's mounts stay behind.
	before := hostStatus(t, control).Started
	stop, done := make(chan struct{}), make(chan struct{})
	var once sync.Once
	halt := func() { once.Do(func() { close(stop) }); <-done }
	n := 0
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(1500 * time.Millisecond):
			}
			if err := a.Signal(syscall.SIGUSR2); err != nil {
				t.Error(err)
				return
			}
			for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Errorf("upgrade %d: the agent did not come back as a new run:\n%s", n+1, a.Log)
					return
				}
				var st hostagent.Status
				out, err := exec.Command(leasefsBinNoRace, "status", "--json", "--control", control).Output()
				if err == nil && json.Unmarshal(out, &st) == nil && !st.Started.Equal(before) {
					before = st.Started
					break
				}
			}
			n++
			// The next upgrade waits for both guests to have resumed: one
			// still reconnecting would resume once for two upgrades.
			for i, dir := range tt.Readers {
				for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
					var st guestagent.Status
					out, err := exec.Command(leasefsBinNoRace, "guest", "status", "--json", dir).Output()
					if err == nil && json.Unmarshal(out, &st) == nil && st.Resumes >= n {
						break
					}
					if time.Now().After(deadline) {
						t.Errorf("upgrade %d: guest %d did not resume its session (%d resumes):\n%s", n, i, st.Resumes, a.Log)
						return
					}
				}
			}
		}
	}()
	t.Cleanup(halt)
	tt.Run(t)
	halt()
	if n < 2 {
		t.Fatalf("%d upgrades during the load, want at least 2", n)
	}
	if n := unreaped(pid); a.Pid() != pid || n > 0 {
		t.Fatalf("after the upgrades: pid %d (was %d), %d unreaped children", a.Pid(), pid, n)
	}
	// Their sessions were resumed each time: nothing was fenced.
	for i, dir := range tt.Readers {
		if st := guestStatus(t, dir); len(st.Fenced) > 0 || st.Resumes < n {
			t.Errorf("guest %d: %d resumes in %d upgrades; fenced %+v", i, st.Resumes, n, st.Fenced)
		}
	}
	// The guests are on the last generation, and read what it has.
	out, err := leasefs(t, "publish", "--control", control, "mirror")
	if err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	gen := hostStatus(t, control).Exports[0].Generation
	for i, dir := range tt.Readers {
		for deadline := time.Now().Add(20 * time.Second); guestStatus(t, dir).Generation != gen; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("guest %d is on generation %d, not %d", i, guestStatus(t, dir).Generation, gen)
			}
		}
		for f := range tt.Files {
			b, err := os.ReadFile(filepath.Join(dir, fmt.Sprint("f", f)))
			if err != nil || !testenv.Valid(b) {
				t.Fatalf("guest %d: f%d: %v (valid: %v)", i, f, err, testenv.Valid(b))
			}
		}
	}
}

// Operators and cron jobs do not coordinate: two upgrades (in both
// spellings), two publishes and two status at the same moment all get
// their answer (none sees its connection end under it), and the two
// upgrades make one new run.
func TestUpgradeAnswersEveryControlRequest(t *testing.T) {
	mnt, dev := hostExport(t)
	run := t.TempDir()
	control := "unix:" + filepath.Join(run, "control.sock")
	a := newAgent(t, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", "unix:"+filepath.Join(run, "guest.sock"),
		"--control", control, "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	const rounds = 3
	for round := 1; round <= rounds; round++ {
		before := hostStatus(t, control).Started
		reqs := [][]string{
			{"upgrade", "--control", control}, {"host", "--upgrade", "--control", control},
			{"publish", "--control", control, "mirror"}, {"publish", "--control", control, "mirror"},
			{"status", "--control", control}, {"status", "--control", control},
		}
		errs := make(chan error, len(reqs))
		for _, args := range reqs {
			go func() {
				if out, err := leasefs(t, args...); err != nil {
					errs <- fmt.Errorf("round %d: leasefs %s: %v\n%s", round, strings.Join(args, " "), err, out)
					return
				}
				errs <- nil
			}()
		}
		var failed []error
		for range reqs { // all of them, before the test may end
			if err := <-errs; err != nil {
				failed = append(failed, err)
			}
		}
		if len(failed) > 0 {
			t.Fatalf("%v\nagent log:\n%s", errors.Join(failed...), a.Log)
		}
		if st := hostStatus(t, control); st.Started.Equal(before) {
			t.Fatalf("round %d: no new run", round)
		}
	}
	if n := strings.Count(a.Log.String(), "taking over from the agent before the upgrade"); n < rounds || n > 2*rounds {
		t.Fatalf("%d takeovers in %d rounds of two upgrades each", n, rounds)
	}
}

// Sixteen VMs of a Firecracker host (an hvsock-dir listener, one socket
// each, sockets the new run binds again) each hold a file the host then
// deletes and overwrites; two upgrades later every guest resumed its
// session, nothing was fenced, and each reads its file's original bytes
// to the end.
func TestUpgradeWithSixteenVMs(t *testing.T) {
	const vms = 16
	mnt, dev := hostExport(t)
	run := t.TempDir()
	t.Setenv("LEASEFS_RUN_DIR", filepath.Join(run, "guests"))
	dir := filepath.Join(run, "vms")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	want := make([][]byte, vms)
	for i := range vms {
		want[i] = bytes.Repeat([]byte{byte('a' + i)}, 256<<10)
		if err := os.WriteFile(filepath.Join(mnt, fmt.Sprint("vm", i)), want[i], 0o644); err != nil {
			t.Fatal(err)
		}
		vmSocket(t, filepath.Join(dir, fmt.Sprintf("vm%d.sock", i)))
	}
	control := "unix:" + filepath.Join(run, "control.sock")
	a := newAgent(t, mnt, "host", "--export", "mirror="+dev+":"+mnt, "--listen", "hvsock-dir:"+dir+":5000",
		"--control", control, "--state-dir", filepath.Join(run, "state"), "--auto-publish", "off")
	pid := a.Pid()
	mounts := make([]string, vms)
	files := make([]*os.File, vms)
	for i := range vms {
		sock := filepath.Join(dir, fmt.Sprintf("vm%d.sock_5000", i))
		waitFor(t, sock, func() bool { return exists(sock) })
		args := []string{"--connect", "unix:" + sock, "--export", "mirror"}
		if i%2 == 0 {
			args = append(args, "--device", dev)
		}
		mounts[i] = guestMountOf(t, leasefsBinNoRace, args...)
		f, err := os.Open(filepath.Join(mounts[i], fmt.Sprint("vm", i)))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files[i] = f
	}
	if st := hostStatus(t, control); len(st.Exports[0].Guests) != vms || st.Exports[0].Leases != vms {
		t.Fatalf("before: %d guests, %d leases; want %d of each", len(st.Exports[0].Guests), st.Exports[0].Leases, vms)
	}
	for i := range vms - 1 {
		if err := os.Remove(filepath.Join(mnt, fmt.Sprint("vm", i))); err != nil {
			t.Fatal(err)
		}
	}
	fillExport(t, mnt, fmt.Sprint("vm", vms-1))
	if out, err := leasefs(t, "publish", "--control", control, "mirror"); err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	for round := 1; round <= 2; round++ {
		if out, err := leasefs(t, "host", "--upgrade", "--control", control); err != nil {
			t.Fatalf("upgrade %d: %v\n%s", round, err, out)
		}
		for i, m := range mounts {
			st := guestStatus(t, m)
			for deadline := time.Now().Add(20 * time.Second); st.Resumes < round && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
				st = guestStatus(t, m)
			}
			if st.Resumes < round || len(st.Fenced) > 0 {
				t.Fatalf("upgrade %d: guest %d: %d resumes, fenced %+v\nagent log:\n%s", round, i, st.Resumes, st.Fenced, a.Log)
			}
		}
	}
	if st := hostStatus(t, control); len(st.Exports[0].Guests) != vms || st.Exports[0].Leases != vms || a.Pid() != pid {
		t.Fatalf("after: %d guests, %d leases, pid %d (was %d)", len(st.Exports[0].Guests), st.Exports[0].Leases, a.Pid(), pid)
	}
	for i, f := range files {
		got, err := io.ReadAll(f)
		if err != nil || !bytes.Equal(got, want[i]) {
			t.Fatalf("guest %d read %d bytes (%v), not its deleted file's", i, len(got), err)
		}
	}
}
