package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// A test binary doubles as the helper processes its tests start — a
// freeze's watchdog, a writer on the host, an agent that hangs frozen —
// as roles. RunHelper, first in TestMain, plays the role $helperEnv
// names (ROLE or ROLE:ARG) and exits; a test starts one with Helper.

const helperEnv = "LEASEFS_TEST_HELPER"

// A Role runs as a helper process with its argument, and returns the
// process's exit code.
type Role func(arg string) int

// RunHelper plays the role this process was started as, if any, and
// exits; otherwise it returns.
func RunHelper(roles map[string]Role) {
	v, ok := os.LookupEnv(helperEnv)
	if !ok {
		return
	}
	os.Unsetenv(helperEnv) // what it starts is not a helper unless asked
	name, arg, _ := strings.Cut(v, ":")
	role := roles[name]
	if role == nil {
		fmt.Fprintf(os.Stderr, "%s=%s: this test binary has no such role\n", helperEnv, v)
		os.Exit(2)
	}
	os.Exit(role(arg))
}

// Helper is this test binary, to be started as role with arg; its
// stderr is the test's.
func Helper(role, arg string) *exec.Cmd {
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"="+role+":"+arg)
	cmd.Stderr = os.Stderr
	return cmd
}

// Exit is the exit code of a role that ended with err, said on stderr.
func Exit(err error) int {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}
