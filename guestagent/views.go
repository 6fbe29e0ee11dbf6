package guestagent

import (
	"sync/atomic"

	"github.com/leasefs/leasefs/ext4ro"
)

// recentViews is a mount's one registry of the views it served lately,
// newest first: the one served now, and the few before it that a
// directory listing begun in them goes on in (its cookies carry the
// view's tag) and that an open through a handle of theirs leases in. It
// is read without a lock (every lookup, listing and open reads it);
// only the switcher adds to it (serve), and NewFileSystem starts it.
type recentViews struct {
	list atomic.Pointer[[]servedView]
}

// servedView is a reader the mount served, the tag its directory
// cookies carry, and the generation it reads (nil for a static image).
type servedView struct {
	tag uint32
	fs  *ext4ro.FS
	gen *genView
}

// keptViews is how many views the registry remembers.
const keptViews = 8

func newRecentViews(first servedView) *recentViews {
	r := &recentViews{}
	r.list.Store(&[]servedView{first})
	return r
}

// serve makes v the one served, and returns the one it replaces.
func (r *recentViews) serve(v servedView) servedView {
	old := *r.list.Load()
	list := append([]servedView{v}, old[:min(len(old), keptViews-1)]...)
	r.list.Store(&list)
	return old[0]
}

// current is the view served now.
func (r *recentViews) current() servedView { return (*r.list.Load())[0] }

// tagged returns the recent view tagged tag, or (for tag 0, a new
// listing, or a view no longer recent) the current one.
func (r *recentViews) tagged(tag uint32) servedView {
	list := *r.list.Load()
	if tag != 0 {
		for _, v := range list {
			if v.tag == tag {
				return v
			}
		}
	}
	return list[0]
}

// generationOf returns the generation reader f reads, if it is recent.
func (r *recentViews) generationOf(f *ext4ro.FS) *genView {
	for _, v := range *r.list.Load() {
		if v.fs == f {
			return v.gen
		}
	}
	return nil
}

// all returns the views remembered, newest first.
func (r *recentViews) all() []servedView { return *r.list.Load() }
