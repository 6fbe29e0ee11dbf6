package lockrank

// The host agent's ranked locks, outermost first (hostagent/doc.go and
// lease/doc.go say why). A lock is taken only while holding locks of
// lower rank; the leaves share the highest, so that holding one, no
// other is taken.
const (
	rankPublish = 10 + iota*10
	rankCoordinator
	rankLeaf
)

type (
	// ExportPublish is hostagent.Export.pub: one publish at a time,
	// held by a handover until it is let go.
	ExportPublish struct{}
	// Coordinator is lease.Coordinator.mu; it calls the keeper with
	// it held.
	Coordinator struct{}

	ExportGenerations struct{} // hostagent.registry.mu: the kept generations
	Store             struct{} // hostagent.Store.mu
	Server            struct{} // hostagent.Server.mu: the connections
	Served            struct{} // the generation each session is on
	Quotas            struct{} // the per-guest budgets
	CtlGate           struct{} // the control requests being answered
	Keeper            struct{} // the files of kept generations
)

func (ExportPublish) Rank() (int, string)     { return rankPublish, "Export.pub" }
func (Coordinator) Rank() (int, string)       { return rankCoordinator, "Coordinator.mu" }
func (ExportGenerations) Rank() (int, string) { return rankLeaf, "registry.mu" }
func (Store) Rank() (int, string)             { return rankLeaf, "Store.mu" }
func (Server) Rank() (int, string)            { return rankLeaf, "Server.mu" }
func (Served) Rank() (int, string)            { return rankLeaf, "served.mu" }
func (Quotas) Rank() (int, string)            { return rankLeaf, "quotas.mu" }
func (CtlGate) Rank() (int, string)           { return rankLeaf, "ctlGate.mu" }
func (Keeper) Rank() (int, string)            { return rankLeaf, "keeper.mu" }
