package vmtest

import (
	"bufio"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/conformance"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// A kernel is one guest kernel line the tests boot: Debian's cloud
// kernel of a release.
type kernel struct {
	name, release string
}

// kernels: Firecracker's guest kernel lines (5.10, 6.1; 6.1 is also
// Debian 12's own) and the newest Debian 12 has (6.12, from
// backports). LEASEFS_VM_KERNELS=6.1,6.12 boots only those.
var kernels = []kernel{{"5.10", "bullseye"}, {"6.1", "bookworm"}, {"6.12", "bookworm-backports"}}

// insideEnv tells the test binary it runs as the VM's test program.
const insideEnv = "LEASEFS_VM_INSIDE"

// The modules the VM loads (with what they depend on) where the kernel
// does not have them built in.
var modules = []string{"virtio_pci", "virtio_blk", "loop", "fuse", "vsock", "vmw_vsock_virtio_transport_common", "vsock_loopback"}

// TestGuestKernels boots each guest kernel under QEMU and runs the
// scenarios of inside_test.go in it, through the real binary: the host
// agent on the image attached read-write, the guest on the same image
// attached read-only, between them AF_VSOCK loopback. Inside the VM the
// same test is the VM's test program and runs the scenarios.
func TestGuestKernels(t *testing.T) {
	if os.Getenv(insideEnv) != "" {
		inside(t)
		return
	}
	busybox, bin := programs(t)
	src := source(t)
	cache := cacheDir(t)
	torture := os.Getenv("LEASEFS_VM_TORTURE")
	if torture == "" {
		torture = "30s"
	}
	init := fmt.Sprintf(initScript, torture, insideTimeout)
	for _, k := range selected(t) {
		t.Run(k.name, func(t *testing.T) {
			kdir := fetchKernel(t, k, cache)
			initrd := filepath.Join(cache, "initramfs-"+k.name+".cpio") // kept, to boot by hand
			buildInitramfs(t, initrd, kdir, busybox, bin, init, modules)
			img := imgtest.Mkfs(t, "ext4", src, 256, "-b", "4096")
			boot(t, vmBoot{name: k.name, test: "TestGuestKernels", want: scenarioNames, console: filepath.Join(cache, "console-"+k.name+".log"),
				env: []string{"KERNEL=" + filepath.Join(kdir, "vmlinuz"), "INITRD=" + initrd, "IMAGE=" + img}})
		})
	}
}

// source is the tree the VM tests export: a varied tree, the
// conformance suite's, and "hello".
func source(t testing.TB) string {
	src := t.TempDir()
	imgtest.Populate(t, src, imgtest.TreeSpec{Seed: 5, BlockSize: 4096, ManyEntries: 300, NanoTimes: true})
	conformance.Populate(t, src)
	if err := os.WriteFile(filepath.Join(src, "hello"), []byte(helloText), 0o644); err != nil {
		t.Fatal(err)
	}
	return src
}

// programs checks for what the VM tests need on this machine and
// builds the static programs that go into a VM's initramfs: it returns
// busybox's path and the directory holding leasefs and vmtest (this
// package's test binary).
func programs(t testing.TB) (busybox, bin string) {
	if runtime.GOARCH != "amd64" {
		testenv.Unavailable(t, "the VM tests boot amd64 kernels")
	}
	testenv.RequireRoot(t) // the test tree's owners and modes
	testenv.RequireTool(t, "qemu-system-x86_64", "busybox", "mkfs.ext4", "apt-get", "dpkg-deb", "xz")
	busybox, _ = exec.LookPath("busybox")
	if !static(busybox) {
		testenv.Unavailable(t, "%s is not static (make deps installs busybox-static)", busybox)
	}
	bin = t.TempDir()
	for _, b := range [][]string{
		{"build", "-o", filepath.Join(bin, "leasefs"), "github.com/leasefs/leasefs/cmd/leasefs"},
		{"test", "-c", "-o", filepath.Join(bin, "vmtest"), "."},
	} {
		cmd := exec.Command("go", b...)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0") // no libc in the VM
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go %s: %v\n%s", strings.Join(b, " "), err, out)
		}
	}
	return busybox, bin
}

// fetchKernel returns the directory holding k's vmlinuz and modules.
func fetchKernel(t testing.TB, k kernel, cache string) string {
	out, err := exec.Command("./debian.sh", "kernel", k.release, cache).Output()
	if err != nil {
		testenv.Unavailable(t, "fetching the %s kernel: %v %s", k.release, err, testenv.StderrOf(err))
	}
	return strings.TrimSpace(string(out))
}

// selected is the kernels to boot: all those of CI, or those named in
// LEASEFS_VM_KERNELS (e.g. "6.1,6.12").
func selected(t *testing.T) []kernel {
	v := os.Getenv("LEASEFS_VM_KERNELS")
	if v == "" {
		return kernels
	}
	var out []kernel
	for _, name := range strings.Split(v, ",") {
		found := false
		for _, k := range kernels {
			if k.name == name {
				out, found = append(out, k), true
			}
		}
		if !found {
			t.Fatalf("LEASEFS_VM_KERNELS: no kernel %q", name)
		}
	}
	return out
}

// static reports whether the program at path runs without a dynamic
// loader (there is none in the VM).
func static(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}

// cacheDir keeps the fetched kernels, the last initramfs and console of
// each between runs:
// $LEASEFS_VM_CACHE, or /var/cache/leasefs-vm.
func cacheDir(t testing.TB) string {
	dir := os.Getenv("LEASEFS_VM_CACHE")
	if dir == "" {
		dir = "/var/cache/leasefs-vm"
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// initStart begins a VM's /init: the pseudo filesystems and the modules.
const initStart = `#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
for m in $(cat /modules/order); do insmod /modules/$m || echo "LEASEFS-VM: insmod $m failed"; done
echo "LEASEFS-VM-BOOTED $(uname -r)"
cd /tmp
`

// initScript is the VM's /init: initStart, then the test program, its
// exit status on the console, and power off.
const initScript = initStart + insideEnv + `=1 LEASEFS_VM_TORTURE=%s /bin/vmtest -test.run '^TestGuestKernels$' -test.v -test.timeout %s 2>&1
echo "LEASEFS-VM-EXIT $?"
poweroff -f
`

// buildInitramfs writes the VM's root: busybox and its applets, the
// modules in load order, leasefs, the test program, and init as /init.
func buildInitramfs(t testing.TB, path, kdir, busybox, bin, init string, modules []string) {
	vers, err := os.ReadDir(filepath.Join(kdir, "lib/modules"))
	if err != nil || len(vers) != 1 {
		t.Fatalf("%s: want one module tree: %v", kdir, err)
	}
	mods, err := Modules(filepath.Join(kdir, "lib/modules", vers[0].Name()), modules...)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	a := NewInitramfs(f)
	for _, d := range []string{"proc", "sys", "dev", "tmp", "run", "export"} {
		a.Dir(d)
	}
	a.Copy("bin/busybox", busybox, 0o755)
	applets, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range strings.Fields(string(applets)) {
		if name != "busybox" {
			a.Symlink("bin/"+name, "busybox")
		}
	}
	var order []string
	for _, m := range mods {
		a.Copy("modules/"+filepath.Base(m), m, 0o644)
		order = append(order, filepath.Base(m))
	}
	a.File("modules/order", 0o644, []byte(strings.Join(order, "\n")+"\n"))
	a.Copy("bin/leasefs", filepath.Join(bin, "leasefs"), 0o755)
	a.Copy("bin/vmtest", filepath.Join(bin, "vmtest"), 0o755)
	a.File("init", 0o755, []byte(init))
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
}

// insideTimeout bounds the scenarios in the VM; vmDeadline bounds the
// whole VM, boot and power-off included. A VM that hangs is killed at
// the deadline and the test fails with its console's tail.
const (
	insideTimeout = "8m"
	vmDeadline    = 10 * time.Minute
)

// A vmBoot is a VM to boot and what it must report.
type vmBoot struct {
	name    string
	env     []string // test-vm.sh's: KERNEL, INITRD, IMAGE, ROOT
	console string   // where its console is kept
	test    string   // the test the VM runs, whose subtests must pass
	want    []string // those subtests
}

// boot runs the VM with examples/qemu/test-vm.sh — the command line a
// user boots it with by hand — and checks what its console reports:
// each scenario passed, and the test program exited 0.
func boot(t *testing.T, k vmBoot) {
	resultLine := regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): ` + k.test + `/(\S+) \(([0-9.]+s)\)`)
	consolePath := k.console
	ctx, cancel := context.WithTimeout(context.Background(), vmDeadline)
	defer cancel()
	cmd := exec.CommandContext(ctx, "../../examples/qemu/test-vm.sh")
	cmd.Env = append(os.Environ(), k.env...)
	if os.Getenv("LEASEFS_VM_ACCEL") != "" {
		cmd.Env = append(cmd.Env, "ACCEL="+os.Getenv("LEASEFS_VM_ACCEL"))
	}
	cmd.WaitDelay = 5 * time.Second
	// The VM goes with the test, also when go test's -timeout ends it
	// with a panic and no cleanup runs. Boot's goroutine stays on its
	// thread until the VM is done, so the signal cannot come early.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	console, err := os.Create(consolePath)
	if err != nil {
		t.Fatal(err)
	}
	defer console.Close()
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill() }) // a no-op once it has exited
	var (
		mu      sync.Mutex
		lines   []string
		booted  time.Duration
		exit    = -1
		results = map[string]string{}
		times   []string
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := strings.TrimRight(sc.Text(), "\r")
			fmt.Fprintln(console, line)
			mu.Lock()
			lines = append(lines, line)
			if strings.HasPrefix(line, "LEASEFS-VM-BOOTED") {
				booted = time.Since(start)
			}
			if m := resultLine.FindStringSubmatch(line); m != nil {
				results[m[2]] = m[1]
				if !strings.Contains(m[2], "/") {
					times = append(times, fmt.Sprintf("%s %s %s", m[2], m[1], m[3]))
				}
			}
			fmt.Sscanf(line, "LEASEFS-VM-EXIT %d", &exit)
			mu.Unlock()
		}
	}()
	werr := cmd.Wait()
	pw.Close()
	<-done
	mu.Lock()
	defer mu.Unlock()
	tail := lines[max(0, len(lines)-150):]
	if ctx.Err() != nil {
		t.Fatalf("%s: the VM did not finish in %v; killed. Console tail (all of it in %s):\n%s",
			k.name, vmDeadline, consolePath, strings.Join(tail, "\n"))
	}
	t.Logf("%s: userspace after %v, all done after %v; %s", k.name, booted.Round(100*time.Millisecond),
		time.Since(start).Round(100*time.Millisecond), strings.Join(times, ", "))
	var failed []string
	for _, s := range k.want {
		if results[s] != "PASS" {
			failed = append(failed, fmt.Sprintf("%s (%s)", s, orNone(results[s])))
		}
	}
	if exit != 0 || len(failed) > 0 {
		t.Fatalf("%s: the test program exited %d (qemu: %v); not passed: %v. Console tail (all of it in %s):\n%s",
			k.name, exit, werr, failed, consolePath, strings.Join(tail, "\n"))
	}
}

func orNone(s string) string {
	if s == "" {
		return "no result"
	}
	return s
}
