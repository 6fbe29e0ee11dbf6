package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
	"github.com/leasefs/leasefs/vsockproto"
)

const examples = "../../examples"

// unitKeys reads the Key=Value lines of a systemd unit (the last of a
// key wins) or of an EnvironmentFile (quotes removed).
func unitKeys(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	kv := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' || line[0] == '[' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("%s: not Key=Value: %q", path, line)
		}
		kv[k] = strings.Trim(v, `"`)
	}
	return kv
}

// execArgs expands an Exec line as systemd does for these units: %i is
// the instance, ${VAR} one word, $VAR split into words. It drops the
// program and returns its arguments.
func execArgs(t *testing.T, line, instance string, env map[string]string) []string {
	t.Helper()
	line = strings.ReplaceAll(line, "%i", instance)
	var args []string
	for _, w := range strings.Fields(line) {
		switch {
		case strings.HasPrefix(w, "${") && strings.HasSuffix(w, "}"):
			v, ok := env[w[2:len(w)-1]]
			if !ok {
				t.Fatalf("%s is not set", w)
			}
			args = append(args, v)
		case strings.HasPrefix(w, "$"):
			args = append(args, strings.Fields(env[w[1:]])...)
		default:
			args = append(args, w)
		}
	}
	if len(args) == 0 || args[0] != "/usr/local/bin/leasefs" {
		t.Fatalf("%q does not run /usr/local/bin/leasefs", line)
	}
	return args[1:]
}

// firecrackerConfig is the part of Firecracker's --config-file that the
// example sets; unknown fields are refused.
type firecrackerConfig struct {
	BootSource struct {
		KernelImagePath string `json:"kernel_image_path"`
		BootArgs        string `json:"boot_args"`
	} `json:"boot-source"`
	Drives []struct {
		DriveID      string `json:"drive_id"`
		PathOnHost   string `json:"path_on_host"`
		IsRootDevice bool   `json:"is_root_device"`
		IsReadOnly   bool   `json:"is_read_only"`
	} `json:"drives"`
	MachineConfig struct {
		VcpuCount  int `json:"vcpu_count"`
		MemSizeMib int `json:"mem_size_mib"`
	} `json:"machine-config"`
	Vsock struct {
		GuestCID uint32 `json:"guest_cid"`
		UDSPath  string `json:"uds_path"`
	} `json:"vsock"`
}

func readFirecracker(t *testing.T) firecrackerConfig {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(examples, "firecracker/vm-config.json"))
	if err != nil {
		t.Fatal(err)
	}
	var c firecrackerConfig
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		t.Fatalf("vm-config.json: %v", err)
	}
	return c
}

// The examples' configurations are what the agents accept, and agree
// with each other: ports, devices, sockets.
func TestExampleConfigsAreAccepted(t *testing.T) {
	host := unitKeys(t, filepath.Join(examples, "systemd/leasefs-host.service"))
	guest := unitKeys(t, filepath.Join(examples, "systemd/leasefs-guest@.service"))
	parseHostConf := func(conf string) *hostOptions {
		t.Helper()
		o, err := parseHost(execArgs(t, host["ExecStart"], "", unitKeys(t, conf))[1:], io.Discard)
		if err != nil {
			t.Fatalf("leasefs-host.service with %s: %v", conf, err)
		}
		return o
	}
	fcHost := parseHostConf(filepath.Join(examples, "firecracker/host.conf"))
	// The settings are in host.toml; host.conf's flags merge with it.
	tomlArgs := append(execArgs(t, host["ExecStart"], "", unitKeys(t, filepath.Join(examples, "systemd/host.conf")))[1:],
		"--config", filepath.Join(examples, "systemd/host.toml"))
	vsockHost, err := parseHost(tomlArgs, io.Discard)
	if err != nil {
		t.Fatalf("host.toml with host.conf: %v", err)
	}
	// A reload waits for the agent's answer, so that a refusal fails it.
	if r := execArgs(t, host["ExecReload"], "", nil); len(r) < 1 || r[0] != "reload" {
		t.Errorf("ExecReload %q: want leasefs reload", host["ExecReload"])
	}
	if args := execArgs(t, host["ExecStopPost"], "", nil); args[0] != "thaw" || args[2] != vsockHost.stateDir {
		t.Errorf("ExecStopPost %q does not thaw the agent's state directory %s", args, vsockHost.stateDir)
	}

	args := execArgs(t, guest["ExecStart"], "mirror", unitKeys(t, filepath.Join(examples, "systemd/guest-mirror.conf")))
	g, err := parseGuest(args[1:], io.Discard)
	if err != nil {
		t.Fatalf("leasefs-guest@mirror: %v", err)
	}
	if !g.foreground || g.export != "mirror" || g.addr.Kind != vsockproto.KindVsock || g.addr.CID != 2 ||
		g.addr.Port != vsockHost.listen[0].Port || g.device != "/dev/vdb" {
		t.Errorf("leasefs-guest@mirror %+v does not match host.conf's listen %v", g, vsockHost.listen)
	}

	// Firecracker: the VM's vsock socket is where the agent listens, the
	// export's device is its read-only second drive (/dev/vdb).
	fc := readFirecracker(t)
	if fc.Vsock.GuestCID < 3 || fc.Vsock.UDSPath == "" {
		t.Errorf("vsock %+v", fc.Vsock)
	}
	if len(fc.Drives) != 2 || !fc.Drives[0].IsRootDevice || fc.Drives[1].IsRootDevice || !fc.Drives[1].IsReadOnly ||
		fc.Drives[1].PathOnHost != fcHost.exports[0].dev {
		t.Errorf("drives %+v: want the root, then export %s's device %s read-only", fc.Drives, fcHost.exports[0].name, fcHost.exports[0].dev)
	}
	l := fcHost.listen[0]
	if l.Kind != vsockproto.KindHybrid || l.Path != fc.Vsock.UDSPath {
		t.Errorf("host.conf listens on %v, not on the VM's uds_path %s", l, fc.Vsock.UDSPath)
	}
	m := unitKeys(t, filepath.Join(examples, "firecracker/srv-mirror.mount"))
	cmd, margs, _, err := mountHelperArgs([]string{m["What"], m["Where"], "-o", m["Options"]})
	if err != nil || cmd != "guest" || m["Type"] != "fuse.leasefs" {
		t.Fatalf("srv-mirror.mount: %s %q %v", cmd, margs, err)
	}
	fg, err := parseGuest(margs, io.Discard)
	if err != nil {
		t.Fatalf("srv-mirror.mount: %v", err)
	}
	if fg.addr.CID != 2 || fg.addr.Port != l.Port || fg.device != "/dev/vdb" || fg.export != fcHost.exports[0].name ||
		"/"+strings.ReplaceAll(strings.TrimSuffix(filepath.Base("srv-mirror.mount"), ".mount"), "-", "/") != fg.dir {
		t.Errorf("srv-mirror.mount %+v does not match host.conf (%v) or its own name", fg, l)
	}

	// QEMU: vhost-vsock and the export read-only with cache=none, on the
	// port the host listens on.
	q, err := os.ReadFile(filepath.Join(examples, "qemu/run-vm.sh"))
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("bash", "-n", filepath.Join(examples, "qemu/run-vm.sh")).CombinedOutput(); err != nil {
		t.Errorf("run-vm.sh: %v\n%s", err, out)
	}
	for _, re := range []string{`-device vhost-vsock-pci,guest-cid=\$\{?GUEST_CID`, `-drive [^ ]*file=\$\{?EXPORT_DEVICE[^ ]*,if=virtio,format=raw,readonly=on,cache=none`} {
		if !regexp.MustCompile(re).Match(q) {
			t.Errorf("run-vm.sh has no %s", re)
		}
	}
}

// systemd-analyze verify finds nothing to say about the units.
func TestSystemdUnitsVerify(t *testing.T) {
	testenv.RequireTool(t, "systemd-analyze")
	dir := t.TempDir()
	for _, u := range []string{"systemd/leasefs-host.service", "systemd/leasefs-guest@.service", "firecracker/srv-mirror.mount"} {
		b, err := os.ReadFile(filepath.Join(examples, u))
		if err != nil {
			t.Fatal(err)
		}
		b = bytes.ReplaceAll(b, []byte("/usr/local/bin/leasefs"), []byte(leasefsBin))
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(u)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command("systemd-analyze", "verify", "./leasefs-host.service", "./leasefs-guest@mirror.service", "./srv-mirror.mount")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil || len(out) != 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// installMountHelper makes mount(8) find this leasefs as its helper for
// fuse.leasefs, putting back whatever was there when t ends.
func installMountHelper(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	const helper = "/sbin/mount.fuse.leasefs"
	saved := helper + ".leasefs-test"
	if _, err := os.Lstat(helper); err == nil {
		if err := os.Rename(helper, saved); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(leasefsBin, helper); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		os.Remove(helper)
		os.Rename(saved, helper)
	})
}

// mountCmd runs mount(8) and fails t if it fails; the mount goes when t
// ends.
func mountCmd(t *testing.T, dir string, args ...string) {
	t.Helper()
	if out, err := exec.Command("mount", args...).CombinedOutput(); err != nil {
		t.Fatalf("mount %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	t.Cleanup(func() { imgtest.Unmount(t, dir); waitGone(t, dir) })
	if !isFuseMount(t, dir) {
		t.Fatalf("mount returned before %s was mounted", dir)
	}
}

// 'mount -t fuse.leasefs IMAGE DIR' serves an image as 'leasefs mount'.
func TestMountHelperImage(t *testing.T) {
	testenv.RequireFUSE(t)
	installMountHelper(t)
	img := smallImage(t)
	dir := t.TempDir()
	mountCmd(t, dir, "-t", "fuse.leasefs", "-o", "ro,cache-mb=8", img, dir)
	if _, err := os.Stat(filepath.Join(dir, "lost+found")); err != nil {
		t.Error(err)
	}
	for _, c := range []struct{ opts, want string }{
		{"bogus=1", `unknown option "bogus=1"`},
		{"device=/dev/null", "needs connect="},
	} {
		out, err := exec.Command("mount", "-t", "fuse.leasefs", "-o", c.opts, img, t.TempDir()).CombinedOutput()
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("mount -o %s: %v %q, want %q", c.opts, err, out, c.want)
		}
	}
}

// The Firecracker example, wired for real with Firecracker played by
// the test: the host agent runs as host.conf says and listens on the
// VM's vsock socket; a guest's connection to port 5000 reaches it as
// Firecracker forwards one, on UDS_PATH_5000; the guest mounts as
// srv-mirror.mount (through mount(8) and the helper, from an fstab line)
// and follows the host's publishes.
func TestFirecrackerExample(t *testing.T) {
	mnt, dev := hostExport(t)
	installMountHelper(t)
	fc := readFirecracker(t)
	run := t.TempDir()
	uds := filepath.Join(run, "vm1", "vsock.sock")
	if err := os.Mkdir(filepath.Dir(uds), 0o755); err != nil {
		t.Fatal(err)
	}
	host := unitKeys(t, filepath.Join(examples, "systemd/leasefs-host.service"))
	args := execArgs(t, host["ExecStart"], "", unitKeys(t, filepath.Join(examples, "firecracker/host.conf")))
	metricsSock := filepath.Join(run, "metrics.sock")
	state := filepath.Join(run, "state")
	r := strings.NewReplacer(fc.Drives[1].PathOnHost, dev, "/srv/mirror", mnt, fc.Vsock.UDSPath, uds,
		"/run/leasefs/control.sock", filepath.Join(run, "control.sock"), "/var/lib/leasefs", state, "127.0.0.1:9464", "unix:"+metricsSock)
	for i := range args {
		args[i] = r.Replace(args[i])
	}
	// The unit keeps held files in systemd's fd store (--fd-store): the
	// test plays systemd's notify socket.
	sd := newFakeSystemd(t)
	t.Setenv("NOTIFY_SOCKET", sd.Path)
	h := &hostProc{control: "unix:" + filepath.Join(run, "control.sock")}
	runHostCmd(t, h, mnt, args...)

	// Firecracker: a guest's connection to the host (CID 2) port P is a
	// connection to UDS_PATH_P.
	m := unitKeys(t, filepath.Join(examples, "firecracker/srv-mirror.mount"))
	_, margs, _, err := mountHelperArgs([]string{m["What"], m["Where"], "-o", m["Options"]})
	if err != nil {
		t.Fatal(err)
	}
	g, err := parseGuest(margs, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	guestSide := filepath.Join(run, "vm1-guest-vsock")
	firecracker(t, guestSide, uds+"_"+strconv.FormatUint(uint64(g.addr.Port), 10))

	dir := t.TempDir()
	opts := strings.NewReplacer("vsock:2:5000", "unix:"+guestSide, "/dev/vdb", dev).Replace(m["Options"])
	fstab := filepath.Join(run, "fstab")
	if err := os.WriteFile(fstab, []byte(m["What"]+" "+dir+" "+m["Type"]+" "+opts+" 0 0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	mountCmd(t, dir, "-T", fstab, dir)
	if b, err := os.ReadFile(filepath.Join(dir, "hello")); err != nil || string(b) != "generation one\n" {
		t.Fatalf("the guest read %q, %v", b, err)
	}

	os.WriteFile(filepath.Join(mnt, "news"), []byte("generation two\n"), 0o644)
	if out, err := leasefs(t, "publish", "--control", h.control, "mirror"); err != nil {
		t.Fatalf("leasefs publish: %v\n%s", err, out)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "news")); err == nil && string(b) == "generation two\n" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the guest does not show generation 2")
		}
		time.Sleep(10 * time.Millisecond)
	}

	// The guest is known by the VM's socket, and counted.
	_, st, err := hostagent.Control(context.Background(), mustAddr(t, h.control), hostagent.ControlRequest{Op: "status"})
	if err != nil {
		t.Fatal(err)
	}
	if gs := st.Exports[0].Guests; len(gs) != 1 || !strings.Contains(gs[0].Peer, uds) {
		t.Errorf("guests %+v, want one, from %s", gs, uds)
	}
	hc := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", metricsSock)
	}}}
	resp, err := hc.Get("http://leasefs/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if v := mfs["leasefs_guests"].GetMetric()[0].GetGauge().GetValue(); v != 1 {
		t.Errorf("leasefs_guests %v", v)
	}
	if v := mfs["leasefs_generations_published_total"].GetMetric()[0].GetCounter().GetValue(); v != 2 {
		t.Errorf("leasefs_generations_published_total %v", v)
	}
	out, err := leasefs(t, "metrics", "--control", h.control)
	if _, perr := parser.TextToMetricFamilies(strings.NewReader(out)); err != nil || perr != nil {
		t.Errorf("leasefs metrics: %v %v\n%s", err, perr, out)
	}
}

// firecracker plays Firecracker's host side of a VM's vsock: every
// connection the guest makes (here: to the Unix socket guestSide) is
// carried to the host's Unix socket hostSide.
func firecracker(t *testing.T, guestSide, hostSide string) {
	t.Helper()
	l, err := net.Listen("unix", guestSide)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			gc, err := l.Accept()
			if err != nil {
				return
			}
			hc, err := net.Dial("unix", hostSide)
			if err != nil {
				t.Errorf("firecracker: connecting to %s: %v", hostSide, err)
				gc.Close()
				continue
			}
			go func() { io.Copy(hc, gc); hc.(*net.UnixConn).CloseWrite() }()
			go func() { io.Copy(gc, hc); gc.(*net.UnixConn).CloseWrite() }()
		}
	}()
}

func mustAddr(t *testing.T, s string) vsockproto.Addr {
	t.Helper()
	a, err := vsockproto.ParseAddr(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestMountHelperArgs(t *testing.T) {
	for _, c := range []struct {
		args []string
		cmd  string
		out  []string
		fake bool
		err  string
	}{
		{[]string{"mirror", "/m", "-o", "rw,connect=vsock:2:5000,device=/dev/vdb,_netdev,x-systemd.automount"}, "guest",
			[]string{"--connect=vsock:2:5000", "--device=/dev/vdb", "--export=mirror", "/m"}, false, ""},
		{[]string{"mirror", "/usr", "-o", "connect=vsock:2:5000,down=hard"}, "guest",
			[]string{"--connect=vsock:2:5000", "--down=hard", "--export=mirror", "/usr"}, false, ""},
		{[]string{"-fnv", "disk.img", "/m", "-oro,cache-mb=8,allow-dirty-journal"}, "mount",
			[]string{"--cache-mb=8", "--allow-dirty-journal", "--image=disk.img", "/m"}, true, ""},
		{[]string{"disk.img", "/m", "-s", "-o", "whatever=1"}, "mount", []string{"--image=disk.img", "/m"}, false, ""},
		{[]string{"disk.img", "/m", "-o", "whatever=1"}, "", nil, false, `unknown option "whatever=1"`},
		{[]string{"disk.img", "/m", "-o", "follow=always"}, "", nil, false, "needs connect="},
		{[]string{"disk.img"}, "", nil, false, "want SOURCE DIR"},
		{[]string{"disk.img", "/m", "-o"}, "", nil, false, "-o needs a value"},
		{[]string{"disk.img", "/m", "-N", "/proc/1/ns/mnt"}, "", nil, false, "not supported"},
	} {
		cmd, out, fake, err := mountHelperArgs(c.args)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%q: %v, want an error saying %q", c.args, err, c.err)
			}
			continue
		}
		if err != nil || cmd != c.cmd || strings.Join(out, " ") != strings.Join(c.out, " ") || fake != c.fake {
			t.Errorf("%q: %s %q %v %v, want %s %q %v", c.args, cmd, out, fake, err, c.cmd, c.out, c.fake)
		}
	}
}

func TestStatusAtAGlance(t *testing.T) {
	now := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	st := &hostagent.Status{Version: "v0.3.0 (go1.26.8, linux/amd64)", Started: now.Add(-3 * time.Hour), Exports: []hostagent.ExportStatus{{
		Name: "mirror", Mount: "/srv/mirror", Generation: 7, Label: "20261121.2", Published: now.Add(-90 * time.Second), LastFreezeMS: 1.25,
		Leases: 3, Files: 2, Breaks: 5, PendingBreaks: 1,
		Guests: []hostagent.GuestStatus{{Peer: "vsock:3", Generation: 7, Leases: 1}, {Peer: "vsock:4", Generation: 5, Leases: 2}},
	}}}
	var b strings.Builder
	if err := writeStatus(&b, st, now); err != nil {
		t.Fatal(err)
	}
	want := `agent v0.3.0 (go1.26.8, linux/amd64), running 3h0m0s

EXPORT  GEN  LABEL       PUBLISHED  FREEZE  GUESTS  LEASES  FILES  BREAKS                    MOUNT
mirror  7    20261121.2  1m30s ago  1.2 ms  2       3       2      5 (1 pending, 0 revoked)  /srv/mirror

guests of mirror:
  GUEST    GEN           LEASES
  vsock:3  7             1
  vsock:4  5 (2 behind)  2
`
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}

// Every command explains itself with -h: usage, a few lines of the
// model, its flags.
func TestEveryCommandHasHelp(t *testing.T) {
	for _, c := range commands {
		if c.summary == "" {
			continue
		}
		if c.name == "version" {
			continue
		}
		var out strings.Builder
		err := run(context.Background(), []string{c.name, "-h"}, &out, &out)
		if !errors.Is(err, flag.ErrHelp) || !strings.HasPrefix(out.String(), "Usage: leasefs "+c.name) ||
			strings.Count(out.String(), "\n") < 6 || !strings.Contains(out.String(), "Flags:") {
			t.Errorf("leasefs %s -h: %v\n%s", c.name, err, out.String())
		}
	}
}

func TestProgressLine(t *testing.T) {
	var b strings.Builder
	p := newProgress(&b, "export m: reading the inode tables")
	p(1<<20, 4<<20)
	p(2<<20, 4<<20) // within 200 ms: not drawn
	p(4<<20, 4<<20)
	p(4<<20, 4<<20) // drawn once
	want := "\rexport m: reading the inode tables:  25% (1 of 4 MiB)\rexport m: reading the inode tables: 100% (4 of 4 MiB)\n"
	if b.String() != want {
		t.Errorf("%q, want %q", b.String(), want)
	}
}

// The boot scripts of examples/boot parse (the initramfs-tools ones also
// boot a VM in internal/vmtest's TestBootUsr; the dracut module is not
// run anywhere).
func TestBootScriptsParse(t *testing.T) {
	for _, c := range [][]string{
		{"sh", "-n", "boot/initramfs-tools/hooks/leasefs"},
		{"sh", "-n", "boot/initramfs-tools/scripts/local-bottom/leasefs"},
		{"sh", "-n", "boot/dracut/90leasefs/leasefs-mount-usr.sh"},
		{"bash", "-n", "boot/dracut/90leasefs/module-setup.sh"},
	} {
		cmd := exec.Command(c[0], c[1], filepath.Join(examples, c[2]))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("%s: %v\n%s", c[2], err, out)
		}
		if st, err := os.Stat(filepath.Join(examples, c[2])); err != nil || st.Mode()&0o111 == 0 {
			t.Errorf("%s: not executable: %v", c[2], err)
		}
	}
}
