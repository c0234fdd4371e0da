//go:build race

package cli

// raceEnabled is true when tests run with -race: the real-model bench test
// is skipped then (the CPU forward pass is ~20x slower under the detector).
const raceEnabled = true
