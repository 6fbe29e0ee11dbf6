package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// apt runs apt-get or apt-cache in a guest's own apt state under dir,
// its one source the mirror at url.
type apt struct{ dir string }

func newApt(t *testing.T, url string) apt {
	t.Helper()
	a := apt{t.TempDir()}
	for _, d := range []string{"parts", "state/lists/partial", "cache/archives/partial", "dl"} {
		os.MkdirAll(filepath.Join(a.dir, d), 0o755)
	}
	os.WriteFile(filepath.Join(a.dir, "sources.list"), []byte("deb [trusted=yes] "+url+" ./\n"), 0o644)
	return a
}

func (a apt) run(t *testing.T, tool string, args ...string) string {
	t.Helper()
	opts := []string{"-o", "Dir::Etc::SourceList=" + filepath.Join(a.dir, "sources.list"), "-o", "Dir::Etc::SourceParts=" + filepath.Join(a.dir, "parts"),
		"-o", "Dir::State=" + filepath.Join(a.dir, "state"), "-o", "Dir::Cache=" + filepath.Join(a.dir, "cache"),
		"-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root"}
	cmd := exec.Command(tool, append(opts, args...)...)
	cmd.Dir = filepath.Join(a.dir, "dl")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// makeRepo makes src a flat apt repository holding one package,
// leasefs-hello at version, and nothing else.
func makeRepo(t *testing.T, src, version string) {
	t.Helper()
	os.RemoveAll(src)
	pkg := filepath.Join(t.TempDir(), "pkg")
	os.MkdirAll(filepath.Join(pkg, "DEBIAN"), 0o755)
	os.MkdirAll(filepath.Join(pkg, "usr/share/leasefs-hello"), 0o755)
	os.WriteFile(filepath.Join(pkg, "DEBIAN/control"), []byte("Package: leasefs-hello\nVersion: "+version+
		"\nArchitecture: all\nMaintainer: leasefs <leasefs@example.org>\nDescription: a package of the mirror test\n"), 0o644)
	os.WriteFile(filepath.Join(pkg, "usr/share/leasefs-hello/version"), []byte(version+"\n"), 0o644)
	os.MkdirAll(src, 0o755)
	imgtest.Run(t, "dpkg-deb", "--root-owner-group", "--build", pkg, filepath.Join(src, "leasefs-hello_"+version+"_all.deb"))
	cmd := exec.Command("sh", "-c", "apt-ftparchive packages . > Packages && apt-ftparchive release . > Release")
	cmd.Dir = src
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("apt-ftparchive: %v\n%s", err, out)
	}
}

// The apt mirror flow of examples/mirror: sync-mirror.sh copies a new
// version into the export and publishes; a guest's apt sees the mirror
// before or after, never between.
func TestMirrorExample(t *testing.T) {
	testenv.RequireTool(t, "rsync", "apt-ftparchive", "dpkg-deb", "apt-get")
	h, mnt, dev := startHostCmd(t)
	src, dest := filepath.Join(t.TempDir(), "repo"), filepath.Join(mnt, "debian")
	script, _ := filepath.Abs(filepath.Join(examples, "mirror/sync-mirror.sh"))
	guest := t.TempDir()
	// The script's leasefs: before each publish, note what the guest lists.
	seen := filepath.Join(t.TempDir(), "seen")
	wrapper := filepath.Join(t.TempDir(), "leasefs")
	os.WriteFile(wrapper, []byte("#!/bin/sh\nls "+guest+"/debian >> "+seen+" 2>&1; echo -- >> "+seen+"\nexec "+leasefsBin+` "$@"`+"\n"), 0o755)
	sync := func() {
		t.Helper()
		os.Remove(seen)
		cmd := exec.Command(script, src, dest)
		cmd.Env = append(os.Environ(), "LEASEFS_CONTROL="+h.control, "LEASEFS_EXPORT=mirror", "LEASEFS="+wrapper)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("sync-mirror.sh: %v\n%s", err, out)
		}
	}
	makeRepo(t, src, "1.0")
	sync()
	if out, err := leasefs(t, "guest", "--connect", h.guest, "--export", "mirror", "--device", dev, guest); err != nil {
		t.Fatalf("leasefs guest: %v\n%s", err, out)
	}
	t.Cleanup(func() { imgtest.Unmount(t, guest); waitGone(t, guest) })
	a := newApt(t, "file:"+guest+"/debian")
	a.run(t, "apt-get", "update")
	if out := a.run(t, "apt-cache", "show", "leasefs-hello"); !strings.Contains(out, "Version: 1.0") {
		t.Fatalf("apt-cache show:\n%s", out)
	}

	makeRepo(t, src, "2.0") // in the same second, and the same sizes
	sync()
	// Before the first publish the new version was on the host, and the
	// guest listed the mirror as it was.
	b, _ := os.ReadFile(seen)
	before, _, _ := strings.Cut(string(b), "--")
	if want := "Packages\nRelease\nleasefs-hello_1.0_all.deb\n"; before != want {
		t.Errorf("before the publish the guest listed\n%s\nwant\n%s", before, want)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		a.run(t, "apt-get", "update")
		if out := a.run(t, "apt-cache", "show", "leasefs-hello"); strings.Contains(out, "Version: 2.0") && !strings.Contains(out, "Version: 1.0") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the guest's apt does not see version 2.0")
		}
		time.Sleep(50 * time.Millisecond)
	}
	a.run(t, "apt-get", "download", "leasefs-hello")
	got, err := os.ReadFile(filepath.Join(a.dir, "dl", "leasefs-hello_2.0_all.deb"))
	want, _ := os.ReadFile(filepath.Join(src, "leasefs-hello_2.0_all.deb"))
	if err != nil || !bytes.Equal(got, want) || len(want) == 0 {
		t.Errorf("downloaded %d bytes (%v), want the %d of the source", len(got), err, len(want))
	}
	if _, err := os.Stat(filepath.Join(guest, "debian", "leasefs-hello_1.0_all.deb")); !os.IsNotExist(err) {
		t.Errorf("the old version is still in the guest's mirror: %v", err)
	}
}
