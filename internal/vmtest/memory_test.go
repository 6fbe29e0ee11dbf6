package vmtest

// What VMs running the same programs from a leasefs /usr cost the host
// in memory, in each page-cache mode, beside the same VMs with /usr on a
// read-only virtio disk; and what KSM merges of it. make bench-usr-memory.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/imgtest"
)

// memoryVMs run the workload at once in each mode, with memoryMiB each.
const (
	memoryVMs = 4
	memoryMiB = 768
)

// workloadScript is the same python workload in every VM, run at boot
// by workloadService: imports, then a process that keeps them (its
// libraries mapped) while the host measures. It prints the guest's
// memory before and after to the console.
const workloadScript = `#!/bin/sh
agent() { p=$(pgrep -o -f '^@leasefs-guest') && awk '/^(VmRSS|RssAnon|RssFile):/ {printf "Agent%s%s ", $1, $2}' /proc/$p/status; }
mem() { echo "LFS-MEM $1 $(awk '/^(MemTotal|MemFree|Cached|AnonPages|Shmem|Mapped):/ {printf "%s%s ", $1, $2}' /proc/meminfo)$(agent)"; }
mem before
mods='email, http.client, xml.dom.minidom, json, sqlite3, ssl, lzma, ctypes, asyncio, decimal, unittest, argparse, csv'
python3 -c "import $mods"
python3 -c "import $mods, time; open('/run/lfs-workload', 'w'); time.sleep(1e9)" &
while [ ! -e /run/lfs-workload ]; do sleep 0.2; done
mem after
wait
`

const workloadService = `[Unit]
Description=the memory benchmark's workload
After=local-fs.target

[Service]
ExecStart=/bin/sh /opt/leasefs/workload.sh
StandardOutput=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
`

// A memMode is one way of giving the VMs their /usr.
type memMode struct {
	name    string
	fstype  string // of mount.usrfstype=
	flags   string // mount.usrflags=
	cache   string // QEMU's for the export's disk
	noVsock bool   // private memory (no vhost-user), for KSM
	ksm     bool   // measured again after KSM has scanned
}

// BenchmarkUsrMemory boots memoryVMs VMs per mode, each running
// workloadScript with /usr from the host agent here (or from the disk),
// and reports what they cost the host: the VMs' memory (QEMU's and the
// vsock backend's proportional set: guest RAM they touched, the guest's
// page cache inside it), the host's page cache of the export's image and
// the agent. Run with -benchtime 1x.
func BenchmarkUsrMemory(b *testing.B) {
	bu := newBootUsr(b)
	installWorkload(b, bu.root)
	leasefs := "connect=vsock:2:" + port + ",device=/dev/vdb,storage-daemon,log=/dev/kmsg"
	for _, m := range []memMode{
		{name: "ext4_disk", fstype: "ext4", flags: "ro,noload", cache: "none"},
		{name: "leasefs_guest_cache", fstype: "fuse.leasefs", flags: leasefs, cache: "none", ksm: true},
		{name: "leasefs_host_cache_writeback", fstype: "fuse.leasefs", flags: leasefs + ",page-cache=host", cache: "writeback"},
		{name: "leasefs_guest_cache_writeback", fstype: "fuse.leasefs", flags: leasefs, cache: "writeback"},
		{name: "ext4_disk_private_memory", fstype: "ext4", flags: "ro,noload", cache: "none", noVsock: true, ksm: true},
	} {
		b.Run(m.name, func(b *testing.B) {
			for range b.N {
				usrMemory(b, bu, m)
			}
		})
	}
}

// usrMemory runs one mode and reports its figures.
func usrMemory(b *testing.B, bu *bootUsr, m memMode) {
	f := bu.f
	dropCaches(b)
	tmp := b.TempDir()
	usr := "usr"
	if m.fstype == "ext4" {
		usr = "/dev/vdb"
	}
	var vms []*vm
	defer func() {
		for _, v := range vms {
			v.kill()
		}
	}()
	for i := range memoryVMs {
		root := filepath.Join(tmp, fmt.Sprintf("root%d.img", i))
		if out, err := exec.Command("cp", "--sparse=always", bu.root, root).CombinedOutput(); err != nil {
			b.Fatalf("copying the root: %v %s", err, out)
		}
		vms = append(vms, f.start(b, vmSpec{name: fmt.Sprintf("%s-%d", m.name, i), k: bu.k, cache: m.cache, root: root, memory: memoryMiB, noVsock: m.noVsock,
			append: "mount.usr=" + usr + " mount.usrfstype=" + m.fstype + " mount.usrflags=" + m.flags}))
	}
	var before, after guestMem
	for _, v := range vms {
		bf, af := v.workloadDone(b)
		before.add(bf)
		after.add(af)
	}
	time.Sleep(2 * time.Second) // the last VM's page faults settle
	measure := func(suffix string) {
		var ram, qemu int64
		for _, v := range vms {
			r, other := guestRAM(b, v.qemu.Process.Pid, memoryMiB)
			ram, qemu = ram+r, qemu+other
		}
		cache := residentBytes(b, f.img)
		agent := pss(b, f.host.Pid())
		perVM := func(n int64) float64 { return float64(n) / memoryVMs / (1 << 20) }
		b.ReportMetric(perVM(ram+cache+agent), "host-MiB/VM"+suffix)
		b.ReportMetric(perVM(ram), "guest-ram-MiB/VM"+suffix)
		b.ReportMetric(float64(cache)/(1<<20), "usr-host-cache-MiB"+suffix)
		b.ReportMetric(float64(agent)/(1<<20), "agent-MiB"+suffix)
		b.ReportMetric(perVM(qemu), "qemu-other-MiB/VM"+suffix)
		b.Logf("%s%s: host %.0f MiB per VM: its RAM %.0f MiB, the host's page cache of /usr %.0f MiB and the agent %.0f MiB shared by %d (QEMU besides: %.0f MiB per VM, TCG's code cache mostly)",
			m.name, suffix, perVM(ram+cache+agent), perVM(ram), float64(cache)/(1<<20), float64(agent)/(1<<20), memoryVMs, perVM(qemu))
	}
	measure("")
	b.ReportMetric(after.mib("Cached")/memoryVMs, "guest-cached-MiB/VM")
	b.ReportMetric((after.mib("Cached")-before.mib("Cached"))/memoryVMs, "workload-cached-MiB/VM")
	b.ReportMetric((after.mib("MemTotal")-after.mib("MemFree"))/memoryVMs, "guest-used-MiB/VM")
	b.ReportMetric(after.mib("AgentVmRSS")/memoryVMs, "guest-agent-MiB/VM")
	b.Logf("%s: in each guest, after the workload: %.0f MiB used, %.0f MiB cached (%.0f MiB of it by the workload), %.0f MiB anonymous, %.0f MiB mapped; the guest agent's RSS %.0f MiB (%.0f anonymous, %.0f its binary)",
		m.name, (after.mib("MemTotal")-after.mib("MemFree"))/memoryVMs, after.mib("Cached")/memoryVMs,
		(after.mib("Cached")-before.mib("Cached"))/memoryVMs, after.mib("AnonPages")/memoryVMs, after.mib("Mapped")/memoryVMs,
		after.mib("AgentVmRSS")/memoryVMs, after.mib("AgentRssAnon")/memoryVMs, after.mib("AgentRssFile")/memoryVMs)
	if m.ksm {
		saved := ksmScan(b, 3)
		b.ReportMetric(float64(saved)/memoryVMs/(1<<20), "ksm-saved-MiB/VM")
		b.Logf("%s: KSM merged %.0f MiB per VM", m.name, float64(saved)/memoryVMs/(1<<20))
		measure("-ksm")
	}
}

// installWorkload puts workloadScript and its unit into the root image.
func installWorkload(t testing.TB, root string) {
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-o", "loop", root, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mounting the root: %v %s", err, out)
	}
	defer imgtest.Unmount(t, mnt)
	// The boot test's demo service is not wanted here.
	_ = os.Remove(filepath.Join(mnt, "etc/systemd/system/multi-user.target.wants/lfs-demo.service"))
	for path, body := range map[string]string{
		"opt/leasefs/workload.sh":                 workloadScript,
		"etc/systemd/system/lfs-workload.service": workloadService,
	} {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(mnt, path)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(mnt, path), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("ln", "-sf", "/etc/systemd/system/lfs-workload.service", filepath.Join(mnt, "etc/systemd/system/multi-user.target.wants/")).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
}

// A guestMem is /proc/meminfo's fields (kB), summed over VMs.
type guestMem map[string]int64

func (g *guestMem) add(o guestMem) {
	if *g == nil {
		*g = guestMem{}
	}
	for k, v := range o {
		(*g)[k] += v
	}
}

func (g guestMem) mib(field string) float64 { return float64(g[field]) / 1024 }

// workloadDone waits for the VM's workload and returns its memory
// before and after it.
func (v *vm) workloadDone(t testing.TB) (before, after guestMem) {
	// Long: with --page-cache host every read of /usr is a request to
	// the guest agent and a read of the disk, and four VMs under TCG on
	// two cores take minutes to boot that way.
	for deadline := time.Now().Add(15 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		before, after = nil, nil
		for line := range strings.Lines(v.console.String()) {
			f := strings.Fields(line)
			i := 0
			for i < len(f) && f[i] != "LFS-MEM" {
				i++
			}
			if i+1 >= len(f) {
				continue
			}
			m := guestMem{}
			for _, kv := range f[i+2:] {
				k, val, _ := strings.Cut(kv, ":")
				n, err := strconv.ParseInt(val, 10, 64)
				if err == nil {
					m[k] = n
				}
			}
			switch f[i+1] {
			case "before":
				before = m
			case "after":
				after = m
			}
		}
		if before != nil && after != nil {
			return before, after
		}
		select {
		case <-v.qemuDone:
			t.Fatalf("VM %s exited:\n%s", v.name, v.tailOf())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("VM %s: no workload after 15 minutes:\n%s", v.name, v.tailOf())
		}
	}
}

// pss is a process's proportional set size in bytes: its private pages
// and its share of those it shares (a VM's memory with its vhost-user
// backend, KSM's merged pages with the other VMs).
func pss(t testing.TB, pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "Pss:" {
			n, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n << 10
		}
	}
	t.Fatalf("no Pss for %d", pid)
	return 0
}

// guestRAM is how much of a VM's RAM (QEMU's mapping of mib MiB) is
// resident on the host, as its proportional share (KSM's merged pages
// split among the VMs that have them; the memfd a vhost-user backend
// maps too counted whole), and how much QEMU holds besides (under TCG,
// mostly its cache of translated code).
func guestRAM(t testing.TB, pid, mib int) (ram, other int64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	var size, rss, pss, total, ramPss int64
	shared, found := false, false
	flush := func() {
		if size == int64(mib)<<10 && !found {
			found, ramPss = true, pss<<10
			ram = pss << 10
			if shared {
				ram = rss << 10
			}
		}
	}
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if strings.Contains(f[0], "-") && len(f) >= 5 { // a mapping's header
			flush()
			size, rss, pss, shared = 0, 0, 0, len(f[1]) == 4 && f[1][3] == 's'
			continue
		}
		if len(f) < 2 {
			continue
		}
		n, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "Size:":
			size = n
		case "Rss:":
			rss = n
		case "Pss:":
			pss = n
			total += n
		}
	}
	flush()
	if !found {
		t.Fatalf("no mapping of %d MiB in QEMU %d", mib, pid)
	}
	return ram, total<<10 - ramPss
}

// residentBytes is how much of a file is in the host's page cache.
func residentBytes(t testing.TB, path string) int64 {
	out, err := exec.Command("fincore", "--bytes", "--noheadings", "--output", "RES", path).Output()
	if err != nil {
		t.Fatalf("fincore %s: %v", path, err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
	if err != nil {
		t.Fatalf("fincore %s: %q", path, out)
	}
	return n
}

func dropCaches(t testing.TB) {
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		t.Fatal(err)
	}
}

// ksmScan runs KSM until it has scanned every mergeable page scans
// times, returns the bytes it saved (pages_sharing), and leaves KSM's
// settings as they were (unmerging, if it was off).
func ksmScan(t testing.TB, scans int) int64 {
	const dir = "/sys/kernel/mm/ksm/"
	read := func(name string) string {
		b, err := os.ReadFile(dir + name)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	write := func(name, val string) {
		if err := os.WriteFile(dir+name, []byte(val), 0); err != nil {
			t.Fatalf("%s%s = %s: %v", dir, name, val, err)
		}
	}
	num := func(name string) int64 { n, _ := strconv.ParseInt(read(name), 10, 64); return n }
	old := map[string]string{}
	for _, k := range []string{"pages_to_scan", "sleep_millisecs", "run"} {
		old[k] = read(k)
	}
	t.Cleanup(func() {
		if old["run"] == "0" {
			write("run", "2") // unmerge
		}
		for _, k := range []string{"pages_to_scan", "sleep_millisecs", "run"} {
			write(k, old[k])
		}
	})
	write("pages_to_scan", "4000")
	write("sleep_millisecs", "20")
	write("run", "1")
	start := num("full_scans")
	for deadline := time.Now().Add(5 * time.Minute); num("full_scans") < start+int64(scans); time.Sleep(500 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Logf("KSM: %d full scans in 5 minutes", num("full_scans")-start)
			break
		}
	}
	return num("pages_sharing") * int64(os.Getpagesize())
}
