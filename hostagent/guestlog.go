package hostagent

import (
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	lru "github.com/hashicorp/golang-lru/v2"
	"golang.org/x/time/rate"
)

// guestLog rate-limits the log lines each guest causes (connections,
// disconnections, refusals): a guest that churns sessions gets a burst of
// lines, then one now and then, and a summary of what was left out at
// most once a minute — not a line per event, which one guest could use to
// fill the host's disk. Guests are remembered in a bounded LRU: one
// forgotten starts with a fresh burst.
type guestLog struct {
	log hclog.Logger
	mu  sync.Mutex
	m   *lru.Cache[string, *guestLines] // guarded by mu
}

type guestLines struct {
	lim        *rate.Limiter
	suppressed int       // lines left out, not yet counted in a summary
	summarized time.Time // when the last summary went out
}

// The budget of log lines per guest.
const (
	guestLogBurst   = 20
	guestLogEvery   = 5 * time.Second
	guestLogSummary = time.Minute
	guestLogGuests  = 4096
)

func newGuestLog(log hclog.Logger) *guestLog {
	m, _ := lru.New[string, *guestLines](guestLogGuests)
	return &guestLog{log: log, m: m}
}

// Info logs msg about guest who at info level, if its budget allows.
func (l *guestLog) Info(who, msg string, args ...any) { l.emit(hclog.Info, who, msg, args) }

// Warn logs msg about guest who at warn level, if its budget allows.
func (l *guestLog) Warn(who, msg string, args ...any) { l.emit(hclog.Warn, who, msg, args) }

func (l *guestLog) emit(level hclog.Level, who, msg string, args []any) {
	l.mu.Lock()
	g, ok := l.m.Get(who)
	if !ok {
		g = &guestLines{lim: rate.NewLimiter(rate.Every(guestLogEvery), guestLogBurst)}
		l.m.Add(who, g)
	}
	allowed := g.lim.Allow()
	summary := 0 // lines left out, to say so now
	switch {
	case allowed:
		summary, g.suppressed = g.suppressed, 0
	case time.Since(g.summarized) >= guestLogSummary: // at the first, then once a minute
		g.suppressed++
		summary, g.suppressed, g.summarized = g.suppressed, 0, time.Now()
	default:
		g.suppressed++
	}
	l.mu.Unlock()
	switch {
	case allowed:
		if summary > 0 {
			args = append(args, "lines_left_out_before", summary)
		}
		l.log.Log(level, msg, append([]any{"guest", who}, args...)...)
	case summary > 0:
		l.log.Warn("a guest causes many log lines: most are left out (a count once a minute)", "guest", who, "left_out", summary, "last", msg)
	}
}
