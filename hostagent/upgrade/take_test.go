package upgrade

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/vsockproto"
)

// handOver makes what an upgrade leaves a successor: d in a memfd
// named by Env.
func handOver(t *testing.T, d *Document) {
	t.Helper()
	var b bytes.Buffer
	if err := Encode(&b, d); err != nil {
		t.Fatal(err)
	}
	handOverBytes(t, b.Bytes())
}

// handOverBytes is handOver of a document's bytes, whatever they are.
func handOverBytes(t *testing.T, doc []byte) {
	t.Helper()
	mfd, err := unix.MemfdCreate("leasefs-handover", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Write(mfd, doc); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Seek(mfd, 0, 0); err != nil {
		t.Fatal(err)
	}
	t.Setenv(Env, strconv.Itoa(mfd))
}

func open(t *testing.T) int {
	t.Helper()
	fd, err := unix.Open(os.DevNull, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) }) // harmless if closed and not reused: the test checks before
	return fd
}

func isOpen(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil
}

// TestInheritedTakesWhatIsAskedAndLetsGoTheRest: a successor takes the
// listener and export it asks for, by their own names; Rest closes the
// others' descriptors and removes the socket file nobody serves.
func TestInheritedTakesWhatIsAskedAndLetsGoTheRest(t *testing.T) {
	dir := t.TempDir()
	keep, gone := filepath.Join(dir, "keep.sock"), filepath.Join(dir, "gone.sock")
	listen := func(path string) (*vsockproto.Listener, vsockproto.Addr) {
		addr, err := vsockproto.ParseAddr("unix:" + path)
		if err != nil {
			t.Fatal(err)
		}
		l, err := vsockproto.Listen(addr, vsockproto.ListenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return l, addr
	}
	lk, keepAddr := listen(keep)
	lg, _ := listen(gone)
	fdOfListener := func(l *vsockproto.Listener) int {
		f, err := l.File()
		if err != nil {
			t.Fatal(err)
		}
		return fdOf(f)
	}
	d := &Document{From: "test", StateLock: -1, Control: -1,
		Listeners: map[string]int{keepAddr.String(): fdOfListener(lk), "unix:" + gone: fdOfListener(lg)},
		Exports: map[string]*hostagent.ExportState{
			"taken":   {Device: "/dev/a", Mount: "/a", MountFD: open(t), Store: hostagent.StoreState{FD: open(t)}},
			"renamed": {Device: "/dev/b", Mount: "/b", MountFD: open(t), Store: hostagent.StoreState{FD: open(t)}},
			"moved":   {Device: "/dev/c", Mount: "/c", MountFD: open(t), Store: hostagent.StoreState{FD: open(t)}, Held: map[uint32]int{7: open(t)}},
		}}
	letGo := []int{d.Exports["moved"].MountFD, d.Exports["moved"].Store.FD, d.Exports["moved"].Held[7], d.Listeners["unix:"+gone]}
	// The predecessor's listeners stay open (closing one would remove
	// its socket file); the copies are what is handed over.
	t.Cleanup(func() { lk.Close(); lg.Close() })
	handOver(t, d)

	var logged bytes.Buffer
	in := Take(nil, hclog.New(&hclog.LoggerOptions{Output: &logged}))
	if !in.Upgraded() {
		t.Fatalf("not taken: %s", logged.String())
	}
	if _, ok := os.LookupEnv(Env); ok {
		t.Errorf("%s is left for the children", Env)
	}
	in.KeepOnly(func(name, dev, mnt string) bool { return name == "taken" || (name == "moved" && mnt == "/c") })
	if isOpen(d.Exports["renamed"].MountFD) {
		t.Error("KeepOnly: the export the settings no longer have is still open")
	}
	ec := hostagent.ExportConfig{Name: "taken", Device: "/dev/a", Mount: "/a"}
	in.Export(&ec)
	if ec.Inherit == nil || ec.Inherit.MountFD != d.Exports["taken"].MountFD {
		t.Fatalf("the export of the same name, device and mount is not taken: %+v", ec.Inherit)
	}
	ec = hostagent.ExportConfig{Name: "moved", Device: "/dev/other", Mount: "/c"}
	in.Export(&ec)
	if ec.Inherit != nil {
		t.Error("an export on another device took over the state of the one before")
	}
	l, err := in.Listener(keepAddr, vsockproto.ListenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	// It is the same socket: a client connecting to the path reaches it.
	c, err := net.Dial("unix", keep)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if c, _, err := l.Accept(); err != nil {
		t.Fatalf("the listener handed over does not accept: %v", err)
	} else {
		c.Close()
	}

	in.Rest()
	for i, fd := range letGo {
		if isOpen(fd) {
			t.Errorf("descriptor %d (%d of %v) not let go by Rest", fd, i, letGo)
		}
	}
	if _, err := os.Lstat(gone); !os.IsNotExist(err) {
		t.Errorf("the socket file nobody serves is still there: %v", err)
	}
	if _, err := os.Lstat(keep); err != nil {
		t.Errorf("the socket served again is gone: %v", err)
	}
	// Asked again after Rest, it opens afresh.
	if l2, err := in.Listener(keepAddr, vsockproto.ListenOptions{}); err == nil {
		l2.Close()
		t.Error("a second listener on the same path: the first must have been taken, not opened again")
	}
}

// TestUnreadableHandoverStartsAfresh: a document of another form is
// logged, and the run starts as if nothing were handed over.
func TestUnreadableHandoverStartsAfresh(t *testing.T) {
	handOverBytes(t, []byte(magic+"1\n"))
	var logged bytes.Buffer
	in := Take(nil, hclog.New(&hclog.LoggerOptions{Output: &logged}))
	if in.Upgraded() {
		t.Fatal("a document of form 1 was taken")
	}
	if !strings.Contains(logged.String(), "of form 1; this binary takes form") {
		t.Errorf("the log does not say why: %s", logged.String())
	}
	in.Rest() // nothing to let go
}

// An upgrade whose document cannot be read closes what was handed over
// with it: the state directory's lock it held is free for this run to
// take afresh, and a descriptor this process opened itself stays.
func TestUnreadableHandoverLetsGoOfItsLocks(t *testing.T) {
	dir := t.TempDir()
	lock, err := hostagent.LockStateDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	handed, err := unix.Dup(int(lock.Fd())) // kept across the exec: not close-on-exec
	if err != nil {
		t.Fatal(err)
	}
	lock.Close() // the predecessor's own copy goes with its exec
	ours, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer ours.Close()
	if _, err := hostagent.LockStateDir(dir); err == nil {
		t.Fatal("the state directory is not locked by the descriptor handed over")
	}
	handOverBytes(t, []byte(magic+"2\ngarbage"))
	t.Setenv(FDsEnv, fmt.Sprintf("%d,%d,1", handed, ours.Fd()))
	in := Take(nil, hclog.NewNullLogger())
	if in.Upgraded() {
		t.Fatal("a broken document was taken")
	}
	relocked, err := hostagent.LockStateDir(dir)
	if err != nil {
		t.Fatalf("the state directory after an unreadable handover: %v", err)
	}
	relocked.Close()
	if _, err := ours.Stat(); err != nil {
		t.Errorf("a descriptor of this process's own was closed: %v", err)
	}
	if _, ok := os.LookupEnv(FDsEnv); ok {
		t.Errorf("%s is left for the children", FDsEnv)
	}
}
