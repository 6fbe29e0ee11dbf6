package main

import (
	"testing"

	"github.com/leasefs/leasefs/internal/conformance"
	"github.com/leasefs/leasefs/internal/hosttest"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// The read-only conformance suite on every kind of leasefs mount: the
// static image mount against the kernel's read-only mount of the image;
// the live guest, with the shared device and without it, against a
// read-only bind of the host's own mount of the export, which shows the
// generation published (nothing changes after it); then the coherence
// step on the three kinds of live mount at once.
func TestConformance(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireLoop(t)
	spec := imgtest.TreeSpec{Seed: 5, BlockSize: 4096, ManyEntries: 300, NanoTimes: true}
	t.Run("static", func(t *testing.T) {
		src := t.TempDir()
		imgtest.Populate(t, src, spec)
		conformance.Populate(t, src)
		img := imgtest.Mkfs(t, "ext4", src, 64, "-b", "4096", "-O", imgtest.Features)
		conformance.Run(t, startMount(t, img), imgtest.KernelMount(t, img, "ro"))
	})
	t.Run("live", func(t *testing.T) {
		mnt, dev := hostExport(t)
		imgtest.Populate(t, mnt, spec)
		conformance.Populate(t, mnt)
		h, _ := startHostOn(t, mnt, dev) // publishes what is there
		oracle := hosttest.ReadOnly(t, mnt)
		t.Run("device", func(t *testing.T) {
			conformance.Run(t, guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev), oracle)
		})
		t.Run("device, page cache on the host", func(t *testing.T) {
			conformance.Run(t, guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev, "--page-cache", "host"), oracle)
		})
		t.Run("no device", func(t *testing.T) {
			conformance.Run(t, guestMount(t, "--connect", h.guest, "--export", "mirror"), oracle)
		})
		t.Run("coherence", func(t *testing.T) {
			publish := func(t *testing.T) {
				if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
					t.Fatalf("publish: %v\n%s", err, out)
				}
			}
			conformance.Coherence(t, conformance.Live{Writer: mnt, Oracle: oracle, Publish: publish},
				guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev),
				guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev, "--page-cache", "host"),
				guestMount(t, "--connect", h.guest, "--export", "mirror"))
		})
	})
}
