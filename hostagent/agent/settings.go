package agent

import (
	"fmt"
	"strings"
	"time"

	"github.com/leasefs/leasefs/hostagent"
	"github.com/leasefs/leasefs/vsockproto"
)

// Settings are what an agent serves and how. Exports and Listen change
// with Apply; every other field is fixed while the agent runs (Apply
// refuses a change to one with a *FixedError).
type Settings struct {
	Exports []Export
	Listen  []vsockproto.Addr

	StateDir string          // freeze records, lease journals, generation numbers; not on an export
	Control  vsockproto.Addr // the control socket (unix:PATH)
	FDStore  bool            // keep held files in systemd's fd store even if $FDSTORE does not say there is one

	AckTimeout, Grace   time.Duration // lease.Config's
	MaxLeasesPerGuest   int
	MaxSessionsPerGuest int
	Limits              hostagent.Limits

	AutoPublish   *hostagent.AutoPublish // nil: only when told
	FreezeBudget  time.Duration
	FullScanEvery int
	ExpediteRCU   bool
	Keep          Keep
}

// Export is one filesystem served: its device, mounted read-write at
// Mount.
type Export struct{ Name, Device, Mount string }

// Keep bounds what each export holds to keep its guests' generations
// whole (hostagent.ExportConfig's Keep fields).
type Keep struct {
	Files, Replaced int // Files < 0: the export's default
	ReplacedBytes   int64
	Generations     int
}

// A FixedError is a change to settings that are fixed while the agent
// runs, named by their fields in Settings ("Grace", "Limits").
type FixedError struct{ Fields []string }

func (e *FixedError) Error() string {
	return fmt.Sprintf("%s changed, which needs a restart", strings.Join(e.Fields, ", "))
}

// FixedChanges names the fixed settings that differ between a and b, by
// their fields.
func FixedChanges(a, b *Settings) []string {
	var out []string
	for _, f := range []struct {
		name string
		same bool
	}{
		{"StateDir", a.StateDir == b.StateDir},
		{"Control", a.Control == b.Control},
		{"FDStore", a.FDStore == b.FDStore},
		{"AckTimeout", a.AckTimeout == b.AckTimeout},
		{"Grace", a.Grace == b.Grace},
		{"MaxLeasesPerGuest", a.MaxLeasesPerGuest == b.MaxLeasesPerGuest},
		{"MaxSessionsPerGuest", a.MaxSessionsPerGuest == b.MaxSessionsPerGuest},
		{"Limits", a.Limits == b.Limits},
		{"AutoPublish", (a.AutoPublish == nil) == (b.AutoPublish == nil) && (a.AutoPublish == nil || *a.AutoPublish == *b.AutoPublish)},
		{"FreezeBudget", a.FreezeBudget == b.FreezeBudget},
		{"FullScanEvery", a.FullScanEvery == b.FullScanEvery},
		{"ExpediteRCU", a.ExpediteRCU == b.ExpediteRCU},
		{"Keep", a.Keep == b.Keep},
	} {
		if !f.same {
			out = append(out, f.name)
		}
	}
	return out
}
