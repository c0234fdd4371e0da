//go:build race

package tokenizer_test

// raceEnabled thins the golden corpus under the race detector (10x slower),
// keeping the package under a minute; the full corpus runs without -race.
const raceEnabled = true
