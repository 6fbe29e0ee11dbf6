//go:build !invariants

package lease

const checkInvariants = false
