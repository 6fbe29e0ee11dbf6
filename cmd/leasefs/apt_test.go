package main

// apt, a client nobody here wrote, against a mirror that syncs the way
// ftpsync does, through two guests and, as the control, straight from
// the host's directory.

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// aptRepo is an upstream Debian-format archive (dists/ and pool/, its
// indices also by hash, as Debian's are) that a test changes round by
// round, and syncs into a mirror.
type aptRepo struct {
	dir      string
	packages int
	version  []int      // each package's current version
	byHash   [][]string // the by-hash files each round added
	replaced [][]string // the pool files each round replaced
}

const aptSuite = "dists/stable"

func newAptRepo(t *testing.T, packages int) *aptRepo {
	r := &aptRepo{dir: t.TempDir(), packages: packages, version: make([]int, packages)}
	for p := range packages {
		r.version[p] = 1
		r.build(t, p)
	}
	r.replaced = append(r.replaced, nil)
	r.byHash = append(r.byHash, r.indices(t))
	return r
}

// build makes package p at its current version in the pool.
func (r *aptRepo) build(t *testing.T, p int) string {
	name, v := fmt.Sprintf("lfs-pkg%02d", p), r.version[p]
	pkg := filepath.Join(t.TempDir(), "pkg")
	os.MkdirAll(filepath.Join(pkg, "DEBIAN"), 0o755)
	os.MkdirAll(filepath.Join(pkg, "usr/share", name), 0o755)
	os.WriteFile(filepath.Join(pkg, "DEBIAN/control"), []byte(fmt.Sprintf("Package: %s\nVersion: %d\nArchitecture: all\n"+
		"Maintainer: leasefs <leasefs@example.org>\nDescription: a package of the apt test\n", name, v)), 0o644)
	// Some bulk, different in every version, so that reading one
	// version's bytes for another's cannot pass.
	os.WriteFile(filepath.Join(pkg, "usr/share", name, "data"), []byte(strings.Repeat(fmt.Sprintf("%s %d\n", name, v), 3000+p*100)), 0o644)
	rel := fmt.Sprintf("pool/main/%s/%s_%d_all.deb", name, name, v)
	os.MkdirAll(filepath.Join(r.dir, filepath.Dir(rel)), 0o755)
	imgtest.Run(t, "dpkg-deb", "-Zgzip", "--root-owner-group", "--build", pkg, filepath.Join(r.dir, rel))
	return rel
}

// indices writes Packages, its by-hash copy, and Release; it returns the
// by-hash file added.
func (r *aptRepo) indices(t *testing.T) []string {
	bin := filepath.Join(aptSuite, "main/binary-amd64")
	os.MkdirAll(filepath.Join(r.dir, bin, "by-hash/SHA256"), 0o755)
	cmd := exec.Command("sh", "-c", "apt-ftparchive packages pool/main > "+bin+"/Packages")
	cmd.Dir = r.dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("apt-ftparchive packages: %v\n%s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(r.dir, bin, "Packages"))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	hashed := filepath.Join(bin, "by-hash/SHA256", hex.EncodeToString(sum[:]))
	if err := os.WriteFile(filepath.Join(r.dir, hashed), b, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd = exec.Command("sh", "-c", "apt-ftparchive -o APT::FTPArchive::Release::Suite=stable -o APT::FTPArchive::Release::Codename=stable "+
		"-o APT::FTPArchive::Release::Architectures=amd64 -o APT::FTPArchive::Release::Components=main "+
		"-o APT::FTPArchive::Release::Acquire-By-Hash=yes release "+aptSuite+" > Release.new && mv Release.new "+aptSuite+"/Release")
	cmd.Dir = r.dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("apt-ftparchive release: %v\n%s", err, out)
	}
	return []string{hashed}
}

// round makes new versions of a few packages, and drops from upstream
// what was replaced two rounds before (old versions, old indices by
// hash), as an archive does some time after replacing them.
func (r *aptRepo) round(t *testing.T, n int) {
	var old []string
	for i := range 5 {
		p := (n*5 + i) % r.packages
		old = append(old, fmt.Sprintf("pool/main/lfs-pkg%02d/lfs-pkg%02d_%d_all.deb", p, p, r.version[p]))
		r.version[p]++
		r.build(t, p)
	}
	old = append(old, r.byHash[len(r.byHash)-1]...)
	r.replaced = append(r.replaced, old)
	r.byHash = append(r.byHash, r.indices(t))
	if k := len(r.replaced) - 3; k >= 0 {
		for _, f := range r.replaced[k] {
			os.Remove(filepath.Join(r.dir, f))
		}
	}
}

// sync copies the upstream into mirror as ftpsync does: first the files
// that are new or changed — each written to a temporary name and renamed
// into place, in rsync's order (sorted: the Release before the indices it
// names), each taking a moment as over a network — then, after
// between(), deletes what upstream no longer has.
func (r *aptRepo) sync(t *testing.T, mirror string, perFile time.Duration, between func()) {
	var files []string
	filepath.WalkDir(r.dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			rel, _ := filepath.Rel(r.dir, p)
			files = append(files, rel)
		}
		return nil
	})
	slices.Sort(files)
	for _, f := range files {
		src, err := os.ReadFile(filepath.Join(r.dir, f))
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(mirror, f)
		if old, err := os.ReadFile(dst); err == nil && string(old) == string(src) {
			continue
		}
		os.MkdirAll(filepath.Dir(dst), 0o755)
		tmp := filepath.Join(filepath.Dir(dst), "."+filepath.Base(f)+".tmp")
		if err := os.WriteFile(tmp, src, 0o644); err != nil {
			t.Fatal(err)
		}
		time.Sleep(perFile)
		if err := os.Rename(tmp, dst); err != nil {
			t.Fatal(err)
		}
	}
	between()
	filepath.WalkDir(mirror, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		rel, _ := filepath.Rel(mirror, p)
		if (strings.HasPrefix(rel, "dists/") || strings.HasPrefix(rel, "pool/")) && !slices.Contains(files, rel) {
			os.Remove(p)
		}
		return nil
	})
}

// aptLoop runs apt-get update and apt-get download of every package in
// a loop against the mirror at dir until stop, checking each package's
// bytes against the index apt read. It counts runs and failures.
type aptLoop struct {
	name                 string
	updates, downloads   atomic.Int64
	failed, mismatched   atomic.Int64 // updates that failed, packages with other bytes
	gone                 atomic.Int64 // downloads of a version the mirror deleted since the update
	mu                   sync.Mutex
	firstFailure, detail string
}

func (l *aptLoop) fail(what, out string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.firstFailure == "" {
		l.firstFailure, l.detail = what, out
	}
}

func (l *aptLoop) run(t *testing.T, r *aptRepo, dir string, stop <-chan struct{}) {
	// copy:, not file:: apt's file method leaves in its lists a symlink
	// to an index it already had, which it reads again later, whatever
	// the mirror then holds (a guest's next generation, or the writer's
	// next sync). copy: takes a copy, as http: does.
	a := newApt(t, "copy:"+dir)
	os.WriteFile(filepath.Join(a.dir, "sources.list"), []byte("deb [trusted=yes arch=amd64] copy:"+dir+" stable main\n"), 0o644)
	opts := []string{"-o", "Dir::Etc::SourceList=" + filepath.Join(a.dir, "sources.list"), "-o", "Dir::Etc::SourceParts=" + filepath.Join(a.dir, "parts"),
		"-o", "Dir::State=" + filepath.Join(a.dir, "state"), "-o", "Dir::Cache=" + filepath.Join(a.dir, "cache"),
		"-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root", "-o", "Acquire::Languages=none", "-o", "Acquire::GzipIndexes=false", "-q"}
	apt := func(args ...string) (string, error) {
		cmd := exec.Command("apt-get", append(opts, args...)...)
		cmd.Dir = filepath.Join(a.dir, "dl")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	for {
		select {
		case <-stop:
			return
		default:
		}
		l.updates.Add(1)
		// apt-get update exits 0 even when an index could not be had; it
		// says so with "E:" or "W:" lines.
		out, err := apt("update")
		if err != nil || strings.Contains(out, "E:") || strings.Contains(out, "W:") {
			l.failed.Add(1)
			l.fail("apt-get update", out)
			continue
		}
		index := readIndex(t, filepath.Join(a.dir, "state/lists"))
		if len(index) != r.packages {
			l.failed.Add(1)
			l.fail("the index apt read", fmt.Sprintf("%d packages", len(index)))
			continue
		}
		os.RemoveAll(filepath.Join(a.dir, "dl"))
		os.MkdirAll(filepath.Join(a.dir, "dl"), 0o755)
		var want []string
		for name, e := range index {
			want = append(want, name+"="+e.version)
		}
		l.downloads.Add(1)
		if out, err := apt(append([]string{"download"}, want...)...); err != nil {
			// A mirror deletes old versions some syncs after it replaced
			// them; a download that comes later finds them gone, as from
			// any mirror. Anything else is a failure.
			if onlyMissing(out) {
				l.gone.Add(1)
			} else {
				l.failed.Add(1)
				l.fail("apt-get download", out)
			}
			continue
		}
		for name, e := range index {
			b, err := os.ReadFile(filepath.Join(a.dir, "dl", name+"_"+e.version+"_all.deb"))
			sum := sha256.Sum256(b)
			if err != nil || hex.EncodeToString(sum[:]) != e.sha256 {
				l.mismatched.Add(1)
				l.fail("a downloaded package's sha256", fmt.Sprintf("%s %s: %v", name, e.version, err))
			}
		}
	}
}

// onlyMissing reports whether every error apt gave is a file not found.
func onlyMissing(out string) bool {
	n := 0
	for line := range strings.SplitSeq(out, "\n") {
		if strings.HasPrefix(line, "E: ") {
			n++
			if !strings.Contains(line, "No such file or directory") && !strings.Contains(line, "Some files failed to download") {
				return false
			}
		}
	}
	return n > 0
}

type indexEntry struct{ version, sha256 string }

// readIndex parses the Packages list apt keeps.
func readIndex(t *testing.T, lists string) map[string]indexEntry {
	m, _ := filepath.Glob(filepath.Join(lists, "*_Packages"))
	out := map[string]indexEntry{}
	for _, f := range m {
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		var name string
		var e indexEntry
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			k, v, _ := strings.Cut(sc.Text(), ": ")
			switch k {
			case "Package":
				name = v
			case "Version":
				e.version = v
			case "SHA256":
				e.sha256 = v
			case "":
				if name != "" {
					out[name] = e
				}
				name, e = "", indexEntry{}
			}
		}
		if name != "" {
			out[name] = e
		}
		fh.Close()
	}
	return out
}

// apt-get update and download in a loop in two guests (the device, and
// data through the host) while the host syncs an archive into the
// export as ftpsync does, 40 rounds, publishing after the new files and
// renames and again after the deletions: no update fails, no package
// has other bytes than the index apt read says. The same loop against
// the host's directory itself, during the same syncs, fails: the
// control, which shows that the test can fail.
func TestAptDuringSync(t *testing.T) {
	testenv.RequireTool(t, "apt-get", "apt-ftparchive", "dpkg-deb")
	h, mnt, dev := startHostCmd(t)
	repo := newAptRepo(t, 30)
	mirror := filepath.Join(mnt, "debian")
	publish := func() {
		if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
			t.Fatalf("publish: %v\n%s", err, out)
		}
	}
	repo.sync(t, mirror, 0, func() {})
	publish()
	gd := guestMount(t, "--connect", h.guest, "--export", "mirror", "--device", dev)
	gh := guestMount(t, "--connect", h.guest, "--export", "mirror")
	loops := []*aptLoop{{name: "guest with the device"}, {name: "guest, data through the host"}, {name: "the host's directory (control)"}}
	dirs := []string{filepath.Join(gd, "debian"), filepath.Join(gh, "debian"), mirror}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, l := range loops {
		wg.Add(1)
		go func() { defer wg.Done(); l.run(t, repo, dirs[i], stop) }()
	}
	start := time.Now()
	for n := range 40 {
		repo.round(t, n)
		repo.sync(t, mirror, 60*time.Millisecond, publish)
		publish()
	}
	close(stop)
	wg.Wait()
	t.Logf("40 rounds in %v", time.Since(start).Round(time.Second))
	for i, l := range loops {
		l.mu.Lock()
		t.Logf("%s: %d updates, %d downloads of all 30 packages; %d failed, %d packages with other bytes, %d downloads of a version deleted since",
			l.name, l.updates.Load(), l.downloads.Load(), l.failed.Load(), l.mismatched.Load(), l.gone.Load())
		switch {
		case i < 2 && (l.failed.Load() > 0 || l.mismatched.Load() > 0):
			t.Errorf("%s: the first failure, %s:\n%s", l.name, l.firstFailure, l.detail)
		case i < 2 && l.downloads.Load() < 20:
			t.Errorf("%s: only %d downloads: the loop hardly ran", l.name, l.downloads.Load())
		case i == 2 && l.failed.Load()+l.mismatched.Load() == 0:
			t.Errorf("the control read the host's directory through 40 syncs without a failure: the test cannot tell")
		}
		l.mu.Unlock()
	}
}
