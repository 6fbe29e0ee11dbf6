package lockrank

import (
	"strings"
	"testing"
)

type outer struct{}

func (outer) Rank() (int, string) { return 1, "outer" }

type leaf struct{}

func (leaf) Rank() (int, string) { return 2, "leaf" }

func TestOrder(t *testing.T) {
	var o Mutex[outer]
	var a, b Mutex[leaf]
	inversion := func(first, second interface{ Lock() }) (msg string) {
		defer func() {
			if r := recover(); r != nil {
				msg = r.(string)
			}
		}()
		first.Lock()
		second.Lock()
		return ""
	}
	if msg := inversion(&o, &a); msg != "" {
		t.Errorf("a leaf after outer: %q", msg)
	}
	a.Unlock()
	o.Unlock()
	msg := inversion(&a, &o)
	if Enabled != strings.Contains(msg, "outer (rank 1) taken while holding leaf (rank 2)") {
		t.Errorf("outer after a leaf, lockrank %v: %q", Enabled, msg)
	}
	if !Enabled {
		o.Unlock()
	}
	a.Unlock()
	msg = inversion(&a, &b)
	if Enabled != strings.Contains(msg, "leaf (rank 2) taken while holding leaf (rank 2)") {
		t.Errorf("two leaves, lockrank %v: %q", Enabled, msg)
	}
	if !Enabled {
		b.Unlock()
	}
	a.Unlock()

	// Let go on another goroutine: no longer this one's.
	o.Lock()
	done := make(chan struct{})
	go func() { o.Unlock(); close(done) }()
	<-done
	// A record left of the first would make this an inversion.
	if msg := inversion(&o, &a); msg != "" {
		t.Errorf("after another goroutine let it go: %q", msg)
	}
	a.Unlock()
	o.Unlock()
}
