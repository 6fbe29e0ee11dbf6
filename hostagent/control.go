package hostagent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/leasefs/leasefs/internal/ctlsock"
	"github.com/leasefs/leasefs/vsockproto"
)

// The control socket speaks one JSON request and one JSON reply per
// connection: {"op":"publish","export":NAME}, {"op":"status"} or
// {"op":"metrics"} (the Prometheus text format, as a string),
// {"op":"listen"}, {"op":"reload"} and {"op":"upgrade"}. Only
// root and the agent's own user may use it.

// ControlRequest is a request on the control socket.
type ControlRequest struct {
	Op     string `json:"op"`
	Export string `json:"export,omitempty"`
	Leases bool   `json:"leases,omitempty"` // status: list every lease
	Label  string `json:"label,omitempty"`  // publish: the generation's label
	Force  bool   `json:"force,omitempty"`  // publish: even a label that goes backwards
	Add    string `json:"add,omitempty"`    // listen: an address to serve guests on
	Remove string `json:"remove,omitempty"` // listen: an address to stop serving
	Dry    bool   `json:"dry,omitempty"`    // reload: only say what would change
	Config string `json:"config,omitempty"` // reload (dry): this settings file instead of the agent's own
}

// Published is the reply to publish.
type Published struct {
	Export        string  `json:"export"`
	Generation    uint64  `json:"generation"`
	Label         string  `json:"label,omitempty"`
	FreezeMS      float64 `json:"freeze_ms"`
	ChangedInodes int     `json:"changed_inodes"`
	ChangedRanges int     `json:"changed_ranges"`
	FullScan      bool    `json:"full_scan"`
	// The publish's steps, in ms (see Phases).
	SyncMS       float64 `json:"sync_ms"`
	PrecaptureMS float64 `json:"precapture_ms"`
	FIFreezeMS   float64 `json:"fifreeze_ms"`
	ResolveMS    float64 `json:"resolve_ms"`
	ScanMS       float64 `json:"scan_ms"`
	FIThawMS     float64 `json:"fithaw_ms"`
	MergeMS      float64 `json:"merge_ms"`
}

// published describes generation g of export name.
func published(name string, g *Generation) *Published {
	ph := g.Phases
	return &Published{Export: name, Generation: g.Number, Label: g.Label, FreezeMS: ms(g.Frozen),
		ChangedInodes: len(g.ChangedInodes), ChangedRanges: len(g.Changed), FullScan: g.Full,
		SyncMS: ms(ph.Sync), PrecaptureMS: ms(ph.Pre), FIFreezeMS: ms(ph.Freeze), ResolveMS: ms(ph.Resolve),
		ScanMS: ms(ph.Scan), FIThawMS: ms(ph.Thaw), MergeMS: ms(ph.Merge)}
}

// Status is the reply to status.
type Status struct {
	Version string         `json:"version,omitempty"`
	Started time.Time      `json:"started"` // when this run of the agent began (an upgrade begins another)
	Exports []ExportStatus `json:"exports"`
	Lost    []LostExport   `json:"lost,omitempty"`
}

// Summary says in one line what the host agent serves: each export's
// generation and guests, and what was lost (systemd's STATUS=).
func (st *Status) Summary() string {
	var parts []string
	for _, e := range st.Exports {
		guests := len(e.Guests)
		s := fmt.Sprintf("%s generation %d, %d guests, %d files held", e.Name, e.Generation, guests, e.Files)
		if e.Label != "" {
			s = fmt.Sprintf("%s generation %d (%s), %d guests, %d files held", e.Name, e.Generation, e.Label, guests, e.Files)
		}
		parts = append(parts, s)
	}
	for _, l := range st.Lost {
		parts = append(parts, fmt.Sprintf("%s LOST: %s", l.Name, l.Reason))
	}
	if len(parts) == 0 {
		return "serving no exports"
	}
	return "serving " + strings.Join(parts, "; ")
}

// LostExport is an export no longer served because its filesystem went
// away (Server.LoseExport).
type LostExport struct {
	Name   string    `json:"name"`
	Mount  string    `json:"mount"`
	Since  time.Time `json:"since"`
	Reason string    `json:"reason"`
}

// ExportStatus describes one export.
type ExportStatus struct {
	Name         string    `json:"name"`
	Mount        string    `json:"mount"`
	Generation   uint64    `json:"generation"`
	Label        string    `json:"label,omitempty"` // the current generation's
	Published    time.Time `json:"published"`
	LastFreezeMS float64   `json:"last_freeze_ms"`
	Blocks       int       `json:"metadata_blocks"`
	Kept         int       `json:"kept_generations"`
	KeptList     []KeptGen `json:"kept,omitempty"` // which, oldest first
	// The files held so that kept generations stay whole (Export.KeptFiles).
	KeptFiles     int           `json:"kept_files"`
	KeptReplaced  int           `json:"kept_replaced_files"` // of those, replaced or deleted since: kept for older generations only
	KeptBytes     int64         `json:"kept_replaced_bytes"` // their size, the space they keep using
	KeptLimitFull bool          `json:"kept_files_limit_reached,omitempty"`
	StoreBytes    int64         `json:"store_bytes"`
	Guests        []GuestStatus `json:"guests"`
	Leases        int           `json:"leases"`
	Files         int           `json:"files_held"`
	PendingBreaks int           `json:"pending_breaks"`
	Breaks        uint64        `json:"breaks"`
	Revoked       uint64        `json:"revoked"`
	Rescans       uint64        `json:"signal_rescans"`
	// LeaseList is every lease, when asked for (status --leases).
	LeaseList []LeaseStatus `json:"lease_list,omitempty"`
}

// LeaseStatus is one guest's lease on one file.
type LeaseStatus struct {
	Guest      string    `json:"guest"`
	Path       string    `json:"path"` // as the kernel names the held file now; "" if unknown
	Inode      uint32    `json:"inode"`
	Generation uint64    `json:"generation"` // the guest's generation when it opened the file
	Since      time.Time `json:"since"`
	// BreakSince is when the break this lease's acknowledgement is
	// awaited for began; absent when none is pending.
	BreakSince *time.Time `json:"break_since,omitempty"`
}

// GuestStatus describes one connected guest.
type GuestStatus struct {
	Peer       string `json:"peer"`
	Generation uint64 `json:"generation"`
	Pinned     bool   `json:"pinned,omitempty"` // it stays on Generation (leasefs guest --generation, --label)
	Leases     int    `json:"leases"`
}

// KeptGen is a generation an export keeps.
type KeptGen struct {
	Number    uint64    `json:"number"`
	Label     string    `json:"label,omitempty"`
	Published time.Time `json:"published"`
	Pinned    int       `json:"pinned_by,omitempty"` // guests pinned to it
}

type controlReply struct {
	Error     string     `json:"error,omitempty"`
	Published *Published `json:"published,omitempty"`
	Status    *Status    `json:"status,omitempty"`
	Metrics   string     `json:"metrics,omitempty"`
	Listen    []string   `json:"listen,omitempty"`
	Reload    []string   `json:"reload,omitempty"`
}

// Status reports the exports and their guests.
func (s *Server) Status() *Status { return s.status(false, "") }

// status is Status, with every lease of export (all if "") when leases.
func (s *Server) status(leases bool, export string) *Status {
	st := &Status{Version: s.opt.Version, Started: s.started}
	s.mu.Lock()
	byExport := map[*served][]*guest{}
	for g := range s.conns {
		byExport[g.sv] = append(byExport[g.sv], g)
	}
	for _, l := range s.lost {
		st.Lost = append(st.Lost, l)
	}
	s.mu.Unlock()
	sort.Slice(st.Lost, func(i, j int) bool { return st.Lost[i].Name < st.Lost[j].Name })
	for name, sv := range s.all() {
		es := ExportStatus{Name: name, Mount: sv.exp.Mount()}
		if g := sv.exp.Current(); g != nil {
			es.Generation, es.Published, es.LastFreezeMS, es.Blocks = g.Number, g.Captured, ms(g.Frozen), g.Blocks()
			es.Label = g.Label
		}
		_, es.StoreBytes = sv.exp.Store().Size()
		es.Kept = sv.exp.Kept()
		ks := sv.exp.KeptFiles()
		es.KeptFiles, es.KeptReplaced, es.KeptBytes, es.KeptLimitFull = ks.Files, ks.Gone, ks.Bytes, ks.Full
		ls := sv.coord.Stats()
		es.Leases, es.Files, es.PendingBreaks = ls.Leases, ls.Files, ls.Breaking
		es.Breaks, es.Revoked, es.Rescans = ls.Breaks+ls.Modified, ls.Revoked, ls.Rescans
		pins := map[uint64]int{}
		for _, g := range byExport[sv] {
			sv.mu.Lock()
			tok := g.sess.Token()
			on, pinned := sv.on[tok], sv.pins[tok]
			sv.mu.Unlock()
			if pinned {
				pins[on]++
			}
			es.Guests = append(es.Guests, GuestStatus{Peer: g.peer.String(), Generation: on, Pinned: pinned, Leases: g.sess.Leases()})
		}
		for _, k := range sv.exp.KeptList() {
			es.KeptList = append(es.KeptList, KeptGen{Number: k.Number, Label: k.Label, Published: k.Published, Pinned: pins[k.Number]})
		}
		sort.Slice(es.Guests, func(i, j int) bool { return es.Guests[i].Peer < es.Guests[j].Peer })
		if leases && (export == "" || export == name) {
			for _, l := range sv.coord.Leases() {
				ls := LeaseStatus{Guest: l.Guest, Path: l.Path, Inode: l.Inode, Generation: l.Generation, Since: l.Since}
				if !l.BreakSince.IsZero() {
					ls.BreakSince = &l.BreakSince
				}
				es.LeaseList = append(es.LeaseList, ls)
			}
		}
		st.Exports = append(st.Exports, es)
	}
	sort.Slice(st.Exports, func(i, j int) bool { return st.Exports[i].Name < st.Exports[j].Name })
	return st
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// ServeControl answers control requests on l until ctx ends.
func (s *Server) ServeControl(ctx context.Context, l *vsockproto.Listener) error {
	s.gate.serve(l)
	return s.acceptLoop(ctx, l, true, func(nc net.Conn, peer vsockproto.Peer) {
		if peer.UID != 0 && int(peer.UID) != os.Geteuid() {
			s.log.Warn("control connection from an unauthorised user", "peer", peer.String())
			nc.Close()
			return
		}
		s.gate.enter()
		go s.control(nc)
	})
}

// control answers one control connection, counted by the gate.
func (s *Server) control(nc net.Conn) {
	var req ControlRequest
	var after func()
	defer func() {
		s.gate.leave() // before after: an upgrade waits for the others
		if after != nil {
			after()
		}
	}()
	ctlsock.Answer(nc, time.Minute, &req, func(bad error) any {
		var reply controlReply
		if bad != nil {
			reply.Error = bad.Error()
			return reply
		}
		switch req.Op {
		case "publish":
			g, err := s.PublishLabeled(req.Export, req.Label, req.Force)
			if err != nil {
				reply.Error = err.Error()
			} else {
				reply.Published = published(req.Export, g)
			}
		case "status":
			if req.Export != "" && s.export(req.Export) == nil {
				reply.Error = fmt.Sprintf("no export %q", req.Export)
				break
			}
			reply.Status = s.status(req.Leases, req.Export)
		case "listen":
			l := s.opt.Listeners
			var err error
			switch {
			case l == nil:
				err = errors.New("this agent's listen addresses are fixed")
			case req.Add != "" && req.Remove != "":
				err = errors.New("add or remove, not both")
			case req.Add != "":
				err = l.AddListener(req.Add)
			case req.Remove != "":
				err = l.RemoveListener(req.Remove)
			}
			if err != nil {
				reply.Error = err.Error()
			} else if l != nil {
				reply.Listen = l.ListenAddrs()
			}
		case "reload":
			var err error
			if s.opt.Reload == nil {
				err = errors.New("this agent's settings are fixed")
			} else {
				reply.Reload, err = s.opt.Reload(req.Dry, req.Config)
			}
			if err != nil {
				reply.Error = err.Error()
			}
		case "upgrade":
			var err error
			if s.opt.Upgrade == nil {
				err = errors.New("this agent cannot be upgraded in place")
			} else {
				after, err = s.opt.Upgrade() // once the answer is out
			}
			if err != nil {
				reply.Error = err.Error()
			}
		case "metrics":
			var b strings.Builder
			if err := s.WriteMetrics(&b); err != nil {
				reply.Error = err.Error()
			}
			reply.Metrics = b.String()
		default:
			reply.Error = fmt.Sprintf("unknown op %q", req.Op)
		}
		return reply
	})
}

// ControlMetrics fetches the metrics from the control socket at addr, in
// the Prometheus text format.
func ControlMetrics(ctx context.Context, addr vsockproto.Addr) (string, error) {
	reply, err := control(ctx, addr, ControlRequest{Op: "metrics"})
	if err != nil {
		return "", err
	}
	return reply.Metrics, nil
}

// Control sends one request to the control socket at addr.
func Control(ctx context.Context, addr vsockproto.Addr, req ControlRequest) (*Published, *Status, error) {
	reply, err := control(ctx, addr, req)
	if err != nil {
		return nil, nil, err
	}
	return reply.Published, reply.Status, nil
}

// ControlReload asks the agent at addr to read its settings again and
// apply them, and returns what changed, or the error that refused them.
// With dry it changes nothing and says what would change; config, if
// not "", is the file to read instead of the agent's own (dry only).
func ControlReload(ctx context.Context, addr vsockproto.Addr, dry bool, config string) ([]string, error) {
	reply, err := control(ctx, addr, ControlRequest{Op: "reload", Dry: dry, Config: config})
	if err != nil {
		return nil, err
	}
	return reply.Reload, nil
}

// ControlListen asks the agent at addr to add or remove a guest listen
// address (one of add, remove, or neither to only list them) and returns
// the addresses it then serves.
func ControlListen(ctx context.Context, addr vsockproto.Addr, add, remove string) ([]string, error) {
	reply, err := control(ctx, addr, ControlRequest{Op: "listen", Add: add, Remove: remove})
	if err != nil {
		return nil, err
	}
	return reply.Listen, nil
}

// A ControlError is a control socket that did not answer.
type ControlError struct {
	Addr vsockproto.Addr
	Err  error
}

func (e *ControlError) Error() string {
	return fmt.Sprintf("the host agent's control socket %s: %v", e.Addr, e.Err)
}
func (e *ControlError) Unwrap() error { return e.Err }

func control(ctx context.Context, addr vsockproto.Addr, req ControlRequest) (*controlReply, error) {
	var reply controlReply
	if err := ctlsock.Call(ctx, addr, req, &reply, 16<<20); err != nil {
		return nil, &ControlError{addr, err}
	}
	if reply.Error != "" {
		return nil, errors.New(reply.Error)
	}
	return &reply, nil
}
