package guestagent

import (
	"os"
	"testing"
	"time"

	"github.com/leasefs/leasefs/internal/testenv"
)

// The consistency torture: a host writer replaces ~1,000 self-validating
// files continuously and publishes every second, while readers in both
// guests read them continuously. No read may be torn.
func TestTortureNoTornReads(t *testing.T) {
	d := time.Minute
	if v := os.Getenv("LEASEFS_TORTURE"); v != "" {
		var err error
		if d, err = time.ParseDuration(v); err != nil {
			t.Fatal(err)
		}
	}
	h := startHost(t, 3*time.Second)
	tt := testenv.Torture{Dir: h.Mnt, Files: 1000, For: d, Pause: time.Millisecond,
		Publish: func() error { _, err := h.Srv.Publish("test"); return err },
		Min:     testenv.TortureResults{Reads: 100, Generations: int64(d/time.Second) / 2}}
	tt.Populate(t)
	h.Publish(t)
	for _, g := range []*guestMount{startGuest(t, h, h.Img), startGuest(t, h, "")} {
		tt.Readers = append(tt.Readers, g.dir)
	}
	tt.Run(t)
}
