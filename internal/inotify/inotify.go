// Package inotify decodes what a read of an inotify descriptor returns.
package inotify

import (
	"bytes"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Each calls fn for every complete event in b: its watch descriptor, its
// mask and the name it carries (empty for the watched inode itself).
func Each(b []byte, fn func(wd int, mask uint32, name string)) {
	for off := 0; off+unix.SizeofInotifyEvent <= len(b); {
		ev := (*unix.InotifyEvent)(unsafe.Pointer(&b[off]))
		end := off + unix.SizeofInotifyEvent + int(ev.Len)
		if end > len(b) {
			return
		}
		name := b[off+unix.SizeofInotifyEvent : end]
		if i := bytes.IndexByte(name, 0); i >= 0 {
			name = name[:i]
		}
		fn(int(ev.Wd), ev.Mask, string(name))
		off = end
	}
}
