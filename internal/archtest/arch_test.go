package archtest

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/leasefs/leasefs/"

// forbidden maps a package to the packages it must not depend on,
// directly or through others (tests may compose more: a guest's tests
// run a host).
var forbidden = map[string][]string{
	"layout":     {"ext4ro", "lease", "vsockproto", "hostagent", "guestagent"},
	"ext4ro":     {"lease", "vsockproto", "hostagent", "guestagent"},
	"vsockproto": {"ext4ro", "lease", "hostagent", "guestagent"},
	"lease":      {"ext4ro", "vsockproto", "hostagent", "guestagent"},
	"guestagent": {"lease", "hostagent"},
	"hostagent":  {"guestagent", "hostagent/upgrade", "hostagent/agent"},
	// One run leaving its state to the next knows the host's states, not
	// the guest or the command line.
	"hostagent/upgrade": {"guestagent", "cmd/leasefs", "hostagent/agent"},
	// The running agent is a library: no command line in it.
	"hostagent/agent": {"guestagent", "cmd/leasefs"},
}

func TestDependencyRules(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps=false", "-f", `{{.ImportPath}}{{range .Deps}} {{.}}{{end}}`, module+"...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	deps := map[string]map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		pkg := strings.TrimPrefix(f[0], module)
		deps[pkg] = map[string]bool{}
		for _, d := range f[1:] {
			if rest, ok := strings.CutPrefix(d, module); ok {
				deps[pkg][rest] = true
			}
		}
	}
	for pkg, bad := range forbidden {
		d, ok := deps[pkg]
		if !ok {
			t.Errorf("package %s not found: update the rules", pkg)
			continue
		}
		for _, b := range bad {
			if d[b] {
				t.Errorf("%s depends on %s, which it must not (see docs/architecture.md)", pkg, b)
			}
		}
	}
}
