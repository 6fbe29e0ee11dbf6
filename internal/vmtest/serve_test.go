package vmtest

// What runs inside a fleet VM: a command server on vsock that the test
// outside drives (programs to run, files to hold open and read), and
// the tasks it runs there through the test binary (the conformance
// suite, the torture's readers).

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/vsock"

	"github.com/leasefs/leasefs/internal/conformance"
	"github.com/leasefs/leasefs/internal/imgtest"
	"github.com/leasefs/leasefs/internal/testenv"
)

// serveEnv makes the test binary the VM's command server; taskEnv runs
// one task (TestFleetTask) in the VM.
const (
	serveEnv  = "LEASEFS_VM_SERVE"
	taskEnv   = "LEASEFS_VM_TASK"
	servePort = 6000
)

func TestMain(m *testing.M) {
	if os.Getenv(serveEnv) != "" {
		os.Exit(serve())
	}
	os.Exit(m.Run())
}

// A request to the VM's command server: run a program (Args), or open,
// read and close a file held open between requests.
type request struct {
	Op     string   // "run", "open", "read", "close"
	Args   []string `json:",omitempty"` // run: the program and its arguments
	Env    []string `json:",omitempty"` // run: added to the server's environment
	Path   string   `json:",omitempty"` // open
	Handle int      `json:",omitempty"` // read, close
	Off    int64    `json:",omitempty"` // read
	Len    int      `json:",omitempty"` // read
}

// maxOut is the most of a program's output a reply carries: its end.
const maxOut = 32 << 10

// A reply: Errno is the error's number where it has one (ESTALE, EIO),
// so the test outside can compare it.
type reply struct {
	Out    string `json:",omitempty"` // run: its output, stdout and stderr
	Exit   int    // run: its exit status
	Handle int    `json:",omitempty"` // open
	// read: how many bytes, their SHA-256 and the first few. Not the
	// bytes: with Linux 6.12 guests, vhost-device-vsock 0.3.0 drops a
	// guest's send of about 60 KB and more (docs/operations.md).
	N     int    `json:",omitempty"`
	Sum   string `json:",omitempty"`
	Head  []byte `json:",omitempty"`
	Err   string `json:",omitempty"`
	Errno int    `json:",omitempty"`
}

// serve answers requests on vsock port servePort, one per connection,
// until the VM powers off; the console says when it listens.
func serve() int {
	l, err := vsock.Listen(servePort, nil)
	if err != nil {
		fmt.Println("LEASEFS-VM: listening on vsock:", err)
		return 1
	}
	fmt.Println("LEASEFS-VM-READY")
	s := &server{files: map[int]*os.File{}}
	for {
		c, err := l.Accept()
		if err != nil {
			fmt.Println("LEASEFS-VM: accept:", err)
			return 1
		}
		go s.answer(c)
	}
}

type server struct {
	mu    sync.Mutex
	next  int
	files map[int]*os.File // guarded by mu
}

func (s *server) answer(c net.Conn) {
	defer c.Close()
	var req request
	if err := json.NewDecoder(bufio.NewReader(c)).Decode(&req); err != nil {
		return
	}
	rep := s.do(req)
	_ = json.NewEncoder(c).Encode(rep)
}

func (s *server) do(req request) reply {
	var rep reply
	fail := func(err error) reply {
		rep.Err = err.Error()
		var errno syscall.Errno
		if errors.As(err, &errno) {
			rep.Errno = int(errno)
		}
		return rep
	}
	switch req.Op {
	case "run":
		cmd := exec.Command(req.Args[0], req.Args[1:]...)
		for _, kv := range os.Environ() {
			if !strings.HasPrefix(kv, serveEnv+"=") { // a task is not another server
				cmd.Env = append(cmd.Env, kv)
			}
		}
		cmd.Env = append(cmd.Env, req.Env...)
		out, err := cmd.CombinedOutput()
		if len(out) > maxOut { // see reply.N
			out = append([]byte("…\n"), out[len(out)-maxOut:]...)
		}
		rep.Out = string(out)
		if ee, ok := err.(*exec.ExitError); ok {
			rep.Exit = ee.ExitCode()
		} else if err != nil {
			return fail(err)
		}
	case "open":
		f, err := os.Open(req.Path)
		if err != nil {
			return fail(err)
		}
		s.mu.Lock()
		s.next++
		rep.Handle = s.next
		s.files[rep.Handle] = f
		s.mu.Unlock()
	case "read", "close":
		s.mu.Lock()
		f := s.files[req.Handle]
		if req.Op == "close" {
			delete(s.files, req.Handle)
		}
		s.mu.Unlock()
		if f == nil {
			return fail(fmt.Errorf("no handle %d", req.Handle))
		}
		if req.Op == "close" {
			return rep
		}
		b := make([]byte, req.Len)
		n, err := f.ReadAt(b, req.Off)
		sum := sha256.Sum256(b[:n])
		rep.N, rep.Sum, rep.Head = n, hex.EncodeToString(sum[:]), b[:min(n, 16)]
		if err != nil && !errors.Is(err, io.EOF) {
			return fail(err)
		}
	default:
		return fail(fmt.Errorf("no operation %q", req.Op))
	}
	return rep
}

// snapshotLine begins the line on which the snapshot task prints what a
// mount shows.
const snapshotLine = "LEASEFS-SNAPSHOT "

// TestFleetTask is a task the fleet's test runs in a VM through the
// command server: $LEASEFS_VM_TASK names it, its arguments follow in
// the environment. Outside a VM it is not run.
func TestFleetTask(t *testing.T) {
	switch task := os.Getenv(taskEnv); task {
	case "":
		t.Skip("only in a fleet VM") // the fleet's test runs it there
	case "conformance":
		// The oracle: the VM kernel's own read-only mount of the disk,
		// which holds the generation just published (nothing has been
		// written since; the journal was flushed by its freeze).
		oracle := "/run/oracle" // every user may walk to it, for the permission checks
		if err := os.MkdirAll(oracle, 0o755); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("mount", "-t", "ext4", "-o", "ro,noload", os.Getenv("LEASEFS_VM_DISK"), oracle).CombinedOutput(); err != nil {
			t.Fatalf("mounting the disk: %v %s", err, out)
		}
		t.Cleanup(func() { imgtest.Unmount(t, oracle) })
		for _, dir := range strings.Fields(os.Getenv("LEASEFS_VM_MOUNTS")) {
			t.Run(strings.ReplaceAll(strings.Trim(dir, "/"), "/", "_"), func(t *testing.T) { conformance.Run(t, dir, oracle) })
		}
	case "snapshot":
		// What a mount shows of a tree, for the host to compare with
		// its oracle (fleetCoherence).
		out, err := json.Marshal(imgtest.Snapshot(t, os.Getenv("LEASEFS_VM_DIR")))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Printf("%s%s\n", snapshotLine, out)
	case "torture":
		d, err := time.ParseDuration(os.Getenv("LEASEFS_VM_FOR"))
		if err != nil {
			t.Fatal(err)
		}
		files, _ := strconv.Atoi(os.Getenv("LEASEFS_VM_FILES"))
		tt := testenv.Torture{Files: files, Readers: strings.Fields(os.Getenv("LEASEFS_VM_MOUNTS"))}
		res := tt.Read(t, d)
		out, _ := json.Marshal(res)
		fmt.Printf("LEASEFS-TORTURE %s\n", out)
	default:
		t.Fatalf("no task %q", task)
	}
}
