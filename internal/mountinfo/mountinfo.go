// Package mountinfo reads this process's mount table
// (/proc/self/mountinfo, proc(5)).
package mountinfo

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// A Mount is one line of the table.
type Mount struct {
	ID     string // a new one for every mount
	Dev    string // MAJOR:MINOR of the filesystem
	Point  string
	FSType string
	Source string
	// SuperRW: the filesystem itself is read-write. The mount's own
	// flags may still be read-only (systemd's ProtectSystem= makes them
	// so in a service's namespace).
	SuperRW bool
}

// At returns the mount on top at point; ok is false when nothing is
// mounted there.
func At(point string) (m Mount, ok bool, err error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return m, false, err
	}
	clean := filepath.Clean(point)
	for line := range strings.SplitSeq(string(b), "\n") {
		pre, post, found := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !found || len(f) < 6 || len(g) < 3 || unescape(f[4]) != clean {
			continue
		}
		// Later lines are mounted over earlier ones.
		m = Mount{ID: f[0], Dev: f[2], Point: clean, FSType: g[0], Source: unescape(g[1]), SuperRW: strings.HasPrefix(g[2], "rw")}
		ok = true
	}
	return m, ok, nil
}

// unescape undoes the table's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
