// Package upgrade is how one run of the host agent leaves its state to
// the next, so that guests' open files keep their bytes across it.
//
// There are two ways. An upgrade in place (Exec) execs the agent's
// binary in the same process and hands it everything: the state
// directory's lock, the control socket, the guests' listening sockets,
// and per export its locked root, block store, kept generations and the
// files guests hold with their kernel leases (the sessions and leases
// themselves are in the lease journal). A restart, or a crash, hands
// over only what systemd's fd store kept (FDStore): the held files,
// whose leases the next run takes over from the journal.
//
// A new run takes both through one entry point, Take, which returns
// what it Inherited; the agent asks it for each thing it would otherwise
// open afresh, and Rest lets go of what it did not ask for.
//
// # The document
//
// What an upgrade hands over is a Document: a header naming its Format,
// then a gob, in a memfd named by Env; descriptors go by number, kept
// open across the exec. Every part of it is its owner's to make and
// take back: the store's (hostagent store.go), the generations'
// (generation.go), the keeper's (keep.go), the lease coordinator's
// (lease takeover.go). Format changes with the document's shape, which a
// test ties to it (testdata/shape.txt); a binary never reads a document
// of another form, and before an upgrade Check runs the new binary to
// see that it takes the form this one hands over. The descriptors kept
// open are listed in the environment too (FDsEnv): if the document
// cannot be read after all, the new run closes them — the state
// directory's and the exports' locks among them — and starts afresh.
//
// # Files
//
//   - document.go: Document, Format, Encode and Decode.
//   - exec.go: the predecessor's side: Check, then Exec (Server.Handover
//     stops every change to every export; on failure everything is given
//     back and the agent goes on).
//   - take.go: the successor's side: Take and Inherited.
//   - fdstore.go: systemd's fd store, the restart's half.
//
// The agent's part (cmd/leasefs upgrade.go) is deciding when: the
// control request or SIGUSR2, stopping its own auto-publishing first.
package upgrade
