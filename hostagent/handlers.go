package hostagent

import (
	"context"
	"errors"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/leasefs/leasefs/ext4ro"
	"github.com/leasefs/leasefs/layout"
	"github.com/leasefs/leasefs/lease"
	"github.com/leasefs/leasefs/vsockproto"
)

// handle answers a guest's request. Everything a request asks for is
// checked before anything is allocated for it; the requests that do
// work (ReadMeta, Open, Read) take a turn from the guest's and then all
// guests' running budget, and the bytes of their reply from the byte
// budgets, held until the reply has been written.
func (g *guest) handle(ctx context.Context, req vsockproto.Message) (vsockproto.Message, error) {
	if !g.confirmed.Load() && g.confirmed.CompareAndSwap(false, true) {
		g.sess.Confirm(g.att)
	}
	reply, err := g.serve(ctx, req)
	if err != nil {
		// A failure costs the guest its turn too: past its rate, the
		// answer waits (and, its requests in flight all waiting, so
		// does the reading of its next ones).
		_ = g.quota.fails.Wait(ctx)
	}
	return reply, err
}

func (g *guest) serve(ctx context.Context, req vsockproto.Message) (vsockproto.Message, error) {
	switch m := req.(type) {
	case *vsockproto.ReadMeta:
		return g.readMeta(ctx, m)
	case *vsockproto.Open:
		return g.open(ctx, m)
	case *vsockproto.Read:
		return g.read(ctx, m)
	case *vsockproto.Release:
		if err := g.sess.Release(lease.ID(m.Lease)); err != nil {
			return nil, protoErr(err)
		}
		return &vsockproto.Released{}, nil
	case *vsockproto.ListGens:
		// Not g.conn: a request may come before serveConn sets it.
		if g.kept {
			return g.listGens(ctx)
		}
	case *vsockproto.ReadDigests:
		if g.digests {
			return g.readDigests(ctx, m)
		}
	}
	return nil, vsockproto.Errorf(vsockproto.CodeNotSupported, "%v is not served by the host", req.Type())
}

// listGens answers ListGens: the kept generations, the newest that fit
// in a reply, within the guest's budget like any reply.
func (g *guest) listGens(ctx context.Context) (vsockproto.Message, error) {
	list := g.sv.exp.KeptList()
	size, first := uint64(4), len(list)
	for first > 0 && len(list)-first < vsockproto.MaxGenerations {
		n := uint64(8 + 8 + 2 + len(list[first-1].Label))
		if size+n > g.maxReply() {
			break
		}
		size, first = size+n, first-1
	}
	release, done, err := g.budget(ctx, int64(size))
	if err != nil {
		return nil, err
	}
	defer done()
	return vsockproto.WithRelease(&vsockproto.Generations{List: list[first:]}, release), nil
}

// maxReply is the most bytes one reply to this guest may carry.
func (g *guest) maxReply() uint64 { return uint64(min(vsockproto.MaxReply, g.max)) }

// budget waits for n bytes of reply from the budgets, then for a turn to
// work (the bytes first: a request waiting for them holds no turn).
// release gives the bytes back, once the reply is sent; done ends the
// turn.
func (g *guest) budget(ctx context.Context, n int64) (release, done func(), err error) {
	if release, err = g.s.quotas.reserve(ctx, g.quota, n, g.sv.exp.Name()); err != nil {
		return nil, nil, err
	}
	if done, err = g.s.quotas.run(ctx, g.quota, g.sv.exp.Name()); err != nil {
		release()
		return nil, nil, err
	}
	return release, done, nil
}

// generation returns kept generation n, referenced until released.
func (g *guest) generation(n uint64) (*Generation, error) {
	gen := g.sv.exp.Generation(n)
	if gen == nil {
		return nil, vsockproto.Errorf(vsockproto.CodeGone, "generation %d is not kept", n)
	}
	return gen, nil
}

func (g *guest) readMeta(ctx context.Context, m *vsockproto.ReadMeta) (vsockproto.Message, error) {
	count := uint64(0)
	for _, r := range m.Blocks {
		count += uint64(r.Count)
	}
	if count > vsockproto.MaxMetaBlocks {
		return nil, vsockproto.Errorf(vsockproto.CodeInvalid, "%d blocks in one request; the most is %d", count, vsockproto.MaxMetaBlocks)
	}
	rs := slices.Clone(m.Blocks)
	slices.SortFunc(rs, func(a, b vsockproto.BlockRange) int { return cmpU64(a.Start, b.Start) })
	for i := 1; i < len(rs); i++ {
		if rs[i].Start < rs[i-1].Start+uint64(rs[i-1].Count) {
			return nil, vsockproto.Errorf(vsockproto.CodeInvalid, "block %d is asked for twice", rs[i].Start)
		}
	}
	gen, err := g.generation(m.Generation)
	if err != nil {
		return nil, err
	}
	defer gen.Release()
	total := count * uint64(gen.BlockSize)
	if total > g.maxReply() {
		return nil, vsockproto.Errorf(vsockproto.CodeTooBig, "%d bytes of blocks exceed the reply limit of %d", total, g.maxReply())
	}
	for _, r := range m.Blocks {
		for b := r.Start; b < r.Start+uint64(r.Count); b++ {
			if !gen.Has(b) {
				return nil, vsockproto.Errorf(vsockproto.CodeInvalid, "block %d is not metadata of generation %d", b, m.Generation)
			}
		}
	}
	release, done, err := g.budget(ctx, int64(total))
	if err != nil {
		return nil, err
	}
	defer done()
	out := make([]byte, 0, total)
	for _, r := range m.Blocks {
		for b := r.Start; b < r.Start+uint64(r.Count); b++ {
			data, err := gen.ReadBlock(b, 1)
			if err != nil {
				release()
				return nil, vsockproto.Errorf(vsockproto.CodeInternal, "%v", err)
			}
			out = append(out, data...)
		}
	}
	g.sv.m.served.WithLabelValues(g.sv.exp.Name(), "meta").Add(float64(len(out)))
	return vsockproto.WithRelease(&vsockproto.Meta{Data: out}, release), nil
}

// readDigests answers which of the blocks asked for are metadata of the
// generation, and their SHA-256: what a guest checks the shared device's
// copy of them against. It reads nothing but the generation's index.
func (g *guest) readDigests(ctx context.Context, m *vsockproto.ReadDigests) (vsockproto.Message, error) {
	gen, err := g.generation(m.Generation)
	if err != nil {
		return nil, err
	}
	defer gen.Release()
	// Counted first, filled after: the reply's bytes come from the
	// budgets before they are allocated.
	present := make([]byte, (m.Count+7)/8)
	var n int
	for i := range uint64(m.Count) {
		if gen.Has(m.First + i) {
			present[i/8] |= 1 << (i % 8)
			n++
		}
	}
	size := 4 + len(present) + n*vsockproto.DigestSize
	if uint64(size) > g.maxReply() {
		return nil, vsockproto.Errorf(vsockproto.CodeTooBig, "the digests of %d blocks exceed the reply limit of %d", n, g.maxReply())
	}
	release, done, err := g.budget(ctx, int64(size))
	if err != nil {
		return nil, err
	}
	defer done()
	sums := make([]byte, 0, n*vsockproto.DigestSize)
	for i := range uint64(m.Count) {
		if present[i/8]&(1<<(i%8)) != 0 {
			h, _ := gen.Digest(m.First + i)
			sums = append(sums, h[:]...)
		}
	}
	g.sv.m.served.WithLabelValues(g.sv.exp.Name(), "digests").Add(float64(size))
	return vsockproto.WithRelease(&vsockproto.Digests{Present: present, Sums: sums}, release), nil
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// open checks the guest's description of the inode against the host's own
// copy of the generation, and leases the inode as that generation has it.
func (g *guest) open(ctx context.Context, m *vsockproto.Open) (vsockproto.Message, error) {
	gen, err := g.generation(m.Generation)
	if err != nil {
		return nil, err
	}
	defer gen.Release()
	view, err := gen.FS()
	if err != nil {
		return nil, vsockproto.Errorf(vsockproto.CodeInternal, "generation %d: %v", gen.Number, err)
	}
	if sb := view.Superblock(); m.Inode < sb.FirstIno && m.Inode != ext4ro.RootIno {
		// Reserved inodes (the journal, resize, quota) are no file of
		// the tree's, whatever ext4ro or the kernel would say.
		return nil, vsockproto.Errorf(vsockproto.CodeNotFound, "inode %d is reserved", m.Inode)
	}
	done, err := g.s.quotas.run(ctx, g.quota, g.sv.exp.Name())
	if err != nil {
		return nil, err
	}
	defer done()
	in, err := view.Inode(m.Inode)
	switch {
	case errors.Is(err, ext4ro.ErrNotExist), errors.Is(err, ext4ro.ErrInvalid):
		return nil, vsockproto.Errorf(vsockproto.CodeNotFound, "inode %d is not in use in generation %d", m.Inode, m.Generation)
	case err != nil:
		return nil, vsockproto.Errorf(vsockproto.CodeInternal, "inode %d: %v", m.Inode, err)
	case !in.IsRegular():
		return nil, vsockproto.Errorf(vsockproto.CodeNotRegular, "inode %d", m.Inode)
	case in.Generation != m.IGen || in.Size != m.Size || in.Ctime.Sec != m.Ctime.Sec || in.Ctime.Nsec != m.Ctime.Nsec:
		return nil, vsockproto.Errorf(vsockproto.CodeInvalid, "inode %d is not like that in generation %d", m.Inode, m.Generation)
	}
	hash, err := LayoutHash(view, in)
	if err != nil {
		return nil, vsockproto.Errorf(vsockproto.CodeInternal, "inode %d: %v", m.Inode, err)
	}
	if m.Layout != 0 && m.Layout != hash {
		return nil, vsockproto.Errorf(vsockproto.CodeInvalid, "inode %d's layout is not that of generation %d", m.Inode, m.Generation)
	}
	id, err := g.sess.Acquire(lease.Request{Ino: m.Inode, IGen: in.Generation, Size: in.Size,
		Ctime: unix.Timespec{Sec: in.Ctime.Sec, Nsec: int64(in.Ctime.Nsec)}, Layout: hash, Generation: m.Generation,
		Links: in.Nlink, Mtime: unix.Timespec{Sec: in.Mtime.Sec, Nsec: int64(in.Mtime.Nsec)}})
	if err != nil {
		if errors.Is(err, lease.ErrQuota) {
			g.sv.m.quota.WithLabelValues(g.sv.exp.Name(), "leases").Inc()
		}
		return nil, protoErr(err)
	}
	return &vsockproto.Leased{Lease: uint64(id)}, nil
}

// read reads through a lease: the lease is checked before anything is
// allocated, and nothing past the file's end is.
func (g *guest) read(ctx context.Context, m *vsockproto.Read) (vsockproto.Message, error) {
	if uint64(m.Length) > g.maxReply() {
		return nil, vsockproto.Errorf(vsockproto.CodeInvalid, "a read of %d bytes exceeds the reply limit of %d", m.Length, g.maxReply())
	}
	size, err := g.sess.Size(lease.ID(m.Lease))
	if err != nil {
		return nil, protoErr(err)
	}
	if m.Offset >= uint64(size) || m.Length == 0 {
		return &vsockproto.Data{}, nil // past the end
	}
	n := min(uint64(m.Length), uint64(size)-m.Offset)
	release, done, err := g.budget(ctx, int64(n))
	if err != nil {
		return nil, err
	}
	defer done()
	p := make([]byte, n)
	got, err := g.sess.ReadAt(lease.ID(m.Lease), p, int64(m.Offset))
	if err != nil {
		release()
		return nil, protoErr(err)
	}
	g.sv.m.served.WithLabelValues(g.sv.exp.Name(), "data").Add(float64(got))
	return vsockproto.WithRelease(&vsockproto.Data{Data: p[:got]}, release), nil
}

// LayoutHash is the protocol's layout hash of in's blocks.
func LayoutHash(f *ext4ro.FS, in *ext4ro.Inode) (uint64, error) {
	m, err := f.Map(in)
	if err != nil {
		return 0, err
	}
	return layout.Hash(m), nil
}

// protoErr maps a lease error to its protocol error: the one place the
// host turns errors into codes.
func protoErr(err error) error {
	code := vsockproto.CodeInternal
	for _, lc := range leaseCodes {
		if errors.Is(err, lc.err) {
			code = lc.code
			break
		}
	}
	return &vsockproto.Error{Code: code, Message: err.Error()}
}

var leaseCodes = []struct {
	err  error
	code vsockproto.Code
}{
	{lease.ErrStale, vsockproto.CodeStale},
	{lease.ErrBusy, vsockproto.CodeBusy},
	{lease.ErrNotFound, vsockproto.CodeNotFound},
	{lease.ErrNotRegular, vsockproto.CodeNotRegular},
	{lease.ErrQuota, vsockproto.CodeQuota},
	{lease.ErrUnknown, vsockproto.CodeBadLease},
	{lease.ErrRevoked, vsockproto.CodeRevoked},
	{lease.ErrClosed, vsockproto.CodeGone},
	{lease.ErrExhausted, vsockproto.CodeRetry},
}
