package hostagent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
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
			return nil, fmt.Errorf("--auto-publish %q: %q is not a positive duration", s, v)
		}
		switch k {
		case "quiet":
			ap.Quiet = d
		case "max":
			ap.Max = d
		default:
			return nil, fmt.Errorf("--auto-publish %q: want quiet=DURATION,max=DURATION or off", s)
		}
	}
	if ap.Max < ap.Quiet {
		return nil, fmt.Errorf("--auto-publish %q: max is shorter than quiet", s)
	}
	return ap, nil
}

// AutoPublish publishes export name when its tree changes, as ap says,
// until ctx ends. Every directory is watched, new ones as they appear;
// when events were lost it publishes at once (every publish scans all
// inode tables, so nothing is missed).
func (s *Server) AutoPublish(ctx context.Context, name string, ap *AutoPublish) error {
	sv := s.exports[name]
	if sv == nil {
		return fmt.Errorf("no export %q", name)
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return err
	}
	defer w.Close()
	watchTree := func(root string) {
		_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				if err := w.Add(p); err != nil {
					s.log.Warn("cannot watch a directory; relying on the next publish", "dir", p, "error", err)
				}
			}
			return nil
		})
	}
	watchTree(sv.exp.cfg.Mount)
	var first time.Time
	quiet := time.NewTimer(time.Hour)
	quiet.Stop()
	publish := func() {
		if _, err := s.Publish(name); err != nil {
			s.log.Warn("auto-publish failed; retrying after the next quiet period", "export", name, "error", err)
			quiet.Reset(ap.Quiet)
			return
		}
		first = time.Time{}
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return nil
			}
			if ev.Op&fsnotify.Create != 0 {
				watchTree(ev.Name) // a new directory (a file is ignored by the walk)
			}
			if first.IsZero() {
				first = time.Now()
			}
			wait := min(ap.Quiet, time.Until(first.Add(ap.Max)))
			quiet.Reset(max(wait, 0))
		case err, ok := <-w.Errors:
			if !ok {
				return nil
			}
			if errors.Is(err, fsnotify.ErrEventOverflow) {
				s.log.Warn("fsnotify lost events; publishing now", "export", name)
				publish()
			}
		case <-quiet.C:
			publish()
		}
	}
}
