//go:build race

package main

// raceEnabled: the tests run under the race detector, so the mount server
// they start is built with it too.
const raceEnabled = true
