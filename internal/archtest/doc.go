// Package archtest holds a test that keeps the project's dependency
// rules (docs/architecture.md, "Packages"): each library knows nothing of
// the packages above it, and the two agents never reach into each other.
// It has no code of its own.
package archtest
