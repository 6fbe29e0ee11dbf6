package vmtest

// The fleet: the host agent on this machine and guests in VMs, each VM
// with its own vhost-user vsock device (vhost-device-vsock) reaching the
// agent through one hvsock-dir directory, as users run leasefs.

import (
	"bufio"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/leasefs/leasefs/guestagent"
	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/internal/conformance"
	"github.com/leasefs/leasefs/internal/hosttest"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// The modules a fleet VM loads: the virtio disk, FUSE, and the virtio
// vsock transport (no loop, no vsock loopback).
var fleetModules = []string{"virtio_pci", "virtio_blk", "fuse", "vsock", "vmw_vsock_virtio_transport"}

// fleetInit is a fleet VM's /init: initStart, then the command server
// until the VM is killed.
const fleetInit = initStart + serveEnv + `=1 LEASEFS_RUN_DIR=/run/leasefs /bin/vmtest
echo "LEASEFS-VM-EXIT $?"
poweroff -f
`

// A fleet is the host agent on this machine, exporting one image as
// "mirror" and serving every VM whose socket is in vms, and the VMs
// booted against it.
type fleet struct {
	t                  testing.TB
	cache, bin         string
	vhost              string // vhost-device-vsock
	img, mnt, dev      string // the export: its image, mount and loop device
	vms, sockets, run  string // the hvsock-dir directory; the vhost-user sockets; the agent's files
	control            string
	export             string            // its name, if not "mirror"
	initrds, vmlinuzes map[string]string // by kernel name

	mu   sync.Mutex
	cid  int
	host *hosttest.Agent
	args []string
}

// A vm is one VM of the fleet: QEMU and its vhost-device-vsock.
type vm struct {
	f                *fleet
	name             string
	k                kernel
	cid              int
	uds, monitor     string
	vhostSock        string
	qemu, backend    *exec.Cmd
	console          *testenv.SyncBuffer
	qemuDone, vhDone chan struct{}
	consolePath      string
}

func newFleet(t *testing.T, busybox, bin string, src string, ks []kernel) *fleet {
	testenv.RequireLoop(t)
	f := &fleet{t: t, cache: cacheDir(t), bin: bin, cid: 2, initrds: map[string]string{}, vmlinuzes: map[string]string{}}
	out, err := exec.Command("./debian.sh", "vhost", f.cache).Output()
	if err != nil {
		testenv.Unavailable(t, "fetching vhost-device-vsock: %v %s", err, testenv.StderrOf(err))
	}
	f.vhost = strings.TrimSpace(string(out))
	for _, k := range ks {
		kdir := fetchKernel(t, k, f.cache)
		f.vmlinuzes[k.name] = filepath.Join(kdir, "vmlinuz")
		f.initrds[k.name] = filepath.Join(f.cache, "initramfs-fleet-"+k.name+".cpio")
		buildInitramfs(t, f.initrds[k.name], kdir, busybox, bin, fleetInit, fleetModules)
	}
	// The scenarios refill the disk to show that a freed block, reused,
	// is never read: nothing is kept from reuse (--keep-files 0).
	f.serve(t, imgtest.Mkfs(t, "ext4", src, 512, "-b", "4096"), "--grace", fleetGrace.String(), "--ack-timeout", "2s", "--keep-files", "0")
	return f
}

// serve mounts the image img read-write and starts the host agent
// exporting it (as f.export, or "mirror") to every VM whose socket is
// in f.vms, with the flags more.
func (f *fleet) serve(t testing.TB, img string, more ...string) {
	f.img = img
	f.mnt, f.dev = hosttest.Serve(t, img)
	f.run = t.TempDir()
	f.vms, f.sockets = filepath.Join(f.run, "vms"), filepath.Join(f.run, "vhost")
	for _, d := range []string{f.vms, f.sockets} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	f.control = "unix:" + filepath.Join(f.run, "control.sock")
	f.args = append([]string{"host", "--export", cmp.Or(f.export, "mirror") + "=" + f.dev + ":" + f.mnt, "--listen", "hvsock-dir:" + f.vms + ":" + port,
		"--control", f.control, "--state-dir", filepath.Join(f.run, "state"), "--auto-publish", "off"}, more...)
	f.startHost(t, nil)
}

// fleetGrace is how long the fleet's agent keeps a disconnected guest's
// leases: the default, long enough for a VM's snapshot and restore
// (fleetSnapshot) and for a guest to find that its connection died
// silently (vhost-device-vsock does not always pass a close on).
const fleetGrace = 30 * time.Second

// startHost starts the host agent — as systemd with a file-descriptor
// store would, if sd is not nil — and waits until it is ready; the
// fleet's end stops it (SIGTERM) unless a test did.
func (f *fleet) startHost(t testing.TB, sd *testenv.FakeSystemd) {
	a := &hosttest.Agent{Prog: filepath.Join(f.bin, "leasefs"), Args: f.args, Ready: 60 * time.Second, StopWait: 30 * time.Second}
	if sd != nil {
		a.Prog, a.Args, a.Env, a.Extra = sd.Start(a.Prog, f.args, true)
	}
	f.mu.Lock()
	f.host = a
	f.mu.Unlock()
	f.t.Cleanup(func() { f.stopHost(f.t, syscall.SIGTERM) })
	a.Start(t)
}

// stopHost sends the host agent sig and waits for it to exit.
func (f *fleet) stopHost(t testing.TB, sig syscall.Signal) {
	f.mu.Lock()
	a := f.host
	f.mu.Unlock()
	_ = a.Stop(t, sig)
}

func (f *fleet) leasefs(args ...string) (string, error) {
	out, err := exec.Command(filepath.Join(f.bin, "leasefs"), args...).CombinedOutput()
	return string(out), err
}

// publish publishes what the export holds and returns the generation.
func (f *fleet) publish(t testing.TB) uint64 {
	t.Helper()
	gen, err := f.publishGen()
	if err != nil {
		t.Fatal(err)
	}
	return gen
}

func (f *fleet) publishGen() (uint64, error) {
	return hosttest.Publish(filepath.Join(f.bin, "leasefs"), f.control, cmp.Or(f.export, "mirror"))
}

func (f *fleet) status(t testing.TB) hostagent.ExportStatus {
	t.Helper()
	st, err := hosttest.Status(filepath.Join(f.bin, "leasefs"), f.control)
	if err != nil || len(st.Exports) != 1 {
		t.Fatalf("%v %+v\n%s", err, st, f.host.Log)
	}
	return st.Exports[0]
}

// A vmSpec says how to start a VM: its name (its socket's), kernel, the
// host cache mode of its disk (none, writeback), its CID (0: the next
// free), whether its vsock device sits on a PCIe root port, from which it
// can be unplugged (for a snapshot), and a snapshot to restore (then it
// starts paused, without a vsock device: plug).
type vmSpec struct {
	name     string
	k        kernel
	cache    string
	cid      int
	hotplug  bool
	incoming string
	root     string // a root disk (vda; the export is then vdb)
	initrd   string // another initramfs than the fleet's
	memory   int    // MiB; 384 if 0
	append   string // to the kernel's command line
	noVsock  bool   // none (its memory private): for comparisons, reached only by its console
}

// start starts a VM; ready waits for it (VMs boot at once).
func (f *fleet) start(t testing.TB, spec vmSpec) *vm {
	f.mu.Lock()
	if spec.cid == 0 {
		f.cid++
		spec.cid = f.cid
	}
	name := spec.name
	v := &vm{f: f, name: name, k: spec.k, cid: spec.cid, uds: filepath.Join(f.vms, name+".vsock"),
		console: &testenv.SyncBuffer{}, monitor: filepath.Join(f.sockets, name+".monitor"), vhostSock: filepath.Join(f.sockets, name+".sock"),
		consolePath: filepath.Join(f.cache, "console-fleet-"+name+".log"), qemuDone: make(chan struct{}), vhDone: make(chan struct{})}
	f.mu.Unlock()
	v.backend = exec.Command(f.vhost, "--guest-cid", fmt.Sprint(v.cid), "--socket", v.vhostSock, "--uds-path", v.uds)
	v.backend.Stdout, v.backend.Stderr = v.console, v.console
	v.backend.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := v.backend.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = v.backend.Wait(); close(v.vhDone) }()
	f.t.Cleanup(v.kill)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(v.vhostSock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("vhost-device-vsock made no socket in 10s:\n%s", v.console)
		}
	}
	v.qemu = exec.Command("../../examples/qemu/vhost-vm.sh")
	v.qemu.Env = append(os.Environ(), "KERNEL="+f.vmlinuzes[spec.k.name], "INITRD="+cmp.Or(spec.initrd, f.initrds[spec.k.name]), "IMAGE="+f.img,
		"CACHE="+spec.cache, fmt.Sprint("MEMORY=", cmp.Or(spec.memory, 384)), "MONITOR="+v.monitor, "CPUS="+os.Getenv("LEASEFS_FLEET_CPUS"),
		"ROOT="+spec.root, "APPEND="+spec.append)
	if spec.hotplug {
		v.qemu.Env = append(v.qemu.Env, "HOTPLUG=1")
	}
	switch {
	case spec.incoming != "":
		v.qemu.Env = append(v.qemu.Env, "INCOMING="+spec.incoming, "VHOST=")
	case spec.noVsock:
		v.qemu.Env = append(v.qemu.Env, "VHOST=none")
	default:
		v.qemu.Env = append(v.qemu.Env, "VHOST="+v.vhostSock)
	}
	v.qemu.Stdout, v.qemu.Stderr = v.console, v.console
	v.qemu.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := v.qemu.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = v.qemu.Wait(); close(v.qemuDone) }()
	return v
}

// ready waits for the VM's command server.
func (v *vm) ready(t testing.TB) {
	name, k := v.name, v.k
	for deadline := time.Now().Add(3 * time.Minute); !strings.Contains(v.console.String(), "LEASEFS-VM-READY"); time.Sleep(50 * time.Millisecond) {
		select {
		case <-v.qemuDone:
			t.Fatalf("VM %s (%s) exited while booting:\n%s", name, k.name, v.tailOf())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("VM %s (%s) not ready after 3 minutes:\n%s", name, k.name, v.tailOf())
		}
	}
}

// kill ends the VM (SIGKILL to QEMU, then its backend) and keeps its
// console in the cache directory.
func (v *vm) kill() {
	for _, p := range []struct {
		cmd  *exec.Cmd
		done chan struct{}
	}{{v.qemu, v.qemuDone}, {v.backend, v.vhDone}} {
		if p.cmd == nil || p.cmd.Process == nil {
			continue
		}
		_ = p.cmd.Process.Signal(syscall.SIGCONT)
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	_ = os.WriteFile(v.consolePath, []byte(v.console.String()), 0o644)
}

// diag is what the VM's guests logged last, for a failure's message.
func (v *vm) diag() string {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	rep, err := v.call(ctx, request{Op: "run", Args: []string{"/bin/sh", "-c", `tail -n 20 /run/guest-*.log
for p in $(pidof leasefs vmtest); do for t in /proc/$p/task/*; do
	read -r state < $t/wchan; echo "$t $(cut -d' ' -f3 $t/stat) $state"; grep -v '^$' $t/stack 2>/dev/null | head -12
done; done`}})
	if err != nil {
		return fmt.Sprintf("(the VM's logs: %v)", err)
	}
	return fmt.Sprintf("VM %s (%s), its guests' logs:\n%s", v.name, v.k.name, rep.Out)
}

func (v *vm) tailOf() string {
	lines := strings.Split(v.console.String(), "\n")
	return strings.Join(lines[max(0, len(lines)-60):], "\n")
}

// call sends one request to the VM's command server, connecting as a
// host program connects into a Firecracker VM: CONNECT PORT on the
// VM's hybrid-vsock socket.
func (v *vm) call(ctx context.Context, req request) (reply, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", v.uds)
	if err != nil {
		return reply{}, err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", servePort); err != nil {
		return reply{}, err
	}
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "OK ") {
		return reply{}, fmt.Errorf("CONNECT %d: %q %v", servePort, line, err)
	}
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return reply{}, err
	}
	var rep reply
	if err := json.NewDecoder(r).Decode(&rep); err != nil {
		return reply{}, fmt.Errorf("the VM's answer: %w", err)
	}
	return rep, nil
}

// sh runs a shell command line in the VM and returns its output; it
// fails t if the command fails.
func (v *vm) sh(t testing.TB, script string, env ...string) string {
	t.Helper()
	out, err := v.shErr(script, env...)
	if err != nil {
		t.Fatalf("VM %s (%s): %s: %v\n%s", v.name, v.k.name, script, err, out)
	}
	return out
}

func (v *vm) shErr(script string, env ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rep, err := v.call(ctx, request{Op: "run", Args: []string{"/bin/sh", "-c", script}, Env: env})
	if err == nil && rep.Err != "" {
		err = errors.New(rep.Err)
	}
	if err == nil && rep.Exit != 0 {
		err = fmt.Errorf("exit status %d", rep.Exit)
	}
	return rep.Out, err
}

// A held file, open in a VM between requests.
type held struct {
	v      *vm
	handle int
}

func (v *vm) open(t testing.TB, path string) *held {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rep, err := v.call(ctx, request{Op: "open", Path: path})
	if err == nil && rep.Err != "" {
		err = errors.New(rep.Err)
	}
	if err != nil {
		t.Fatalf("VM %s: open %s: %v", v.name, path, err)
	}
	return &held{v: v, handle: rep.Handle}
}

// readAt reads n bytes at off and returns what the VM says of them;
// err carries the VM's errno.
func (h *held) readAt(off int64, n int) (reply, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rep, err := h.v.call(ctx, request{Op: "read", Handle: h.handle, Off: off, Len: n})
	if err != nil {
		return rep, err
	}
	if rep.Errno != 0 {
		return rep, syscall.Errno(rep.Errno)
	}
	if rep.Err != "" {
		return rep, errors.New(rep.Err)
	}
	return rep, nil
}

// is reports whether the read gave exactly b.
func (r reply) is(b []byte) bool {
	sum := sha256.Sum256(b)
	return r.N == len(b) && r.Sum == hex.EncodeToString(sum[:])
}

// mount runs a guest of the export in the VM at dir with args.
func (v *vm) mount(t testing.TB, dir string, args ...string) {
	t.Helper()
	v.sh(t, fmt.Sprintf("mkdir -p %s && /bin/leasefs guest --connect vsock:2:%s --export mirror %s %s",
		dir, port, strings.Join(args, " "), dir))
}

// The mounts each fleet VM has: one reading file data from the shared
// disk, one reading it through the host agent.
// A guest waits 3 s for a host agent that is away, not 30, and keeps no
// lease after a close (--lease-linger 0): the scenarios check that a new
// open needs the host (a lingering lease would open a recently closed
// file again without it, from what the guest's cache has of it).
var fleetMounts = []struct{ dir, args string }{
	{"/mnt/dev", "--device /dev/vda --down soft=3s --lease-linger 0 --log /run/guest-dev.log"},
	{"/mnt/net", "--down soft=3s --lease-linger 0 --log /run/guest-net.log"},
}

func (v *vm) mountAll(t testing.TB) {
	for _, m := range fleetMounts {
		v.mount(t, m.dir, m.args)
	}
}

// each runs fn for every VM at once and fails t with what failed.
func each(t *testing.T, vms []*vm, fn func(v *vm) error) {
	t.Helper()
	if eachNoStop(t, vms, fn); t.Failed() {
		t.FailNow()
	}
}

// eachNoStop is each, and t goes on.
func eachNoStop(t *testing.T, vms []*vm, fn func(v *vm) error) {
	t.Helper()
	errs := make([]error, len(vms))
	var wg sync.WaitGroup
	for i, v := range vms {
		wg.Go(func() { errs[i] = fn(v) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("VM %s (%s): %v", vms[i].name, vms[i].k.name, err)
		}
	}
}

// TestFleet runs the host agent on this machine and guests in VMs of
// every guest kernel, four at once in one hvsock-dir directory, each VM
// with a mount on the shared disk and one reading through the host; the
// first two VMs' disks use QEMU's cache=none, the third's the host's page
// cache (cache=writeback). Then the life of a VM and of the host agent,
// scenario by scenario.
func TestFleet(t *testing.T) {
	busybox, bin := programs(t)
	ks := selected(t)
	f := newFleet(t, busybox, bin, source(t), ks)
	f.publish(t)
	var vms []*vm
	for i := range 4 {
		cache := "none"
		if i == 2 {
			cache = "writeback"
		}
		vms = append(vms, f.start(t, vmSpec{name: fmt.Sprint("vm", i), k: ks[i%len(ks)], cache: cache}))
	}
	for _, v := range vms {
		v.ready(t)
		v.mountAll(t)
	}
	if st := f.status(t); len(st.Guests) != 2*len(vms) {
		t.Fatalf("the host agent serves %d guests, want %d: %+v", len(st.Guests), 2*len(vms), st.Guests)
	}
	t.Run("conformance", func(t *testing.T) {
		each(t, vms, func(v *vm) error {
			out, err := v.shErr("/bin/vmtest -test.run '^TestFleetTask$' -test.v 2>&1", taskEnv+"=conformance",
				"LEASEFS_VM_DISK=/dev/vda", "LEASEFS_VM_MOUNTS=/mnt/dev /mnt/net")
			if err != nil {
				return fmt.Errorf("%v\n%s", err, out)
			}
			return nil
		})
	})
	t.Run("coherence", func(t *testing.T) { fleetCoherence(t, f, vms) })
	t.Run("torture_while_a_vm_comes_and_goes", func(t *testing.T) { fleetTorture(t, f, vms) })
	t.Run("figures", func(t *testing.T) { fleetFigures(t, f, vms) })
	t.Run("paused_shorter_than_the_grace", func(t *testing.T) { fleetPauseShort(t, f, vms) })
	t.Run("paused_longer_than_the_grace", func(t *testing.T) { fleetPauseLong(t, f, vms) })
	t.Run("host_agent_upgraded", func(t *testing.T) { fleetUpgrade(t, f, vms) })
	t.Run("host_agent_stopped", func(t *testing.T) { fleetHostGone(t, f, vms, syscall.SIGTERM) })
	t.Run("host_agent_killed", func(t *testing.T) { fleetHostGone(t, f, vms, syscall.SIGKILL) })
	t.Run("host_agent_restarted_with_the_fd_store", func(t *testing.T) { fleetFDStore(t, f, vms) })
	t.Run("vm_killed", func(t *testing.T) { fleetVMKilled(t, f, vms) })
	t.Run("snapshot_restored_twice", func(t *testing.T) { fleetSnapshot(t, f, ks) })
}

// The consistency torture across the VMs: the host replaces
// self-validating files and publishes every second while two readers
// on each mount of every VM read them; meanwhile a fifth VM boots in
// the same directory, mounts, reads and is killed. No read is torn.
func fleetTorture(t *testing.T, f *fleet, vms []*vm) {
	dir := filepath.Join(f.mnt, "torture")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	const files = 200
	d := 30 * time.Second
	tt := testenv.Torture{Dir: dir, Files: files, For: d, Pause: 2 * time.Millisecond, Publish: func() error { _, err := f.publishGen(); return err },
		Min: testenv.TortureResults{Reads: 100, Generations: 10, Replaced: 100}}
	tt.Populate(t)
	f.publish(t)
	for _, v := range vms {
		tt.Remote = append(tt.Remote, func(d time.Duration) (testenv.TortureResults, error) {
			out, err := v.shErr("/bin/vmtest -test.run '^TestFleetTask$' -test.v 2>&1", taskEnv+"=torture",
				"LEASEFS_VM_FOR="+d.String(), fmt.Sprint("LEASEFS_VM_FILES=", files), "LEASEFS_VM_MOUNTS=/mnt/dev/torture /mnt/net/torture")
			var res testenv.TortureResults
			_, line, _ := strings.Cut(out, "LEASEFS-TORTURE ")
			line, _, _ = strings.Cut(line, "\n")
			if jerr := json.Unmarshal([]byte(line), &res); err == nil && jerr != nil {
				err = jerr
			}
			if err != nil {
				return res, fmt.Errorf("VM %s (%s): %v\n%s", v.name, v.k.name, err, out)
			}
			t.Logf("VM %s (%s): %+v", v.name, v.k.name, res)
			return res, nil
		})
	}
	// The fifth VM.
	guests := len(f.status(t).Guests)
	came := make(chan error, 1)
	go func() {
		came <- func() error {
			v := f.start(t, vmSpec{name: "vm-passing", k: vms[len(vms)-1].k, cache: "none"})
			defer v.kill()
			for deadline := time.Now().Add(3 * time.Minute); !strings.Contains(v.console.String(), "LEASEFS-VM-READY"); time.Sleep(50 * time.Millisecond) {
				if time.Now().After(deadline) {
					return fmt.Errorf("the passing VM did not boot:\n%s", v.tailOf())
				}
			}
			out, err := v.shErr("mkdir -p /mnt/dev && /bin/leasefs guest --connect vsock:2:" + port + " --export mirror --device /dev/vda /mnt/dev && cat /mnt/dev/hello")
			if err != nil || !strings.HasSuffix(out, helloText) {
				return fmt.Errorf("the passing VM: %v %q", err, out)
			}
			return nil
		}()
	}()
	tt.Run(t)
	if err := <-came; err != nil {
		t.Fatal(err)
	}
	// Its guest's session ends with the grace.
	for deadline := time.Now().Add(fleetGrace + 20*time.Second); len(f.status(t).Guests) != guests; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the host agent serves %d guests after the passing VM went, want %d", len(f.status(t).Guests), guests)
		}
	}
}

// holdAll opens name in every mount of every VM.
// The coherence step of the conformance suite (conformance.Change)
// across VMs: files held open on every mount of every VM, the writer on
// this machine replaces, deletes and moves them and adds more, and
// publishes. Then every VM's every mount shows the tree the writer
// left, and every file held open across the change reads its bytes from
// before, whole.
func fleetCoherence(t *testing.T, f *fleet, vms []*vm) {
	c := conformance.Prepare(t, conformance.Live{Writer: f.mnt, Oracle: hosttest.ReadOnly(t, f.mnt), Publish: func(t *testing.T) { f.publish(t) }})
	kept := c.Held["kept"]
	waitCat(t, vms, c.Before, string(kept))
	type open struct {
		h    *held
		want []byte
	}
	var opens []open
	for name, b := range c.Held {
		for _, h := range holdAll(t, vms, filepath.Join(c.Dir, name)) {
			opens = append(opens, open{h, b})
		}
	}
	c.Apply(t)
	waitCat(t, vms, c.After, "added\n")
	want := c.Want(t)
	for _, v := range vms {
		for _, m := range fleetMounts {
			t.Run(v.name+m.dir, func(t *testing.T) {
				out, err := v.shErr("/bin/vmtest -test.run '^TestFleetTask$' -test.v 2>&1", taskEnv+"=snapshot", "LEASEFS_VM_DIR="+filepath.Join(m.dir, c.Dir))
				_, js, ok := strings.Cut(out, snapshotLine)
				js, _, _ = strings.Cut(js, "\n")
				var got map[string]imgtest.Entry
				if err != nil || !ok {
					t.Fatalf("the snapshot task: %v\n%s", err, out)
				}
				if err := json.Unmarshal([]byte(js), &got); err != nil {
					t.Fatalf("the snapshot task's output: %v\n%s", err, out)
				}
				imgtest.Compare(t, want, got)
			})
		}
	}
	for _, o := range opens {
		o.h.readAll(t, o.want)
		o.h.close(t)
	}
}

func holdAll(t testing.TB, vms []*vm, name string) []*held {
	var hs []*held
	for _, v := range vms {
		for _, m := range fleetMounts {
			hs = append(hs, v.open(t, filepath.Join(m.dir, name)))
		}
	}
	return hs
}

// close closes the held file in its VM.
func (h *held) close(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if rep, err := h.v.call(ctx, request{Op: "close", Handle: h.handle}); err != nil || rep.Err != "" {
		t.Errorf("%s: close: %v %s", h, err, rep.Err)
	}
}

func (h *held) String() string {
	return fmt.Sprintf("VM %s (%s) handle %d", h.v.name, h.v.k.name, h.handle)
}

// readAll reads the held file from offset 0 in 1 MiB pieces and checks
// that what it gives is want's bytes: all of them, or, if failures is
// not nil, as far as the first error, which must be one of failures.
// It returns that error.
func (h *held) readAll(t testing.TB, want []byte, failures ...error) error {
	t.Helper()
	const piece = 1 << 20
	for off := 0; off < len(want); off += piece {
		n := min(piece, len(want)-off)
		r, err := h.readAt(int64(off), n)
		if err != nil {
			for _, f := range failures {
				if errors.Is(err, f) {
					return err
				}
			}
			t.Fatalf("%s: read at %d: %v, want %v\n%s", h, off, err, failures, h.v.diag())
		}
		if !r.is(want[off : off+n]) {
			t.Fatalf("%s: read at %d: %d bytes, not the file's (first: %q)", h, off, r.N, r.Head)
		}
	}
	return nil
}

// pattern is n bytes that no other file of the tests has.
func pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7/5) ^ seed
	}
	return b
}

// refill deletes name from the export (if it is there) and fills the filesystem with
// other bytes, so that the file's blocks would be reused were they
// free; t's end removes the filler and publishes.
func (f *fleet) refill(t *testing.T, name string) {
	if err := os.Remove(filepath.Join(f.mnt, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	junk := make([]byte, 1<<20)
	for i := range junk {
		junk[i] = 0xEE
	}
	var names []string
	for i := 0; ; i++ {
		p := filepath.Join(f.mnt, fmt.Sprint("junk", i))
		names = append(names, p)
		if err := os.WriteFile(p, junk, 0o644); err != nil {
			break // full
		}
	}
	syscall.Sync()
	t.Cleanup(func() {
		for _, p := range names {
			os.Remove(p)
		}
		if _, err := f.publishGen(); err != nil {
			t.Error(err)
		}
	})
}

// waitGuests waits until the host agent serves n guests.
func (f *fleet) waitGuests(t testing.TB, n int, within time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(within); ; time.Sleep(100 * time.Millisecond) {
		st := f.status(t)
		if len(st.Guests) == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the host agent serves %d guests after %v, want %d: %+v", len(st.Guests), within, n, st.Guests)
		}
	}
}

// pause stops every VM with SIGSTOP to QEMU; the function returned
// resumes them. (Not with the monitor's stop: vhost-device-vsock 0.3.0's
// device then never moves data again once the host sent some while the
// VM was stopped — docs/operations.md, "VMs that pause".)
func pause(t *testing.T, vms []*vm) (resume func()) {
	for _, v := range vms {
		if err := v.qemu.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
	}
	var once sync.Once
	resume = func() {
		once.Do(func() {
			for _, v := range vms {
				if err := v.qemu.Process.Signal(syscall.SIGCONT); err != nil {
					t.Error(err)
				}
			}
		})
	}
	t.Cleanup(resume)
	return resume
}

// guestStatus is the status of the guest at dir in the VM.
func (v *vm) guestStatus(t testing.TB, dir string) guestagent.Status {
	t.Helper()
	var st guestagent.Status
	out := v.sh(t, "/bin/leasefs guest status --json "+dir+" 2>/dev/null")
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("VM %s: guest status: %v %q", v.name, err, out)
	}
	return st
}

// waitCat waits until every mount of every VM reads want at name.
func waitCat(t *testing.T, vms []*vm, name, want string) {
	each(t, vms, func(v *vm) error {
		for _, m := range fleetMounts {
			var out string
			var err error
			for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
				if out, err = v.shErr("cat " + filepath.Join(m.dir, name)); err == nil && out == want {
					break
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("%s: %q %v, want %q", filepath.Join(m.dir, name), out, err, want)
				}
			}
		}
		return nil
	})
}

// VMs paused for less than the grace while the host publishes: their
// sessions go on (nothing fenced), held files give their bytes, and
// they see the new generation.
func fleetPauseShort(t *testing.T, f *fleet, vms []*vm) {
	want := pattern(1, 3<<20)
	f.write(t, "paused", want)
	f.publishSeen(t)
	hs := holdAll(t, vms, "paused")
	for _, h := range hs {
		h.readAll(t, want[:1<<20])
	}
	resume := pause(t, vms)
	for i := range 3 {
		f.write(t, "news", []byte(fmt.Sprintf("news %d\n", i)))
		f.publish(t)
	}
	time.Sleep(fleetGrace / 3)
	resume()
	for _, h := range hs {
		h.readAll(t, want)
	}
	waitCat(t, vms, "news", "news 2\n")
	for _, v := range vms {
		for _, m := range fleetMounts {
			if st := v.guestStatus(t, m.dir); len(st.Fenced) > 0 {
				t.Errorf("VM %s %s: fenced %+v after a pause shorter than the grace", v.name, m.dir, st.Fenced)
			}
		}
	}
}

// VMs paused for longer than the grace: the host lets their leases go,
// and the writer deletes a file they hold and refills the disk. Resumed,
// each held file gives its own bytes (those cached) or an error, never
// the filler; new opens work once the guests are back.
func fleetPauseLong(t *testing.T, f *fleet, vms []*vm) {
	want := pattern(2, 3<<20)
	f.write(t, "kept", want)
	f.publishSeen(t)
	guests := len(f.status(t).Guests)
	hs := holdAll(t, vms, "kept")
	for _, h := range hs {
		h.readAll(t, want[:1<<20])
	}
	resume := pause(t, vms)
	f.waitGuests(t, 0, 2*time.Minute)
	// And then the grace: the host holds no file for them any more.
	for deadline := time.Now().Add(fleetGrace + 30*time.Second); f.status(t).Files > 0; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the host agent still holds %d files %v after the grace", f.status(t).Files, fleetGrace)
		}
	}
	f.refill(t, "kept")
	f.publish(t)
	resume()
	for _, h := range hs {
		err := h.readAll(t, want, syscall.ESTALE, syscall.EIO)
		t.Logf("%s: %v", h, err)
	}
	f.waitGuests(t, guests, time.Minute)
	waitCat(t, vms, "hello", helloText)
}

func (f *fleet) write(t testing.TB, name string, b []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(f.mnt, name), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// publishSeen publishes and waits until every guest the host agent
// serves is on the new generation; it returns how long that took.
func (f *fleet) publishSeen(t testing.TB) time.Duration {
	t.Helper()
	start := time.Now()
	gen := f.publish(t)
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(5 * time.Millisecond) {
		behind := 0
		st := f.status(t)
		for _, g := range st.Guests {
			if g.Generation < gen {
				behind++
			}
		}
		if behind == 0 {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d guests are not on generation %d after a minute: %+v", behind, gen, st.Guests)
		}
	}
}

// holdDeleted writes a file, holds it open in every mount of every VM
// (its first MiB read), then deletes it on the host and publishes: only
// the leases keep its blocks.
func holdDeleted(t *testing.T, f *fleet, vms []*vm, name string, seed byte) ([]*held, []byte) {
	want := pattern(seed, 3<<20)
	f.write(t, name, want)
	f.publishSeen(t)
	hs := holdAll(t, vms, name)
	for _, h := range hs {
		h.readAll(t, want[:1<<20])
	}
	if err := os.Remove(filepath.Join(f.mnt, name)); err != nil {
		t.Fatal(err)
	}
	f.publishSeen(t)
	return hs, want
}

// The host agent upgraded in place (SIGUSR2) while every VM holds a
// deleted file and reads: the VMs notice nothing but a pause — every
// read succeeds, the held files give their bytes, the guests resumed
// their sessions.
func fleetUpgrade(t *testing.T, f *fleet, vms []*vm) {
	calm := testenv.Torture{Dir: filepath.Join(f.mnt, "calm"), Files: 100}
	if err := os.MkdirAll(calm.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	calm.Populate(t)
	hs, want := holdDeleted(t, f, vms, "upgraded", 3)
	before := f.status(t)
	started := func() time.Time {
		out, _ := f.leasefs("status", "--json", "--control", f.control)
		var st hostagent.Status
		_ = json.Unmarshal([]byte(out), &st)
		return st.Started
	}
	was := started()
	fenced := map[string]int{}
	for _, v := range vms {
		for _, m := range fleetMounts {
			fenced[v.name+m.dir] = len(v.guestStatus(t, m.dir).Fenced)
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		time.Sleep(3 * time.Second)
		if err := f.host.Signal(syscall.SIGUSR2); err != nil {
			t.Error(err)
		}
	}()
	eachNoStop(t, vms, func(v *vm) error {
		// Readers that fail on any error: there is no writer, so no
		// file may be stale either.
		out, err := v.shErr("/bin/vmtest -test.run '^TestFleetTask$' -test.v 2>&1", taskEnv+"=torture",
			"LEASEFS_VM_FOR=10s", "LEASEFS_VM_FILES=100", "LEASEFS_VM_MOUNTS=/mnt/dev/calm /mnt/net/calm")
		if err != nil || !strings.Contains(out, `"Stale":0`) || strings.Contains(out, `"Reads":0`) {
			logs, _ := v.shErr("tail -n 30 /run/guest-*.log")
			return fmt.Errorf("reading through the upgrade: %v\n%s\nthe guests' logs:\n%s", err, out, logs)
		}
		return nil
	})
	<-done
	if t.Failed() {
		t.Logf("the host agent's log:\n%s", f.host.Log)
	}
	if now := started(); now.Equal(was) || now.IsZero() {
		t.Fatalf("no new run of the agent after SIGUSR2 (started %v, was %v)\n%s", now, was, f.host.Log)
	}
	for _, h := range hs {
		h.readAll(t, want)
	}
	for _, v := range vms {
		for _, m := range fleetMounts {
			if st := v.guestStatus(t, m.dir); st.Resumes < 1 || len(st.Fenced) > fenced[v.name+m.dir] {
				t.Errorf("VM %s %s: %d resumes, fenced %+v (before the upgrade: %d)", v.name, m.dir, st.Resumes, st.Fenced, fenced[v.name+m.dir])
			}
		}
	}
	// The readers' last files are released as they close: soon after.
	// An open in flight at the exec is sent again on the resumed
	// session; if the first one was granted, its lease stays with the
	// session, unknown to the guest, until the session ends (guestagent's
	// Client.call): at most one per reader, two per guest.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		after := f.status(t)
		if len(after.Guests) == len(before.Guests) && after.Files == before.Files {
			break
		}
		if time.Now().After(deadline) {
			if len(after.Guests) != len(before.Guests) || after.Files > before.Files+2*len(after.Guests) {
				t.Fatalf("after the upgrade: %d guests holding %d files; before: %d holding %d", len(after.Guests), after.Files, len(before.Guests), before.Files)
			}
			t.Logf("after the upgrade: %d files held, %d before: leases of opens sent twice", after.Files, before.Files)
			break
		}
	}
}

// The host agent stopped (SIGTERM, as systemctl stop) or killed while
// every VM holds a deleted file whose blocks the writer then reuses:
// the held files give their cached bytes or an error — ESTALE at once
// after a stop (the agent revoked its leases), EIO after a crash (the
// guests cannot know; --down soft=3s) — never the filler. New opens
// fail while no agent runs and work once one runs again; the held
// files are ESTALE then.
func fleetHostGone(t *testing.T, f *fleet, vms []*vm, sig syscall.Signal) {
	hs, want := holdDeleted(t, f, vms, "held-"+strings.ToLower(sig.String()[:4]), byte(sig))
	guests := len(f.status(t).Guests)
	f.stopHost(t, sig)
	f.refill(t, "held-"+strings.ToLower(sig.String()[:4]))
	first := syscall.ESTALE
	if sig == syscall.SIGKILL {
		first = syscall.EIO
	}
	for _, h := range hs {
		if err := h.readAll(t, want, first); err == nil {
			t.Errorf("%s: read the whole file while no agent held it", h)
		}
	}
	each(t, vms, func(v *vm) error {
		if out, err := v.shErr("cat /mnt/dev/hello /mnt/net/hello"); err == nil {
			return fmt.Errorf("a new open while no agent runs: %q", out)
		}
		return nil
	})
	f.startHost(t, nil)
	f.waitGuests(t, guests, time.Minute)
	waitCat(t, vms, "hello", helloText)
	for _, h := range hs {
		if _, err := h.readAt(2<<20, 4096); !errors.Is(err, syscall.ESTALE) {
			t.Errorf("%s: a held file once an agent is back: %v, want ESTALE", h, err)
		}
	}
}

// A VM killed (SIGKILL to QEMU and its vsock backend) while it holds a
// file: a host writer of that file waits no longer than the ack
// timeout; after the grace the host holds nothing for it — no session,
// no file, fewer descriptors — and the generations its guests kept go.
func fleetVMKilled(t *testing.T, f *fleet, vms []*vm) {
	victim := vms[len(vms)-1]
	f.write(t, "victim", pattern(6, 1<<20))
	f.publishSeen(t)
	before := f.status(t)
	fds := func() int {
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", f.host.Pid()))
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	fdsBefore := fds()
	hs := holdAll(t, []*vm{victim}, "victim")
	for _, h := range hs {
		if _, err := h.readAt(0, 4096); err != nil {
			t.Fatal(err)
		}
	}
	victim.kill()
	start := time.Now()
	w, err := os.OpenFile(filepath.Join(f.mnt, "victim"), os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	waited := time.Since(start)
	w.Close()
	t.Logf("the writer of the killed VM's file waited %v", waited.Round(time.Millisecond))
	defer func() { t.Logf("the host agent's descriptors: %d with the VM, %d after it went", fdsBefore, fds()) }()
	if waited > 2*time.Second+time.Second { // --ack-timeout 2s, and a second's slack
		t.Errorf("the writer waited %v; the ack timeout is 2s", waited)
	}
	f.waitGuests(t, len(before.Guests)-len(fleetMounts), 2*time.Minute)
	for deadline := time.Now().Add(fleetGrace + 30*time.Second); ; time.Sleep(100 * time.Millisecond) {
		f.publishSeen(t)
		st := f.status(t)
		if st.Files <= before.Files && st.Leases <= before.Leases && st.Kept <= before.Kept && fds() < fdsBefore {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the grace: %d files, %d leases, %d kept generations, %d fds; before the VM held its file: %d, %d, %d, %d",
				st.Files, st.Leases, st.Kept, fds(), before.Files, before.Leases, before.Kept, fdsBefore)
		}
	}
}

// fleetFigures logs what the fleet costs and how fast it follows the
// host (TCG: relative figures only; docs/benchmarks.md): publish to
// visible in every guest, each VM's guest agents' memory, the host
// agent's memory and descriptors.
func fleetFigures(t *testing.T, f *fleet, vms []*vm) {
	var took []time.Duration
	for i := range 9 {
		f.write(t, "figures", []byte(fmt.Sprintf("round %d\n", i)))
		took = append(took, f.publishSeen(t))
	}
	slices.Sort(took)
	t.Logf("publish to visible in all %d guests: median %v, max %v (%d rounds)", 2*len(vms),
		took[len(took)/2].Round(time.Millisecond), took[len(took)-1].Round(time.Millisecond), len(took))
	for _, v := range vms {
		out := v.sh(t, `for p in $(pidof leasefs); do grep VmRSS /proc/$p/status; done`)
		t.Logf("VM %s (%s): guest agents' RSS: %s", v.name, v.k.name, strings.Join(strings.Fields(out), " "))
	}
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", f.host.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", f.host.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(st), "\n") {
		if strings.HasPrefix(line, "VmRSS") {
			t.Logf("host agent with %d VMs, %d guests: %s, %d descriptors", len(vms), len(f.status(t).Guests),
				strings.Join(strings.Fields(line), " "), len(fds))
		}
	}
}

// hmp gives the VM's QEMU monitor commands and returns what it answered
// to the last.
func (v *vm) hmp(t testing.TB, commands ...string) string {
	t.Helper()
	var c net.Conn
	var err error
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		if c, err = net.Dial("unix", v.monitor); err == nil {
			break
		}
		if time.Now().After(deadline) { // QEMU makes it as it starts
			t.Fatalf("VM %s: monitor: %v", v.name, err)
		}
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	r := bufio.NewReader(c)
	// Up to the next prompt: the banner's, then each command's answer.
	prompt := func() string {
		var b strings.Builder
		for !strings.HasSuffix(b.String(), "(qemu) ") {
			ch, err := r.ReadByte()
			if err != nil {
				t.Fatalf("VM %s: monitor: %v (%q)", v.name, err, b.String())
			}
			b.WriteByte(ch)
		}
		return b.String()
	}
	prompt()
	var out string
	for _, cmd := range commands {
		if _, err := fmt.Fprintf(c, "%s\n", cmd); err != nil {
			t.Fatal(err)
		}
		// The echo (with line editing) ends at the first CRLF.
		_, out, _ = strings.Cut(prompt(), "\r\n")
		out = strings.TrimSuffix(out, "(qemu) ")
		if strings.Contains(out, "Error") {
			t.Fatalf("VM %s: monitor: %s: %s", v.name, cmd, out)
		}
	}
	return out
}

// A VM is saved and restored twice, as Firecracker users clone VMs: its
// vsock device unplugged (QEMU saves no vhost-user device), the VM
// migrated to a file, then two copies restored from it at once, each
// given a new device (with its own backend, the VM's CID) — a transport
// reset to the guest: one in the VM's place (its socket's name), one as
// a clone (another name, so another guest to the host, as every VM of
// an hvsock-dir is known by its socket). Both copies' guests present the
// same sessions; only the copy in place resumes them and reads its held
// files on — also after the host deleted one and refilled the disk — and
// the clone gets new sessions and ESTALE for those files, never other
// bytes. (Copies that the host cannot tell apart by their socket — one
// CID for both, on vhost-vsock — are kept apart by the session's secret,
// which changes at each resume: lease's TestCopiesOfASessionCannotBothHoldIt.)
// Both copies then work as two guests.
func fleetSnapshot(t *testing.T, f *fleet, ks []kernel) {
	k := ks[len(ks)/2]
	src := f.start(t, vmSpec{name: "vm-saved", k: k, cache: "none", hotplug: true})
	src.ready(t)
	src.mountAll(t)
	want := pattern(7, 2<<20)
	f.write(t, "cloned", want)
	f.publishSeen(t)
	before := len(f.status(t).Guests)
	hs := holdAll(t, []*vm{src}, "cloned")
	for _, h := range hs {
		h.readAll(t, want[:1<<20])
	}
	src.hmp(t, "device_del vsock0")
	for deadline := time.Now().Add(time.Minute); strings.Contains(src.hmp(t, "info qtree"), "vhost-user-vsock"); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the vsock device was not unplugged within a minute")
		}
	}
	snap := filepath.Join(f.run, "vm.snap")
	src.hmp(t, fmt.Sprintf("migrate \"exec:cat > %s\"", snap))
	for deadline := time.Now().Add(2 * time.Minute); !strings.Contains(src.hmp(t, "info migrate"), "Migration status: completed"); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the save did not complete: %s", src.hmp(t, "info migrate"))
		}
	}
	src.kill()
	for _, p := range []string{src.uds, src.vhostSock, src.monitor} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
	}
	var copies []*vm
	for _, name := range []string{src.name, "vm-clone"} {
		copies = append(copies, f.start(t, vmSpec{name: name, k: k, cache: "none", cid: src.cid, hotplug: true, incoming: snap}))
	}
	for _, c := range copies {
		// "paused (inmigrate)" until the restore is done.
		for deadline := time.Now().Add(2 * time.Minute); strings.TrimSpace(c.hmp(t, "info status")) != "VM status: paused"; time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("VM %s not restored: %s", c.name, c.hmp(t, "info status"))
			}
		}
	}
	for _, c := range copies {
		c.hmp(t, "cont", "chardev-add socket,id=vsock1,path="+c.vhostSock, "device_add vhost-user-vsock-pci,chardev=vsock1,id=vsock1,bus=rp0")
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, c := range copies {
				t.Logf("%s: %s\n%s", c.name, c.hmp(t, "info status"), c.diag())
			}
		}
	})
	f.waitGuests(t, before-len(fleetMounts)+2*len(fleetMounts), 2*time.Minute)
	// The file goes on the host, its blocks are reused: only a copy
	// whose session holds it may read it on.
	if err := os.Remove(filepath.Join(f.mnt, "cloned")); err != nil {
		t.Fatal(err)
	}
	f.refill(t, "cloned")
	f.publishSeen(t)
	for i, m := range fleetMounts {
		var kept []string
		for _, c := range copies {
			h := &held{v: c, handle: hs[i].handle} // the same descriptor in each copy
			if err := h.readAll(t, want, syscall.ESTALE); err == nil {
				kept = append(kept, c.name)
			}
		}
		t.Logf("%s: the session stayed with %v", m.dir, kept)
		if len(kept) != 1 || kept[0] != src.name {
			t.Errorf("%s: the session stayed with %v, want the copy restored in place (%s) alone", m.dir, kept, src.name)
		}
	}
	waitCat(t, copies, "hello", helloText)
}

// The host agent runs as systemd runs it with a file-descriptor store
// (a stand-in for systemd's): killed while every VM holds a deleted file,
// and the disk refilled meanwhile, it starts again with what the store
// kept. The guests resume their sessions and read their files whole:
// the store kept the blocks. The agent stays so for what follows.
func fleetFDStore(t *testing.T, f *fleet, vms []*vm) {
	guests := len(f.status(t).Guests)
	f.stopHost(t, syscall.SIGTERM)
	sd := testenv.NewFakeSystemd(f.t) // for as long as the agent runs
	f.startHost(t, sd)
	f.waitGuests(t, guests, time.Minute)
	hs, want := holdDeleted(t, f, vms, "stored", 8)
	for deadline := time.Now().Add(10 * time.Second); !slices.ContainsFunc(sd.Names(), func(n string) bool { return strings.HasPrefix(n, "lease.mirror.") }); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the store holds %v: no held file", sd.Names())
		}
	}
	resumes := map[string]int{}
	for _, v := range vms {
		for _, m := range fleetMounts {
			resumes[v.name+m.dir] = v.guestStatus(t, m.dir).Resumes
		}
	}
	f.stopHost(t, syscall.SIGKILL)
	f.refill(t, "stored")
	f.startHost(t, sd)
	f.waitGuests(t, guests, time.Minute)
	for _, h := range hs {
		h.readAll(t, want)
	}
	for _, v := range vms {
		for _, m := range fleetMounts {
			if st := v.guestStatus(t, m.dir); st.Resumes <= resumes[v.name+m.dir] {
				t.Errorf("VM %s %s: the session was not resumed (%d resumes)", v.name, m.dir, st.Resumes)
			}
		}
	}
}
