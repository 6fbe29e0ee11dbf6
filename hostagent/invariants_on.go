//go:build invariants

package hostagent

// checkInvariants: this build checks the store's references after each
// publish.
const checkInvariants = true
