package guestagent

import (
	"strings"
	"testing"
	"time"
)

func TestParseDownPolicy(t *testing.T) {
	for _, c := range []struct {
		in   string
		want DownPolicy
		err  string
	}{
		{"hard", DownPolicy{Hard: true}, ""},
		{"soft", DefaultDown, ""},
		{"soft=5s", DownPolicy{Timeout: 5 * time.Second}, ""},
		{"soft=0s", DownPolicy{}, "positive duration"},
		{"soft=-1s", DownPolicy{}, "positive duration"},
		{"soft=forever", DownPolicy{}, "positive duration"},
		{"firm", DownPolicy{}, "want hard, soft or soft=DURATION"},
		{"", DownPolicy{}, "want hard"},
	} {
		got, err := ParseDownPolicy(c.in)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%q: %v, want an error saying %q", c.in, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%q: %+v %v, want %+v", c.in, got, err, c.want)
		}
		if back, err := ParseDownPolicy(got.String()); err != nil || back != got {
			t.Errorf("%q: String %q does not parse back: %+v %v", c.in, got.String(), back, err)
		}
	}
}

// A session holds its leases while its connection is up and its host
// answered within the lease time, less the margin; with no lease time
// told (an older host), while its connection is up.
func TestLeaseMargin(t *testing.T) {
	for _, lease := range []time.Duration{time.Second, 30 * time.Second} {
		m := leaseMargin(lease)
		if m <= 0 || m >= lease/2 {
			t.Errorf("lease %v: margin %v", lease, m)
		}
	}
	var none *liveSession
	if none.holds() {
		t.Error("no session holds")
	}
}
