//go:build invariants

package lease

// checkInvariants: this build checks the coordinator's invariants at
// every unlock.
const checkInvariants = true
