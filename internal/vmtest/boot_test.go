package vmtest

// A VM that boots with /usr from leasefs: its initramfs mounts /usr from
// the host agent on this machine (over vhost-user vsock) before the
// switch to the real root, whose /usr is empty; systemd, python3, perl
// and apt run from it; the host upgrades a package in it dpkg-style
// under a running service; the VM reboots and powers off.

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// initBootUsr is the initramfs's /init: the modules, the root from the
// first drive, /usr as the kernel command line says (mount.usr=,
// mount.usrfstype=, mount.usrflags=, as systemd reads them), then
// systemd. The API filesystems move to the new root with the guest
// agent's /dev (its FUSE and disk descriptors) and /run (its status
// socket).
const initBootUsr = initStart + `fail() { echo "LEASEFS-VM: $*"; poweroff -f; }
mkdir -p /newroot
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount the root"
for a in $(cat /proc/cmdline); do
	case $a in
	mount.usr=*) usr=${a#mount.usr=} ;;
	mount.usrfstype=*) usrfstype=${a#mount.usrfstype=} ;;
	mount.usrflags=*) usrflags=${a#mount.usrflags=} ;;
	esac
done
if [ "$usrfstype" = fuse.leasefs ]; then
	/bin/leasefs mount-helper "$usr" /newroot/usr -o "$usrflags" || fail "cannot mount /usr from leasefs"
elif [ -n "$usr" ]; then
	mount -t "$usrfstype" -o "$usrflags" "$usr" /newroot/usr || fail "cannot mount /usr from $usr"
fi
for d in dev proc sys run; do mount -o move /$d /newroot/$d; done
exec switch_root /newroot /sbin/init
`

// The demo "package" the host upgrades under the VM: a module, and a
// service that imported it at boot and says which version it has.
const (
	demoDir     = "lib/lfs-demo" // under /usr
	demoService = `[Unit]
Description=a service running from /usr, started before the upgrade

[Service]
ExecStart=/usr/bin/python3 -c "import sys, time; sys.path.insert(0, '/usr/lib/lfs-demo'); import lfs_demo; open('/run/lfs-demo', 'w').write(lfs_demo.V); time.sleep(1e9)"

[Install]
WantedBy=multi-user.target
`
	serveService = `[Unit]
Description=the test's command server
After=local-fs.target

[Service]
Environment=` + serveEnv + `=1 LEASEFS_RUN_DIR=/run/leasefs
ExecStart=/opt/leasefs/vmtest
StandardOutput=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
`
)

// TestBootUsr boots the Debian root (made by debian.sh split: its /usr
// empty) on the 6.1 kernel with /usr the export "usr" of the host agent
// here, and checks what runs from it, an upgrade under it, a reboot and
// a power-off.
func TestBootUsr(t *testing.T) {
	bu := newBootUsr(t)
	f, k, kdir, root, bin := bu.f, bu.k, bu.kdir, bu.root, bu.bin

	// The host agent exports /usr, the demo module in it.
	writeDemo(t, f.mnt, "1.0", false)
	f.publish(t)

	spec := vmSpec{name: "boot", k: k, cache: "none", root: root, memory: 768,
		append: "mount.usr=usr mount.usrfstype=fuse.leasefs mount.usrflags=connect=vsock:2:" + port + ",device=/dev/vdb,storage-daemon,log=/dev/kmsg"}
	v := f.start(t, spec)
	v.ready(t)
	t.Run("usr_from_leasefs", func(t *testing.T) {
		if mi := v.sh(t, "grep ' /usr ' /proc/self/mountinfo"); !strings.Contains(mi, "fuse.leasefs") {
			t.Fatalf("/usr is not leasefs: %s", mi)
		}
		if st := v.sh(t, "systemctl is-system-running --wait || true"); !strings.Contains(st, "running") && !strings.Contains(st, "degraded") {
			t.Errorf("systemd: %s", st)
		}
		if ps := v.sh(t, "cat /proc/$(pidof -s @leasefs-guest || pgrep -f -o '^@leasefs-guest')/cmdline | tr '\\0' ' '"); !strings.HasPrefix(ps, "@leasefs-guest guest") {
			t.Errorf("the guest agent's command line: %q", ps)
		}
	})
	t.Run("programs_run", func(t *testing.T) {
		for script, want := range map[string]string{
			`python3 -c 'import json, sqlite3, ssl, lzma, ctypes; print(json.dumps({"ok": sqlite3.sqlite_version != ""}))'`: `{"ok": true}`,
			`perl -MPOSIX -e 'print "perl ", floor(2.5), "\n"'`:                                                             "perl 2",
			`apt-cache policy apt | head -2`:                                                                                "apt:",
			`ls /usr/bin | wc -l`:                                                                                           "",
		} {
			if out := v.sh(t, script); !strings.Contains(out, want) {
				t.Errorf("%s: %q, want %q", script, out, want)
			}
		}
	})
	t.Run("upgrade_under_a_service", func(t *testing.T) {
		pid := strings.TrimSpace(v.sh(t, "systemctl show -P MainPID lfs-demo"))
		if got := v.sh(t, "cat /run/lfs-demo"); got != "lfs_demo 1.0" {
			t.Fatalf("the service's version before: %q", got)
		}
		writeDemo(t, f.mnt, "2.0", true) // dpkg: NAME.dpkg-new, renamed over NAME
		f.publish(t)
		want := "lfs_demo 2.0"
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			got := strings.TrimSpace(v.sh(t, "python3 -c 'import sys; sys.path.insert(0, \"/usr/"+demoDir+"\"); import lfs_demo; print(lfs_demo.V)'"))
			if got == want {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("a new process after the publish: %q, want %q", got, want)
			}
		}
		if now := strings.TrimSpace(v.sh(t, "systemctl show -P MainPID lfs-demo")); now != pid || v.sh(t, "systemctl is-active lfs-demo") != "active\n" {
			t.Errorf("the service started before: pid %s -> %s", pid, now)
		}
		if got := v.sh(t, "cat /run/lfs-demo; kill -0 "+pid+" && echo ' alive'"); got != "lfs_demo 1.0 alive\n" {
			t.Errorf("the service started before: %q", got)
		}
	})
	t.Run("reboot_and_poweroff", func(t *testing.T) {
		_, _ = v.shErr("systemctl reboot --no-block")
		waitExit(t, v, "reboot: Restarting system")
		v.kill() // its backend too; the next boot gets new ones
		v2 := f.start(t, vmSpec{name: "boot2", k: k, cache: "none", root: root, memory: 768, append: spec.append})
		v2.ready(t)
		if got := v2.sh(t, "python3 -c 'import sys; sys.path.insert(0, \"/usr/"+demoDir+"\"); import lfs_demo; print(lfs_demo.V)'"); got != "lfs_demo 2.0\n" {
			t.Errorf("after the reboot: %q", got)
		}
		_, _ = v2.shErr("systemctl poweroff --no-block")
		waitExit(t, v2, "reboot: Power down")
	})
	// Debian's own initramfs, made by mkinitramfs with the hook and
	// script of examples/boot/initramfs-tools, in the VM's root (with
	// the export as its /usr, where initramfs-tools is installed).
	t.Run("initramfs_tools", func(t *testing.T) {
		initrd := debianInitramfs(t, root, f.mnt, kdir, bin)
		f.publish(t)
		v3 := f.start(t, vmSpec{name: "boot3", k: k, cache: "none", root: root, memory: 768, initrd: initrd,
			append: "root=/dev/vda rw " + spec.append})
		v3.ready(t)
		if mi := v3.sh(t, "grep ' /usr ' /proc/self/mountinfo"); !strings.Contains(mi, "fuse.leasefs") {
			t.Fatalf("/usr is not leasefs: %s", mi)
		}
		if out := v3.sh(t, "python3 -c 'import ssl; print(\"ok\")'; cat /proc/$(pgrep -f -o '^@leasefs-guest')/cmdline | tr '\\0' ' '"); !strings.HasPrefix(out, "ok\n@leasefs-guest guest") {
			t.Errorf("from Debian's initramfs: %q", out)
		}
		_, _ = v3.shErr("systemctl poweroff --no-block")
		waitExit(t, v3, "reboot: Power down")
	})
}

// A bootUsr is what a VM booting with /usr from leasefs needs: the host
// agent here serving a copy of the Debian /usr (debian.sh split) as the
// export "usr", the 6.1 kernel with an initramfs of initBootUsr, and a
// copy of the root image (its /usr empty) with the test's units.
type bootUsr struct {
	f         *fleet
	k         kernel
	kdir      string // the kernel's files
	root, bin string
}

func newBootUsr(t testing.TB) *bootUsr {
	busybox, bin := programs(t)
	testenv.RequireTool(t, "mmdebstrap")
	k := kernel{"6.1", "bookworm"}
	f := &fleet{t: t, cache: cacheDir(t), bin: bin, cid: 2, export: "usr", initrds: map[string]string{}, vmlinuzes: map[string]string{}}
	out, err := exec.Command("./debian.sh", "vhost", f.cache).Output()
	if err != nil {
		testenv.Unavailable(t, "fetching vhost-device-vsock: %v %s", err, testenv.StderrOf(err))
	}
	f.vhost = strings.TrimSpace(string(out))
	kdir := fetchKernel(t, k, f.cache)
	f.vmlinuzes[k.name] = filepath.Join(kdir, "vmlinuz")
	f.initrds[k.name] = filepath.Join(f.cache, "initramfs-boot-usr.cpio")
	buildInitramfs(t, f.initrds[k.name], kdir, busybox, bin, initBootUsr, fleetModules)
	out, err = exec.Command("./debian.sh", "split", rootSuite, f.cache).Output()
	if err != nil {
		testenv.Unavailable(t, "building the Debian root and /usr: %v %s", err, testenv.StderrOf(err))
	}
	images := strings.Fields(string(out))
	tmp := t.TempDir()
	root, usr := filepath.Join(tmp, "root.img"), filepath.Join(tmp, "usr.img")
	for i, dst := range []string{root, usr} {
		if out, err := exec.Command("cp", "--sparse=always", images[i], dst).CombinedOutput(); err != nil {
			t.Fatalf("copying %s: %v %s", images[i], err, out)
		}
	}
	installBootRoot(t, root, bin)
	f.serve(t, usr)
	return &bootUsr{f: f, k: k, kdir: kdir, root: root, bin: bin}
}

// debianInitramfs makes an initramfs with initramfs-tools in the root
// image (its /usr the export mounted at usr), with the kernel's modules
// and examples/boot/initramfs-tools, and returns its path.
func debianInitramfs(t *testing.T, root, usr, kdir, bin string) string {
	testenv.RequireTool(t, "chroot")
	vers, err := os.ReadDir(filepath.Join(kdir, "lib/modules"))
	if err != nil || len(vers) != 1 {
		t.Fatalf("%s: want one module tree: %v", kdir, err)
	}
	ver := vers[0].Name()
	mnt := t.TempDir()
	var mounted []string
	defer func() {
		for i := len(mounted) - 1; i >= 0; i-- {
			imgtest.Unmount(t, mounted[i])
		}
	}()
	for _, m := range [][]string{{"-o", "loop", root, mnt}, {"--bind", usr, mnt + "/usr"}, {"-t", "proc", "proc", mnt + "/proc"}, {"--bind", "/dev", mnt + "/dev"}} {
		if out, err := exec.Command("mount", m...).CombinedOutput(); err != nil {
			t.Fatalf("mount %v: %v %s", m, err, out)
		}
		mounted = append(mounted, m[len(m)-1])
	}
	ex := "../../examples/boot/initramfs-tools/"
	for _, c := range [][]string{
		{"cp", "/etc/resolv.conf", mnt + "/etc/resolv.conf"},
		{"chroot", mnt, "sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends initramfs-tools busybox"},
		{"mkdir", "-p", mnt + "/usr/lib/modules"},
		{"cp", "-a", filepath.Join(kdir, "lib/modules", ver), mnt + "/usr/lib/modules/"},
		{"chroot", mnt, "depmod", ver},
		{"install", "-m", "0755", filepath.Join(bin, "leasefs"), mnt + "/usr/local/bin/leasefs"},
		{"install", "-D", "-m", "0755", ex + "hooks/leasefs", mnt + "/etc/initramfs-tools/hooks/leasefs"},
		{"install", "-D", "-m", "0755", ex + "scripts/local-bottom/leasefs", mnt + "/etc/initramfs-tools/scripts/local-bottom/leasefs"},
		{"sed", "-i", "s/^MODULES=.*/MODULES=list/", mnt + "/etc/initramfs-tools/initramfs.conf"},
		{"sh", "-c", "printf 'virtio_pci\\nvirtio_blk\\n' >>" + mnt + "/etc/initramfs-tools/modules"},
		{"chroot", mnt, "mkinitramfs", "-o", "/tmp/initrd.img", ver},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			if strings.Contains(string(out), "Could not resolve") || strings.Contains(string(out), "Temporary failure") {
				testenv.Unavailable(t, "installing initramfs-tools in the VM's root needs Debian's archive: %s", out)
			}
			t.Fatalf("%v: %v\n%s", c, err, out)
		}
	}
	initrd := filepath.Join(t.TempDir(), "initrd.img")
	if out, err := exec.Command("cp", mnt+"/tmp/initrd.img", initrd).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	return initrd
}

// waitExit waits for the VM's QEMU to exit (it does not reboot: -no-reboot)
// and for its console to say want.
func waitExit(t testing.TB, v *vm, want string) {
	t.Helper()
	select {
	case <-v.qemuDone:
	case <-time.After(3 * time.Minute):
		t.Fatalf("VM %s did not stop within 3 minutes:\n%s", v.name, v.tailOf())
	}
	if !strings.Contains(v.console.String(), want) {
		t.Errorf("VM %s stopped without %q:\n%s", v.name, want, v.tailOf())
	}
}

// installBootRoot puts the test's command server and units into the
// root image (its /usr is the export's).
func installBootRoot(t testing.TB, root, bin string) {
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-o", "loop", root, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mounting the root: %v %s", err, out)
	}
	defer imgtest.Unmount(t, mnt)
	for path, body := range map[string]string{
		"etc/systemd/system/leasefs-vmtest-serve.service": serveService,
		"etc/systemd/system/lfs-demo.service":             demoService,
	} {
		if err := os.WriteFile(filepath.Join(mnt, path), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range [][]string{
		{"install", "-D", "-m", "0755", filepath.Join(bin, "vmtest"), filepath.Join(mnt, "opt/leasefs/vmtest")},
		{"ln", "-sf", "/etc/systemd/system/leasefs-vmtest-serve.service", filepath.Join(mnt, "etc/systemd/system/multi-user.target.wants/")},
		{"ln", "-sf", "/etc/systemd/system/lfs-demo.service", filepath.Join(mnt, "etc/systemd/system/multi-user.target.wants/")},
		{"ln", "-sf", "/dev/null", filepath.Join(mnt, "etc/systemd/system/serial-getty@ttyS0.service")},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v %s", c, err, out)
		}
	}
}

// writeDemo writes the demo module into the /usr at mnt, directly or as
// dpkg unpacks an upgrade.
func writeDemo(t testing.TB, mnt, version string, dpkg bool) {
	dir := filepath.Join(mnt, demoDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "lfs_demo.py")
	tmp := path
	if dpkg {
		tmp += ".dpkg-new"
	}
	if err := os.WriteFile(tmp, []byte("V = 'lfs_demo "+version+"'\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if dpkg {
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
}
