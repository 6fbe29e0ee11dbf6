// Package agent is the running host agent as a library: New takes its
// Settings and starts serving them, Apply changes its exports and guest
// addresses (a reload), Upgrade execs a new binary in place, Run serves
// the control socket until the context ends, Close stops it. The command
// (cmd/leasefs) keeps what is a command's: flags and the settings file
// turned into Settings, signals, systemd's notifications and the
// metrics listener.
//
// # Files
//
//   - settings.go: Settings, and which of them are fixed while the agent
//     runs (FixedChanges, compared field by field).
//   - agent.go: New, Run and Close; guest listeners, those added through
//     the control socket kept in the state directory; watching each
//     export's mount.
//   - apply.go: Apply and Reload: everything new is taken first, and if
//     anything fails nothing changes.
//   - upgrade.go: Upgrade, through package upgrade.
//
// # Locking
//
// Agent.mu makes changes one at a time (Apply, the listeners, a lost
// export, the upgrade's exec) and guards the exports and listeners. It
// is taken before any lock of package hostagent (a publish, a removal
// and the handover run under it) and never while one is held: the
// server calls the agent (Listeners, Reload, Upgrade) from control
// requests, holding nothing.
package agent
