//go:build invariants

package guestagent

// checkInvariants: this build checks the switcher's state after each
// change to it (invariants.go).
const checkInvariants = true
