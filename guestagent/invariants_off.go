//go:build !invariants

package guestagent

const checkInvariants = false
