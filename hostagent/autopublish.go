package hostagent

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// AutoPublish is when fsnotify events trigger a publish: after Quiet
// without events, or Max after the first event while they keep coming.
type AutoPublish struct {
	Quiet, Max time.Duration
}

// ParseAutoPublish parses "quiet=2s,max=30s" (either may be left out) or
// "off" (nil).
func ParseAutoPublish(s string) (*AutoPublish, error) {
	if s == "off" {
		return nil, nil
	}
	ap := &AutoPublish{Quiet: 2 * time.Second, Max: 30 * time.Second}
	for _, kv := range strings.Split(s, ",") {
		k, v, _ := strings.Cut(kv, "=")
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return nil, fmt.Errorf("%q: %q is not a positive duration", s, v)
		}
		switch k {
		case "quiet":
			ap.Quiet = d
		case "max":
			ap.Max = d
		default:
			return nil, fmt.Errorf("%q: want quiet=DURATION,max=DURATION or off", s)
		}
	}
	if ap.Max < ap.Quiet {
		return nil, fmt.Errorf("%q: max is shorter than quiet", s)
	}
	return ap, nil
}

// AutoPublish publishes export name when its tree changes, as its
// ExportConfig.AutoPublish says, until ctx ends. It follows the export's watcher (ExportConfig.Watch),
// so the tree is watched once for both purposes; when events were lost
// the watcher makes the next publish a full scan.
func (s *Server) AutoPublish(ctx context.Context, name string) error {
	sv := s.export(name)
	if sv == nil {
		return fmt.Errorf("no export %q", name)
	}
	changes := sv.exp.Changes()
	if changes == nil {
		return fmt.Errorf("export %q is not watched (ExportConfig.Watch)", name)
	}
	ap := sv.exp.AutoPublish()
	if ap == nil {
		return fmt.Errorf("export %q publishes only when told (ExportConfig.AutoPublish)", name)
	}
	var first time.Time
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changes:
			if first.IsZero() {
				first = time.Now()
			}
			timer.Reset(max(min(ap.Quiet, time.Until(first.Add(ap.Max))), 0))
		case <-timer.C:
			if _, err := s.publishIfChanged(name); err != nil {
				s.log.Warn("auto-publish failed; retrying after the quiet period", "export", name, "error", err)
				timer.Reset(ap.Quiet)
				continue
			}
			first = time.Time{}
		}
	}
}
