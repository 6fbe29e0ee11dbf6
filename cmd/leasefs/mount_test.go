package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// leasefsBin is the binary under test, built once by TestMain (with the
// race detector when the tests run with it); leasefsBinNoRace is the same
// without it, for tests that measure the agent's memory.
var leasefsBin, leasefsBinNoRace string

func TestMain(m *testing.M) {
	testenv.RunHelper(map[string]testenv.Role{"hello": func(addr string) int { helloMain(addr); return 0 }})
	dir, err := os.MkdirTemp("", "leasefs-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	leasefsBin = filepath.Join(dir, "leasefs")
	build := []string{"build", "-o", leasefsBin}
	if raceEnabled {
		build = append(build, "-race")
	}
	if out, err := exec.Command("go", append(build, ".")...).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building leasefs: %v\n%s", err, out)
		os.Exit(1)
	}
	leasefsBinNoRace = leasefsBin
	if raceEnabled {
		leasefsBinNoRace = filepath.Join(dir, "leasefs-norace")
		if out, err := exec.Command("go", "build", "-o", leasefsBinNoRace, ".").CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building leasefs: %v\n%s", err, out)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// startMount runs 'leasefs mount --foreground' on img, waits until
// the mount is in the mount table, and unmounts it and reaps the server
// when t ends.
func startMount(t testing.TB, img string, extra ...string) string {
	t.Helper()
	testenv.RequireFUSE(t)
	dir := t.TempDir()
	args := append([]string{"mount", "--foreground", "--image", img}, extra...)
	cmd := exec.Command(leasefsBin, append(args, dir)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		imgtest.Unmount(t, dir)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("mount server: %v\n%s", err, stderr.String())
			}
		case <-time.After(10 * time.Second):
			t.Errorf("mount server %d did not exit after unmount; killing it", cmd.Process.Pid)
			_ = cmd.Process.Kill()
		}
	})
	for deadline := time.Now().Add(10 * time.Second); !isFuseMount(t, dir); {
		select {
		case err := <-exited:
			t.Fatalf("mount server exited: %v\n%s", err, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("mount at %s not ready after 10s\n%s", dir, stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	return dir
}

// isFuseMount reports whether dir is a leasefs FUSE mount.
func isFuseMount(t testing.TB, dir string) bool {
	t.Helper()
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) > 2 && fields[1] == dir && fields[2] == "fuse.leasefs" {
			return true
		}
	}
	return false
}

// checkAgainstKernel mounts img with the kernel and with leasefs and
// compares everything seen through both.
func checkAgainstKernel(t *testing.T, img string) {
	t.Helper()
	kdir := imgtest.KernelMount(t, img, "ro")
	ldir := startMount(t, img)
	want := imgtest.Snapshot(t, kdir)
	got := imgtest.Snapshot(t, ldir)
	if len(want) < 10 {
		t.Fatalf("kernel mount shows only %d entries", len(want))
	}
	imgtest.Compare(t, want, got)
	imgtest.CompareReads(t, kdir, ldir, want, 7)
}

// TestMountMatchesKernel builds images with mkfs -d across feature sets,
// block sizes, inode sizes and directory hash variants, and checks that
// leasefs shows exactly what the kernel shows for each.
func TestMountMatchesKernel(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireLoop(t)
	testenv.RequireTool(t, "mkfs.ext4", "e2fsck", "tune2fs", "debugfs")
	const ext4 = "has_journal,extent,huge_file,flex_bg,dir_nlink,extra_isize,metadata_csum,64bit"
	cases := []struct {
		name   string
		fstype string
		args   []string
		spec   imgtest.TreeSpec
		shape  func(t *testing.T, img string)
	}{
		{name: "ext4-4k", fstype: "ext4", args: []string{"-O", ext4, "-I", "256"}},
		{name: "ext4-1k-inode128", fstype: "ext4", args: []string{"-O", ext4, "-I", "128"},
			spec: imgtest.TreeSpec{BlockSize: 1024, ManyEntries: 5000}},
		{name: "ext4-2k-inode512", fstype: "ext4", args: []string{"-O", ext4, "-I", "512"},
			spec: imgtest.TreeSpec{BlockSize: 2048}},
		{name: "ext4-inline", fstype: "ext4", args: []string{"-O", ext4 + ",inline_data", "-I", "512"}},
		{name: "ext4-gdt-csum", fstype: "ext4", args: []string{"-O", "has_journal,extent,flex_bg,uninit_bg,^metadata_csum,^64bit"}},
		{name: "ext4-bigalloc", fstype: "ext4", args: []string{"-O", ext4 + ",bigalloc", "-C", "16384"}},
		{name: "ext4-meta-bg", fstype: "ext4", args: []string{"-O", ext4 + ",meta_bg,^resize_inode"},
			spec: imgtest.TreeSpec{BlockSize: 1024}},
		{name: "ext4-no-flex-32bit", fstype: "ext4", args: []string{"-O", "has_journal,extent,^flex_bg,^64bit,metadata_csum"}},
		{name: "ext4-csum-seed-largedir", fstype: "ext4", args: []string{"-O", ext4 + ",metadata_csum_seed,large_dir"}},
		{name: "ext3-1k", fstype: "ext3", args: []string{"-I", "128"},
			spec: imgtest.TreeSpec{BlockSize: 1024, FarSparse: 100 << 20}},
		{name: "ext2-4k", fstype: "ext2", args: nil},
		{name: "ext4-debugfs-shaped", fstype: "ext4", args: []string{"-O", ext4, "-I", "256"},
			shape: func(t *testing.T, img string) {
				imgtest.Debugfs(t, img,
					"sif sizes/f100 extra_isize 0", // a large inode without extra fields
					"sif sizes/f59 ctime_extra 0x7",
					"sif sizes/f1 generation 0xdeadbeef",
					"sif sizes/f60 uid_hi 0xfffe",
					"punch sizes/f1048583 5 40",
					"fallocate sizes/f65537 20 30",
					"ea_set xattrs/small user.debugfs set-by-debugfs")
			}},
		{name: "ext2-1k-sparse-super2", fstype: "ext2", args: []string{"-O", "sparse_super2"},
			spec: imgtest.TreeSpec{BlockSize: 1024, FarSparse: 100 << 20}},
	}
	for _, hash := range []string{"legacy", "half_md4", "tea"} {
		for _, unsigned := range []bool{false, true} {
			name := "ext4-hash-" + hash
			if unsigned {
				name += "-unsigned"
			}
			cases = append(cases, struct {
				name   string
				fstype string
				args   []string
				spec   imgtest.TreeSpec
				shape  func(t *testing.T, img string)
			}{name: name, fstype: "ext4", args: []string{"-O", ext4},
				spec: imgtest.TreeSpec{BlockSize: 1024, ManyEntries: 3000, NoSpecial: true},
				shape: func(t *testing.T, img string) {
					imgtest.Run(t, "tune2fs", "-E", "hash_alg="+hash, img)
					if unsigned {
						imgtest.Debugfs(t, img, "ssv flags 2")
					}
				}})
		}
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			spec := c.spec
			spec.Seed = uint64(len(c.name))
			if spec.BlockSize == 0 {
				spec.BlockSize = 4096
			}
			if spec.ManyEntries == 0 {
				spec.ManyEntries = 600
			}
			src := t.TempDir()
			imgtest.Populate(t, src, spec)
			args := append([]string{"-b", strconv.Itoa(spec.BlockSize)}, c.args...)
			img := imgtest.Mkfs(t, c.fstype, src, 256, args...)
			if c.shape != nil {
				c.shape(t, img)
			}
			imgtest.Fsck(t, img, "-yD") // builds the htrees mkfs -d does not
			checkAgainstKernel(t, img)
		})
	}
}
