package hostagent

import (
	"context"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"
	"golang.org/x/time/rate"

	"github.com/leasefs/leasefs/internal/lockrank"
	"github.com/leasefs/leasefs/vsockproto"
)

// Limits bound what one guest, and all guests together, can make the host
// agent do and hold. A guest is who the transport says it is
// (vsockproto.Peer.Guest): a VM, or a user on a shared Unix socket; its
// limits hold across all its connections and sessions. Zero fields take
// the defaults.
type Limits struct {
	// BytesPerGuest bounds the reply bytes one guest has in flight —
	// read, queued or being written to it (8 MiB); Bytes, all guests'
	// (64 MiB). A request waits up to Wait for its bytes, then is
	// answered retry.
	BytesPerGuest, Bytes int64
	// RunningPerGuest bounds the requests of one guest being worked on
	// at once (4); Running, all guests' (32). Waiting ones queue, first
	// come first served, up to Wait.
	RunningPerGuest, Running int
	Wait                     time.Duration // 2 s
	// ConnsPerGuest bounds one guest's connections (8).
	ConnsPerGuest int
	// GenerationsBehind is how many generations a guest may hold the
	// export back by (16): older ones are dropped whoever is on them,
	// and a guest on one moves to the newest when it next reads.
	GenerationsBehind int
	// FailuresPerGuest is how many requests a second of one guest may
	// fail (bad leases, stale opens, refusals) before each more waits
	// its turn (1000, and as many at once): failing is cheap, but not
	// free, and an honest guest fails rarely.
	FailuresPerGuest int
}

func (l Limits) withDefaults() Limits {
	def := func(v *int64, d int64) {
		if *v <= 0 {
			*v = d
		}
	}
	defInt := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&l.BytesPerGuest, 8<<20)
	def(&l.Bytes, 64<<20)
	defInt(&l.RunningPerGuest, 4)
	defInt(&l.Running, 32)
	defInt(&l.ConnsPerGuest, 8)
	defInt(&l.FailuresPerGuest, 1000)
	defInt(&l.GenerationsBehind, 16)
	if l.Wait <= 0 {
		l.Wait = 2 * time.Second
	}
	return l
}

// Validate checks the limits (zero fields as their defaults) against
// each other.
func (l Limits) Validate() error {
	l = l.withDefaults()
	switch {
	case l.BytesPerGuest < vsockproto.MaxReply:
		return fmt.Errorf("the bytes in flight per guest (%d) must hold one reply of %d", l.BytesPerGuest, vsockproto.MaxReply)
	case l.Bytes < l.BytesPerGuest:
		return fmt.Errorf("the bytes in flight of all guests (%d) must hold one guest's (%d)", l.Bytes, l.BytesPerGuest)
	case l.Running < l.RunningPerGuest:
		return fmt.Errorf("the requests running for all guests (%d) must hold one guest's (%d)", l.Running, l.RunningPerGuest)
	}
	return nil
}

// quotas hold the budgets of what guests have in flight.
type quotas struct {
	lim            Limits
	bytes, running *semaphore.Weighted // all guests'
	m              *metrics

	mu     lockrank.Mutex[lockrank.Quotas]
	guests map[string]*guestQuota // by guest; guarded by mu
}

// guestQuota is one guest's budgets, while it has connections.
type guestQuota struct {
	name           string
	conns          int // guarded by quotas.mu
	bytes, running *semaphore.Weighted
	fails          *rate.Limiter // of failed requests
}

func newQuotas(lim Limits, m *metrics) *quotas {
	return &quotas{lim: lim, m: m, guests: map[string]*guestQuota{},
		bytes: semaphore.NewWeighted(lim.Bytes), running: semaphore.NewWeighted(int64(lim.Running))}
}

// connect counts a connection of guest, if it may have one more.
func (q *quotas) connect(guest string) (*guestQuota, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	gq := q.guests[guest]
	if gq == nil {
		gq = &guestQuota{name: guest, bytes: semaphore.NewWeighted(q.lim.BytesPerGuest), running: semaphore.NewWeighted(int64(q.lim.RunningPerGuest)),
			fails: rate.NewLimiter(rate.Limit(q.lim.FailuresPerGuest), q.lim.FailuresPerGuest)}
		q.guests[guest] = gq
	}
	if gq.conns >= q.lim.ConnsPerGuest {
		return nil, false
	}
	gq.conns++
	return gq, true
}

// disconnect ends a connection of gq's.
func (q *quotas) disconnect(gq *guestQuota) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if gq.conns--; gq.conns == 0 {
		delete(q.guests, gq.name)
	}
}

// run waits for a turn to work on one of gq's requests: its own, then
// one of all guests'. The turn ends with the function it returns.
func (q *quotas) run(ctx context.Context, gq *guestQuota, export string) (func(), error) {
	return q.take(ctx, gq.running, q.running, 1, export, "running")
}

// reserve waits for n bytes of reply for gq: its own, then all guests'.
func (q *quotas) reserve(ctx context.Context, gq *guestQuota, n int64, export string) (func(), error) {
	return q.take(ctx, gq.bytes, q.bytes, n, export, "bytes")
}

func (q *quotas) take(ctx context.Context, own, all *semaphore.Weighted, n int64, export, what string) (func(), error) {
	ctx, cancel := context.WithTimeout(ctx, q.lim.Wait)
	defer cancel()
	if err := own.Acquire(ctx, n); err != nil {
		q.m.quota.WithLabelValues(export, what+"_per_guest").Inc()
		return nil, vsockproto.Errorf(vsockproto.CodeRetry, "this guest's requests in flight hold its %s budget", what)
	}
	if err := all.Acquire(ctx, n); err != nil {
		own.Release(n)
		q.m.quota.WithLabelValues(export, what).Inc()
		return nil, vsockproto.Errorf(vsockproto.CodeRetry, "the host's %s budget is in use", what)
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			all.Release(n)
			own.Release(n)
		})
	}, nil
}
