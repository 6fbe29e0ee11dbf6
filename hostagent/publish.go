package hostagent

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
)

// Publish publishes a generation of the named export and announces it to
// its guests. It does not wait for their acks.
func (s *Server) Publish(name string) (*Generation, error) { return s.PublishLabeled(name, "", false) }

// PublishLabeled is Publish with a label for the generation (an upstream
// revision; see Export.PublishLabeled).
func (s *Server) PublishLabeled(name, label string, force bool) (*Generation, error) {
	sv := s.export(name)
	if sv == nil {
		return nil, fmt.Errorf("no export %q", name)
	}
	return s.announce(sv, func() (*Generation, error) { return sv.exp.PublishLabeled(label, force) })
}

// publishIfChanged is Publish, unless nothing changed since the current
// generation (Export.PublishIfChanged): then it returns nil.
func (s *Server) publishIfChanged(name string) (*Generation, error) {
	sv := s.export(name)
	if sv == nil {
		return nil, fmt.Errorf("no export %q", name)
	}
	return s.announce(sv, sv.exp.PublishIfChanged)
}

// announce publishes sv's generation with publish and announces it.
func (s *Server) announce(sv *served, publish func() (*Generation, error)) (*Generation, error) {
	name := sv.exp.Name()
	gen, err := publish()
	if err != nil {
		s.m.failed.WithLabelValues(name).Inc()
		return nil, err
	}
	if gen == nil {
		return nil, nil
	}
	s.m.published.WithLabelValues(name).Inc()
	s.m.freeze.WithLabelValues(name).Observe(gen.Frozen.Seconds())
	ann := &vsockproto.Announce{Generation: gen.Number, Blocks: gen.Changed, Inodes: gen.ChangedInodes}
	if gen.All {
		ann = &vsockproto.Announce{Generation: gen.Number, Flags: vsockproto.AnnounceAll}
	}
	labeled := *ann
	labeled.Flags |= vsockproto.AnnounceLabel
	labeled.Label = gen.Label
	s.mu.Lock()
	var gs []*guest
	for g := range s.conns {
		if g.sv == sv {
			gs = append(gs, g)
		}
	}
	s.mu.Unlock()
	for _, g := range gs {
		a := ann
		if g.labels {
			a = &labeled
		}
		g.announceLater(&announce{a, gen.Captured}, s.opt.Conn.KeepAlive)
	}
	s.retain(sv)
	return gen, nil
}

// announce is an announcement to send, and when its generation was
// published.
type announce struct {
	msg       *vsockproto.Announce
	published time.Time
}

// announceLater sends a to g in the background, after the one in flight
// if there is one; one that waits is replaced by a newer (the guest sees
// the gap in the numbers, and takes it that everything changed).
func (g *guest) announceLater(a *announce, keepAlive time.Duration) {
	g.annMu.Lock()
	if g.annBusy {
		g.annNext = a
		g.annMu.Unlock()
		return
	}
	g.annBusy = true
	g.annMu.Unlock()
	go func() {
		for a != nil {
			g.announce(a.msg, a.published, keepAlive)
			g.annMu.Lock()
			a, g.annNext = g.annNext, nil
			g.annBusy = a != nil
			g.annMu.Unlock()
		}
	}()
}

// announce tells one guest of a generation and notes which it is on.
func (g *guest) announce(ann *vsockproto.Announce, published time.Time, keepAlive time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), max(keepAlive, 10*time.Second)*3)
	defer cancel()
	reply, err := g.conn.Call(ctx, ann)
	if errors.Is(err, vsockproto.ErrTooBig) {
		reply, err = g.conn.Call(ctx, &vsockproto.Announce{Generation: ann.Generation, Label: ann.Label,
			Flags: vsockproto.AnnounceAll | ann.Flags&vsockproto.AnnounceLabel})
	}
	if err != nil {
		return
	}
	g.sv.m.announceAck.WithLabelValues(g.sv.exp.Name()).Observe(since(published))
	on := reply.(*vsockproto.AnnounceAck).Generation
	if on > ann.Generation {
		return // a guest that lies about its generation keeps what it was on
	}
	g.sv.mu.Lock()
	defer g.sv.mu.Unlock()
	tok := g.sess.Token()
	if prev, ok := g.sv.on[tok]; ok && on < prev {
		// A guest never goes back; one that says so would pin old
		// generations. It stays where it was.
		return
	}
	g.sv.on[tok] = on
	// Retention runs at the next publish.
}

// retain decides which generations sv keeps, and drops the others. It
// keeps the current one and the ExportConfig.KeepGenerations before it;
// for the sessions that follow, every generation from the oldest one
// such a session is on (a guest that follows at intervals may move to
// any generation announced to it before it can say so), but none more
// than Limits.GenerationsBehind before the current one, whoever is on
// them: one guest cannot pin them all; and each generation a session
// pinned. The budget for the files kept for older generations comes
// first: the generations before its floor go, pinned or not, and the
// guests that pinned them are told (Unpin) and move on.
func (s *Server) retain(sv *served) {
	cur := sv.exp.Current().Number
	floor := uint64(0)
	if behind := uint64(s.opt.Limits.GenerationsBehind); cur > behind {
		floor = cur - behind
	}
	budget := min(sv.exp.keepFloor(), cur)
	if budget > floor {
		s.log.Warn("the files kept for older generations exceed their budget; dropping the oldest generations, whose guests move on",
			"export", sv.exp.Name(), "before", budget, "kept", sv.exp.KeptFiles())
		floor = budget
	}
	keep := map[uint64]bool{}
	for n := cur; n >= max(budget, 1) && cur-n < sv.exp.keepGenerations(); n-- {
		keep[n] = true
	}
	// Which sessions still exist is asked of the coordinator without
	// served.mu, a leaf (Server.Handover takes the coordinator's lock,
	// then served.mu). A session that appears meanwhile counts as alive.
	sv.mu.Lock()
	toks := slices.Collect(maps.Keys(sv.on))
	sv.mu.Unlock()
	gone := map[lease.Token]bool{}
	for _, tok := range toks {
		if !sv.coord.HasSession(tok) {
			gone[tok] = true
		}
	}
	unpinned := map[lease.Token]uint64{}
	oldest := cur // of the sessions that follow
	sv.mu.Lock()
	for tok, n := range sv.on {
		switch {
		case gone[tok]:
			delete(sv.on, tok)
			delete(sv.pins, tok)
			continue
		case sv.pins[tok] && n >= budget:
			keep[n] = true
			continue
		case sv.pins[tok]:
			unpinned[tok] = n
			delete(sv.pins, tok)
			sv.on[tok] = cur
			continue
		case n < floor:
			if s.warn.Allow() {
				s.log.Warn("a guest holds the export back too far; dropping the generation it is on", "export", sv.exp.Name(),
					"generation", n, "current", cur)
			}
			sv.on[tok] = floor
			n = floor
		}
		oldest = min(oldest, n)
	}
	sv.mu.Unlock()
	for n := oldest; n <= cur; n++ {
		keep[n] = true
	}
	if len(unpinned) > 0 {
		s.unpin(sv, unpinned)
	}
	sv.exp.dropUnless(func(n uint64) bool { return keep[n] })
}

// unpinWait bounds how long a publish waits for the guests it unpins.
const unpinWait = time.Second

// unpin tells the guests of the sessions in pinned that the generation
// each pinned is about to be dropped, and waits a moment for them.
func (s *Server) unpin(sv *served, pinned map[lease.Token]uint64) {
	why := "the host's budget for files kept for older generations is spent"
	for _, n := range slices.Sorted(maps.Values(pinned)) {
		s.log.Warn("dropping a pinned generation: "+why, "export", sv.exp.Name(), "generation", n)
	}
	s.mu.Lock()
	var gs []*guest
	for g := range s.conns {
		if _, ok := pinned[g.sess.Token()]; ok && g.sv == sv && g.conn.Features().Has(vsockproto.FeaturePin) {
			gs = append(gs, g)
		}
	}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, g := range gs {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), unpinWait)
			defer cancel()
			_, _ = g.conn.Call(ctx, &vsockproto.Unpin{Generation: pinned[g.sess.Token()], Why: why})
		})
	}
	wg.Wait()
}
