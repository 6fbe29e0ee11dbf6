package hostagent

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// TestMain doubles as two helper processes (testenv.Helper): the
// watchdog ("watchdog" MOUNT), and an agent that publishes and hangs
// while frozen ("agent" DEVICE:MOUNT:STATEDIR).
func TestMain(m *testing.M) {
	testenv.RunHelper(map[string]testenv.Role{
		"watchdog": func(mount string) int {
			return testenv.Exit(WatchdogMain(os.Stdin, mount, hclog.New(&hclog.LoggerOptions{Output: os.Stderr})))
		},
		"agent": hangingAgent,
	})
	os.Exit(m.Run())
}

func watchdogCmd(mount string) *exec.Cmd { return testenv.Helper("watchdog", mount) }

func hangingAgent(spec string) int {
	f := strings.SplitN(spec, ":", 3)
	wd, err := StartWatchdog(watchdogCmd(f[1]))
	if err != nil {
		fmt.Println(err)
		return 1
	}
	e, err := OpenExport(ExportConfig{Name: "x", Device: f[0], Mount: f[1], StateDir: f[2], Watchdog: wd, FreezeBudget: time.Minute})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	e.pl.onFrozen = func() {
		fmt.Println("frozen")
		select {}
	}
	_, err = e.Publish()
	fmt.Println(err)
	return 1
}

// export is a loop-mounted, read-write ext4 for a test.
type export struct {
	img, dev, mnt, state string
}

func newExport(t testing.TB, sizeMB int, args ...string) export {
	t.Helper()
	testenv.RequireLoop(t)
	img := imgtest.Mkfs(t, "ext4", "", sizeMB, append([]string{"-b", "4096", "-O", imgtest.Features}, args...)...)
	mnt := imgtest.KernelMount(t, img, "rw")
	return export{img: img, dev: imgtest.LoopDevice(t, mnt), mnt: mnt, state: t.TempDir()}
}

// open opens the export with a watchdog, both closed when t ends.
func (x export) open(t testing.TB, budget time.Duration) *Export {
	t.Helper()
	return x.openWith(t, ExportConfig{FreezeBudget: budget})
}

func (x export) openWith(t testing.TB, cfg ExportConfig) *Export {
	t.Helper()
	wd, err := StartWatchdog(watchdogCmd(x.mnt))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { wd.Close() })
	cfg.Name, cfg.Device, cfg.Mount, cfg.StateDir, cfg.Watchdog = "test", x.dev, x.mnt, x.state, wd
	e, err := OpenExport(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// write writes a file on the export.
func (x export) write(t testing.TB, name, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(x.mnt, name), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// writable reports whether a write to the export completes within d.
func (x export) writable(d time.Duration) bool {
	done := make(chan error, 1)
	go func() { done <- os.WriteFile(filepath.Join(x.mnt, "probe"), []byte("p"), 0o644) }()
	select {
	case err := <-done:
		return err == nil
	case <-time.After(d):
		return false
	}
}

// startHangingAgent runs an agent process that freezes the export and
// hangs; it returns once the export is frozen.
func startHangingAgent(t *testing.T, x export) *exec.Cmd {
	t.Helper()
	cmd := testenv.Helper("agent", x.dev+":"+x.mnt+":"+x.state)
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, _ := bufio.NewReader(out).ReadString('\n')
	if line != "frozen\n" {
		t.Fatalf("agent said %q", line)
	}
	return cmd
}
