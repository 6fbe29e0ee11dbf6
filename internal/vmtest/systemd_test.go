package vmtest

// The units under a real systemd: a Debian root (mmdebstrap, cached like
// the kernels) boots under QEMU with make install's files in it, and a
// service of its own runs the scenarios below against leasefs-host and
// leasefs-guest@ as an operator would, with systemctl and journalctl.

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// systemdEnv tells the test binary it runs as the systemd VM's test
// service; rootSuite is the Debian release of its root (systemd 257:
// $FDSTORE and an fd store kept across 'systemctl restart').
const (
	systemdEnv = "LEASEFS_VM_SYSTEMD"
	rootSuite  = "trixie"
)

// The scenarios in the order they run, each on what the one before left.
var systemdScenarios = []struct {
	name string
	run  func(*testing.T, *unitVM)
}{
	{"host_unit_starts_hardened", hostUnitStarts},
	{"guest_unit_mounts", guestUnitMounts},
	{"reload_applies", reloadApplies},
	{"reload_refused_fails", reloadRefused},
	{"upgrade_keeps_open_files", upgradeKeeps},
	{"restart_keeps_open_files", restartKeeps},
	{"kill_keeps_open_files", killKeeps},
	{"journal_priorities", journalPriorities},
	{"stop_gives_errors", stopGivesErrors},
	{"guest_unit_retries_and_stops", guestRetriesAndStops},
}

// initSystemd is the initramfs's /init for the systemd VM: the modules,
// then the root on the first drive, and systemd on it.
const initSystemd = `#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "LEASEFS-VM: insmod $m failed"; done
echo "LEASEFS-VM-BOOTED $(uname -r)"
mkdir -p /newroot
mount -t ext4 -o rw /dev/vda /newroot || { echo "LEASEFS-VM: cannot mount the root"; poweroff -f; }
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
`

// testService runs the scenarios once the VM is up, on the console, and
// powers it off.
const testService = `[Unit]
Description=leasefs's systemd scenarios
After=multi-user.target

[Service]
Environment=` + systemdEnv + `=1
ExecStart=/bin/sh -c '/usr/local/libexec/leasefs-vmtest -test.run "^TestSystemd$" -test.v -test.timeout ` + insideTimeout + ` 2>&1; echo "LEASEFS-VM-EXIT $?"; systemctl poweroff --no-block'
StandardOutput=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
`

// TestSystemd boots a Debian root with systemd on the 6.1 kernel, with
// leasefs installed into it by 'make install', and runs the scenarios.
func TestSystemd(t *testing.T) {
	if os.Getenv(systemdEnv) != "" {
		vm := &unitVM{}
		for _, s := range systemdScenarios {
			if !t.Run(s.name, func(t *testing.T) { s.run(t, vm) }) {
				break // each builds on the one before
			}
		}
		return
	}
	busybox, bin := programs(t)
	testenv.RequireTool(t, "mmdebstrap")
	cache := cacheDir(t)
	kdir := fetchKernel(t, kernel{"6.1", "bookworm"}, cache)
	out, err := exec.Command("./debian.sh", "root", rootSuite, cache).Output()
	if err != nil {
		testenv.Unavailable(t, "building the Debian root: %v %s", err, testenv.StderrOf(err))
	}
	root := filepath.Join(t.TempDir(), "root.img")
	if out, err := exec.Command("cp", "--sparse=always", strings.TrimSpace(string(out)), root).CombinedOutput(); err != nil {
		t.Fatalf("copying the root: %v %s", err, out)
	}
	install(t, root, bin)
	initrd := filepath.Join(cache, "initramfs-systemd.cpio")
	buildInitramfs(t, initrd, kdir, busybox, bin, initSystemd, modules)
	src := source(t)
	held := make([]byte, 4<<20)
	for i := range held {
		held[i] = byte(i*7 + i>>13)
	}
	if err := os.WriteFile(filepath.Join(src, heldFile), held, 0o644); err != nil {
		t.Fatal(err)
	}
	img := imgtest.Mkfs(t, "ext4", src, 256, "-b", "4096")
	var names []string
	for _, s := range systemdScenarios {
		names = append(names, s.name)
	}
	boot(t, vmBoot{name: "systemd", test: "TestSystemd", want: names, console: filepath.Join(cache, "console-systemd.log"),
		env: []string{"KERNEL=" + filepath.Join(kdir, "vmlinuz"), "INITRD=" + initrd, "IMAGE=" + img, "ROOT=" + root, "MEMORY=1024"}})
}

// install puts into the root image what 'make install' installs, the
// test program, and the service that runs it.
func install(t *testing.T, root, bin string) {
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-o", "loop", root, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mounting the root: %v %s", err, out)
	}
	defer imgtest.Unmount(t, mnt)
	mk := exec.Command("make", "-C", "../..", "install", "DESTDIR="+mnt, "PREFIX=/usr/local", "BIN="+filepath.Join(bin, "leasefs-installed"))
	if out, err := mk.CombinedOutput(); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	for path, body := range map[string]string{
		"etc/systemd/system/leasefs-vmtest.service": testService,
	} {
		if err := os.WriteFile(filepath.Join(mnt, path), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range [][]string{
		{"install", "-D", "-m", "0755", filepath.Join(bin, "vmtest"), filepath.Join(mnt, "usr/local/libexec/leasefs-vmtest")},
		{"ln", "-sf", "/etc/systemd/system/leasefs-vmtest.service", filepath.Join(mnt, "etc/systemd/system/multi-user.target.wants/leasefs-vmtest.service")},
		// The console is the scenarios': a getty starting on it later
		// would hang it up under them, and their output would be lost.
		{"ln", "-sf", "/dev/null", filepath.Join(mnt, "etc/systemd/system/serial-getty@ttyS0.service")},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v %s", c, err, out)
		}
	}
}

// Inside the VM.

const (
	unitHostConf  = "/etc/leasefs/host.toml"
	unitGuestConf = "/etc/leasefs/guest-test.conf"
	unitMount     = "/mnt/test"
	unitExport    = "/srv/export"
	heldFile      = "held" // a file of the exported tree, read while held open
)

// unitVM is what the scenarios share: a file held open on the guest's
// mount, and its bytes as the export has them.
type unitVM struct {
	held *os.File
	want []byte
}

// sh runs a shell command, returning its output and error.
func sh(cmd string) (string, error) {
	out, err := exec.Command("/bin/sh", "-c", cmd).CombinedOutput()
	return string(out), err
}

// must runs a shell command that must succeed.
func must(t *testing.T, cmd string) string {
	t.Helper()
	out, err := sh(cmd)
	if err != nil {
		t.Fatalf("%s: %v\n%s", cmd, err, out)
	}
	return out
}

// prop is a unit's property (systemctl show).
func prop(t *testing.T, unit, name string) string {
	t.Helper()
	return strings.TrimSpace(must(t, "systemctl show -P "+name+" "+unit))
}

// waitUntil polls cond for up to d.
func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func writeFile(t *testing.T, path, body string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}

// hostSettings writes host.toml, with listen addresses beside the guests'.
func hostSettings(t *testing.T, extra ...string) {
	listen := []string{`"unix:/run/leasefs/guests.sock"`}
	for _, e := range extra {
		listen = append(listen, strconv.Quote(e))
	}
	writeFile(t, unitHostConf, fmt.Sprintf(`auto-publish = "off"
grace = "60s"
listen = [%s]

[export.test]
device = "/dev/vdb"
mount = %q
`, strings.Join(listen, ", "), unitExport))
}

// checkHeld reads the held file's next stretch and compares it.
func (vm *unitVM) checkHeld(t *testing.T) {
	t.Helper()
	buf := make([]byte, len(vm.want))
	n, err := vm.held.ReadAt(buf, 0)
	if err != nil || !bytes.Equal(buf[:n], vm.want) {
		t.Fatalf("the held file read %d bytes, %v; equal: %v", n, err, bytes.Equal(buf[:n], vm.want))
	}
}

func hostUnitStarts(t *testing.T, vm *unitVM) {
	must(t, "mkdir -p "+unitExport+" "+unitMount+" && mount -t ext4 /dev/vdb "+unitExport)
	hostSettings(t)
	writeFile(t, unitGuestConf, "LEASEFS_CONNECT=unix:/run/leasefs/guests.sock\nLEASEFS_MOUNTPOINT="+unitMount+
		"\nLEASEFS_GUEST_ARGS=\"--device /dev/vdc --down soft=5s\"\n")
	// The export's mount point is named as the unit's comments say.
	writeFile(t, "/etc/systemd/system/leasefs-host.service.d/mounts.conf", "[Unit]\nRequiresMountsFor="+unitExport+"\n")
	must(t, "systemctl daemon-reload")
	must(t, "systemctl start leasefs-host")
	if s := prop(t, "leasefs-host", "ActiveState"); s != "active" {
		t.Fatalf("leasefs-host is %s", s)
	}
	if p := prop(t, "leasefs-host", "ProtectSystem"); p != "strict" {
		t.Fatalf("ProtectSystem=%s", p)
	}
	// In the service's namespace the export's mount is read-only; the
	// agent serves it all the same.
	pid := prop(t, "leasefs-host", "MainPID")
	if mi := must(t, "grep ' "+unitExport+" ' /proc/"+pid+"/mountinfo"); !strings.Contains(mi, " ro,") && !strings.Contains(mi, " ro ") {
		t.Errorf("the export is not read-only in the agent's namespace: %s", mi)
	}
	waitUntil(t, 10*time.Second, "systemd's status line", func() bool {
		return strings.Contains(prop(t, "leasefs-host", "StatusText"), "test generation 1")
	})
	t.Logf("status: %s", prop(t, "leasefs-host", "StatusText"))
}

func guestUnitMounts(t *testing.T, vm *unitVM) {
	must(t, "systemctl start leasefs-guest@test")
	b, err := os.ReadFile(filepath.Join(unitMount, "hello"))
	if err != nil || string(b) != helloText {
		t.Fatalf("hello through the guest unit's mount: %q %v", b, err)
	}
	if vm.want, err = os.ReadFile(filepath.Join(unitExport, heldFile)); err != nil {
		t.Fatal(err)
	}
	if vm.held, err = os.Open(filepath.Join(unitMount, heldFile)); err != nil {
		t.Fatal(err)
	}
	vm.checkHeld(t)
}

func reloadApplies(t *testing.T, vm *unitVM) {
	hostSettings(t, "unix:/run/leasefs/second.sock")
	out := must(t, "systemctl reload leasefs-host")
	if _, err := os.Stat("/run/leasefs/second.sock"); err != nil {
		t.Fatalf("after the reload (%s): %v", out, err)
	}
	if s := prop(t, "leasefs-host", "ActiveState"); s != "active" {
		t.Fatalf("leasefs-host is %s", s)
	}
	vm.checkHeld(t)
}

func reloadRefused(t *testing.T, vm *unitVM) {
	writeFile(t, unitHostConf, "listen = 5\n")
	out, err := sh("systemctl reload leasefs-host")
	if err == nil {
		t.Fatalf("a reload of a bad file succeeded: %s", out)
	}
	j := must(t, "journalctl -u leasefs-host -p err -o cat --no-pager")
	if !strings.Contains(j, "reload refused") {
		t.Errorf("no error in the journal for the refused reload:\n%s", j)
	}
	if s := prop(t, "leasefs-host", "ActiveState"); s != "active" {
		t.Fatalf("leasefs-host is %s after a refused reload", s)
	}
	if _, err := os.Stat("/run/leasefs/second.sock"); err != nil {
		t.Errorf("the refused reload changed the listen addresses: %v", err)
	}
	if out := must(t, "leasefs host --check-config || true"); !strings.Contains(out, "listen") {
		t.Errorf("--check-config of the bad file: %s", out)
	}
	hostSettings(t, "unix:/run/leasefs/second.sock")
	if out := must(t, "leasefs host --check-config"); !strings.Contains(out, "nothing changes") {
		t.Errorf("--check-config of the running settings: %s", out)
	}
	vm.checkHeld(t)
}

func upgradeKeeps(t *testing.T, vm *unitVM) {
	pid := prop(t, "leasefs-host", "MainPID")
	out := must(t, "leasefs upgrade")
	if !strings.Contains(out, "upgraded") {
		t.Fatalf("leasefs upgrade: %s", out)
	}
	if now := prop(t, "leasefs-host", "MainPID"); now != pid {
		t.Errorf("the upgrade changed the main pid %s -> %s", pid, now)
	}
	waitUntil(t, 10*time.Second, "the unit active again", func() bool { return prop(t, "leasefs-host", "ActiveState") == "active" })
	vm.checkHeld(t)
	// The new run can notify systemd: its status line comes back.
	waitUntil(t, 10*time.Second, "a status line from the new run", func() bool {
		return strings.Contains(prop(t, "leasefs-host", "StatusText"), "serving test")
	})
}

func restartKeeps(t *testing.T, vm *unitVM) {
	must(t, "systemctl restart leasefs-host")
	vm.checkHeld(t)
	if out := must(t, "journalctl -u leasefs-host -o cat --no-pager"); !strings.Contains(out, "stopped") {
		t.Errorf("no stop line in the journal")
	}
}

func killKeeps(t *testing.T, vm *unitVM) {
	before := prop(t, "leasefs-host", "NRestarts")
	pid, _ := strconv.Atoi(prop(t, "leasefs-host", "MainPID"))
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "systemd restarting the killed agent", func() bool {
		return prop(t, "leasefs-host", "NRestarts") != before && prop(t, "leasefs-host", "ActiveState") == "active"
	})
	vm.checkHeld(t)
}

func journalPriorities(t *testing.T, vm *unitVM) {
	all := must(t, "journalctl -u leasefs-host -o cat --no-pager")
	warn := must(t, "journalctl -u leasefs-host -p warning -o cat --no-pager")
	if !strings.Contains(all, "ready") || strings.Contains(warn, "ready") {
		t.Errorf("the info line 'ready' should be in the journal but not at warning: %v, %v", strings.Contains(all, "ready"), strings.Contains(warn, "ready"))
	}
	if !strings.Contains(warn, "reload refused") {
		t.Errorf("the refused reload is not at warning or above:\n%s", warn)
	}
}

func stopGivesErrors(t *testing.T, vm *unitVM) {
	must(t, "systemctl stop leasefs-host")
	// The guest knows no more whether the host holds the file: reads of
	// it fail (after --down soft=5s), never give other bytes. (What its
	// page cache has of the file is the file's own bytes: dropped, so
	// that the read asks the guest.)
	must(t, "echo 3 >/proc/sys/vm/drop_caches")
	buf := make([]byte, len(vm.want))
	n, err := vm.held.ReadAt(buf, 0)
	if err == nil || !(errors.Is(err, syscall.EIO) || errors.Is(err, syscall.ESTALE)) {
		t.Fatalf("the held file after systemctl stop read %d bytes, %v; want EIO or ESTALE", n, err)
	}
	if n > 0 && !bytes.Equal(buf[:n], vm.want[:n]) {
		t.Fatalf("the held file gave other bytes after the stop")
	}
	vm.held.Close()
	if s := prop(t, "leasefs-guest@test", "ActiveState"); s != "active" {
		t.Errorf("the guest unit is %s while the host is stopped", s)
	}
}

func guestRetriesAndStops(t *testing.T, vm *unitVM) {
	must(t, "systemctl restart --no-block leasefs-guest@test")
	time.Sleep(3 * time.Second)
	if s := prop(t, "leasefs-guest@test", "ActiveState"); s != "activating" {
		t.Errorf("the guest unit without its host is %s, want activating (retrying)", s)
	}
	must(t, "systemctl start leasefs-host")
	waitUntil(t, 60*time.Second, "the guest unit mounting once the host is back", func() bool {
		return prop(t, "leasefs-guest@test", "ActiveState") == "active"
	})
	if b, err := os.ReadFile(filepath.Join(unitMount, "hello")); err != nil || string(b) != helloText {
		t.Fatalf("hello after the guest came back: %q %v", b, err)
	}
	must(t, "systemctl stop leasefs-guest@test")
	if s := prop(t, "leasefs-guest@test", "ActiveState"); s != "inactive" {
		t.Errorf("the stopped guest unit is %s", s)
	}
	if out, _ := sh("grep ' " + unitMount + " ' /proc/self/mountinfo"); out != "" {
		t.Errorf("still mounted after the stop: %s", out)
	}
}
