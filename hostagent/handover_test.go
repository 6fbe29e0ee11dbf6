package hostagent

import (
	"bytes"
	"context"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
)

// An export handed over (as an upgrade does, its descriptors kept across
// an exec: here, duplicated) serves the same kept generations, block for
// block, goes on numbering from where it was, and scans everything at
// its next publish: what changed while nobody watched is not known.
func TestExportHandover(t *testing.T) {
	x := newExport(t, 64)
	x.write(t, "a", "one")
	old := x.open(t, 0)
	if _, err := old.PublishLabeled("r1", false); err != nil {
		t.Fatal(err)
	}
	x.write(t, "b", "two")
	if _, err := old.PublishLabeled("r2", false); err != nil {
		t.Fatal(err)
	}
	st, release, err := old.handover()
	if err != nil {
		t.Fatal(err)
	}
	// As the exec keeps them: the old export's files are its own.
	for _, fd := range []*int{&st.MountFD, &st.Store.FD} {
		if *fd, err = unix.Dup(*fd); err != nil {
			t.Fatal(err)
		}
	}
	release()

	x.write(t, "c", "written while the agent was away")
	e := x.openWith(t, ExportConfig{Inherit: st})
	if e.Kept() != old.Kept() || e.Current().Number != old.Current().Number || e.Current().Label != "r2" {
		t.Fatalf("took over %d generations, current %d %q; the old had %d, current %d",
			e.Kept(), e.Current().Number, e.Current().Label, old.Kept(), old.Current().Number)
	}
	for _, k := range old.KeptList() {
		n := k.Number
		og, ng := old.Generation(n), e.Generation(n)
		if ng == nil || ng.Blocks() != og.Blocks() {
			t.Fatalf("generation %d not taken over whole", n)
		}
		for b := range og.blocks {
			ob, err1 := og.ReadBlock(b, 1)
			nb, err2 := ng.ReadBlock(b, 1)
			if err1 != nil || err2 != nil || !bytes.Equal(ob, nb) {
				t.Fatalf("generation %d block %d: %v %v, equal %v", n, b, err1, err2, bytes.Equal(ob, nb))
			}
		}
		og.Release()
		ng.Release()
	}
	if _, err := e.PublishLabeled("r1", false); err == nil {
		t.Fatal("the label went backwards after the handover")
	}
	g, err := e.Publish()
	if err != nil {
		t.Fatal(err)
	}
	if g.Number != old.Current().Number+1 || !g.Full {
		t.Fatalf("the first publish after the handover: generation %d, full %v", g.Number, g.Full)
	}
	fs, err := g.FS()
	if err != nil {
		t.Fatal(err)
	}
	root, err := fs.Inode(ext4ro.RootIno)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fs.Lookup(root, "c"); err != nil {
		t.Fatalf("the file written meanwhile is not in the new generation: %v", err)
	}
}

// A server handed over keeps the generation each session was on until
// its guest is back, however many publishes come first.
func TestServerHandoverKeepsWhatGuestsAreOn(t *testing.T) {
	x := newExport(t, 64)
	x.write(t, "f", "one")
	e := x.open(t, 5*time.Second)
	g1, err := e.Publish()
	if err != nil {
		t.Fatal(err)
	}
	s, a := serve(t, e, ServerOptions{Lease: lease.Config{AckTimeout: time.Second}})
	c, w, err := vsockproto.DialHello(context.Background(), a, vsockproto.Hello{Export: "test", Features: vsockproto.FeatureResume},
		func(ctx context.Context, req vsockproto.Message) (vsockproto.Message, error) {
			return &vsockproto.AnnounceAck{Generation: g1.Number}, nil // stays
		}, vsockproto.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	x.write(t, "f", "two")
	if _, err := s.Publish("test"); err != nil {
		t.Fatal(err)
	}
	states, release, err := s.Handover()
	if err != nil {
		t.Fatal(err)
	}
	st := states["test"]
	for _, fd := range []*int{&st.MountFD, &st.Store.FD} {
		if *fd, err = unix.Dup(*fd); err != nil {
			t.Fatal(err)
		}
	}
	release()
	s.Leave()

	e2 := x.openWith(t, ExportConfig{Inherit: st, FreezeBudget: 5 * time.Second})
	s2, _ := serve(t, e2, ServerOptions{Lease: lease.Config{AckTimeout: time.Second}})
	if !s2.export("test").coord.HasSession(lease.Token(w.Token)) {
		t.Fatal("the guest's session was not taken over")
	}
	for i := range 3 {
		x.write(t, "f", strconv.Itoa(i))
		if _, err := s2.Publish("test"); err != nil {
			t.Fatal(err)
		}
	}
	if !e2.Has(g1.Number) {
		t.Fatal("the generation a guest was on was dropped before it came back")
	}
}

// A handover asked for during a publish's freeze waits for the publish
// to end, and hands over its generation.
func TestHandoverWaitsForAPublish(t *testing.T) {
	x := newExport(t, 64)
	frozen, thaw := make(chan struct{}), make(chan struct{})
	first := true
	e := x.openWith(t, ExportConfig{FreezeBudget: 5 * time.Second, OnFrozen: func() {
		if first {
			first = false
			return
		}
		close(frozen)
		<-thaw
	}})
	if _, err := e.Publish(); err != nil {
		t.Fatal(err)
	}
	published := make(chan *Generation, 1)
	go func() {
		g, err := e.Publish()
		if err != nil {
			t.Error(err)
		}
		published <- g
	}()
	<-frozen
	handed := make(chan *ExportState, 1)
	go func() {
		st, release, err := e.handover()
		if err != nil {
			t.Error(err)
		}
		release()
		handed <- st
	}()
	select {
	case <-handed:
		t.Fatal("handed over in the middle of a freeze")
	case <-time.After(200 * time.Millisecond):
	}
	close(thaw)
	g := <-published
	if st := <-handed; st == nil || st.Cur != g.Number {
		t.Fatalf("handed over %+v, want the publish's generation %d current", st, g.Number)
	}
}
