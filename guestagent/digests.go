package guestagent

// Metadata from the device. A guest with the shared device reads its
// generation's metadata blocks there, where the host's writes since the
// generation may have changed them, and keeps a block only if its
// SHA-256 is the one the host has for it in that generation: the
// generation's bytes or none. The host answers digests from its index
// of the generation (it names every block by its SHA-256) without
// reading anything, a window of blocks at a time: one request where the
// blocks themselves would take many, each behind the one before on a
// walk of the tree. A block that does not check (written since the
// generation, or stale in this machine's page cache of the device) is
// read again past the page cache, and failing that fetched from the
// host.
//
// Digests are kept as the blocks are, by the metaCache, for the served
// generation only: a switch drops the windows the announcements said
// changed. Older views (a listing begun before a switch, .generations)
// fetch from the host, as they did.

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"math/bits"

	"github.com/leasefs/leasefs/internal/directio"
	"github.com/leasefs/leasefs/vsockproto"
)

// digestWindow is how many blocks one ReadDigests covers: a reply of at
// most 32 KiB. The cache keeps as many windows as would take its own
// bytes if every block in them were metadata (256 for the default 8 MiB:
// a 1 GiB stretch of a disk of 4 KiB blocks, but most windows are
// sparse), and at least 16.
const digestWindow = 1024

func digestWindows(cacheBytes int64) int {
	return int(max(16, cacheBytes/(digestWindow*vsockproto.DigestSize)))
}

// digests is one window's answer: which blocks are metadata of the
// generation, and their SHA-256.
type digests struct {
	present [digestWindow / 64]uint64
	rank    [digestWindow / 64]uint16 // bits set in the words before
	sums    []byte
}

// newDigests indexes a reply (whose sums Decode has counted against its
// bitmap) to a window's ReadDigests.
func newDigests(d *vsockproto.Digests) (*digests, error) {
	if len(d.Present) != digestWindow/8 {
		return nil, errors.New("the host's digests do not answer the window asked for")
	}
	w := &digests{sums: d.Sums}
	n := 0
	for i := range w.present {
		for k := range 8 {
			w.present[i] |= uint64(d.Present[i*8+k]) << (8 * k)
		}
		w.rank[i] = uint16(n)
		n += bits.OnesCount64(w.present[i])
	}
	return w, nil
}

// sum returns the digest of the window's i-th block, if it is metadata.
func (w *digests) sum(i uint64) ([]byte, bool) {
	word, bit := i/64, i%64
	if w.present[word]&(1<<bit) == 0 {
		return nil, false
	}
	k := int(w.rank[word]) + bits.OnesCount64(w.present[word]&(1<<bit-1))
	return w.sums[k*vsockproto.DigestSize : (k+1)*vsockproto.DigestSize], true
}

// deviceMeta reports whether metadata blocks are read from the device:
// it is there, verified, and the host gives digests.
func (c *Client) deviceMeta() bool {
	if c.meta == nil || !c.devMeta.Load() {
		return false
	}
	s := c.live.Load()
	return s != nil && s.conn.Features().Has(vsockproto.FeatureDigests)
}

// window returns the digests of window win of view v's generation:
// cached, or asked for (once, however many readers want it). nil when
// the view is not the cached generation's or the host does not answer.
func (v *genView) window(win uint64) *digests {
	w, asked, mine := v.c.cache.window(v.gen, win)
	switch {
	case w != nil:
		return w
	case asked != nil:
		<-asked.done
		return asked.w
	case mine == nil:
		return nil // not the cached generation
	}
	w = v.fetchDigests(win)
	mine(w)
	return w
}

func (v *genView) fetchDigests(win uint64) *digests {
	if !v.c.deviceMeta() {
		return nil
	}
	v.c.m.digestFetches.Inc()
	reply, err := v.c.call(nil, &vsockproto.ReadDigests{Generation: v.gen, First: win * digestWindow, Count: digestWindow})
	if err == nil && v.dead.Load() {
		err = v.deadErr() // the request may have gone to another lineage's host
	}
	if err != nil {
		// The blocks come from the host instead, which says what is
		// wrong if it is more than this request.
		v.c.log.Debug("no digests", "generation", v.gen, "window", win, "error", err)
		return nil
	}
	w, err := newDigests(reply.(*vsockproto.Digests))
	if err != nil {
		v.c.log.Warn("metadata through the host", "generation", v.gen, "error", err)
		return nil
	}
	return w
}

// fromDevice reads into out (len(blocks) blocks) the blocks (sorted)
// whose bytes on the device are the generation's, and returns the
// indexes of the others.
func (v *genView) fromDevice(blocks []uint64, out []byte) (missing []int) {
	sums := make([][]byte, len(blocks))
	var w *digests
	win := ^uint64(0)
	for i, b := range blocks {
		if b/digestWindow != win {
			win = b / digestWindow
			w = v.window(win)
		}
		if w != nil {
			sums[i], _ = w.sum(b % digestWindow)
		}
	}
	bs := int(v.bs)
	for i := 0; i < len(blocks); {
		// A run of consecutive blocks with digests, in one read.
		j := i + 1
		for j < len(blocks) && blocks[j] == blocks[j-1]+1 && sums[j] != nil {
			j++
		}
		if sums[i] == nil {
			missing = append(missing, i)
			i++
			continue
		}
		buf := out[i*bs : j*bs]
		if _, err := v.c.meta.ReadAt(buf, int64(blocks[i])*v.bs); err != nil {
			clear(buf)
		}
		for k := i; k < j; k++ {
			if !v.check(blocks[k], out[k*bs:(k+1)*bs], sums[k]) {
				missing = append(missing, k)
			}
		}
		i = j
	}
	v.c.cache.noteDevice(len(blocks)-len(missing), len(missing))
	return missing
}

// check reports whether b, block n as read through the page cache, is
// the generation's; if not, it reads it again past the page cache.
func (v *genView) check(n uint64, b, sum []byte) bool {
	if s := sha256.Sum256(b); bytes.Equal(s[:], sum) {
		return true
	}
	fresh := directio.AlignedBuf(len(b))
	if _, err := v.c.dev.ReadAt(fresh, int64(n)*v.bs); err != nil {
		return false
	}
	if s := sha256.Sum256(fresh); !bytes.Equal(s[:], sum) {
		return false
	}
	copy(b, fresh)
	return true
}

// read returns the blocks' (sorted) bytes: from the device where they
// check, the rest from the host.
func (v *genView) read(blocks []uint64) ([]byte, error) {
	if !v.c.deviceMeta() {
		return v.fetch(blocks)
	}
	out := make([]byte, len(blocks)*int(v.bs))
	missing := v.fromDevice(blocks, out)
	if len(missing) == 0 {
		return out, nil
	}
	want := make([]uint64, len(missing))
	for k, i := range missing {
		want[k] = blocks[i]
	}
	data, err := v.fetch(want)
	if err != nil {
		return nil, err
	}
	bs := int(v.bs)
	for k, i := range missing {
		copy(out[i*bs:(i+1)*bs], data[k*bs:(k+1)*bs])
	}
	return out, nil
}
