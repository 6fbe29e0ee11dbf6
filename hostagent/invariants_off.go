//go:build !invariants

package hostagent

const checkInvariants = false
