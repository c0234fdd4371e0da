package tokenizer

import (
	"compress/gzip"
	"encoding/json"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/dlclark/regexp2/v2"
	"github.com/stretchr/testify/require"
)

func regexSplit(t *testing.T, re *regexp2.Regexp, s string) []string {
	var out []string
	m, err := re.FindStringMatch(s)
	require.NoError(t, err)
	for m != nil {
		out = append(out, m.String())
		m, err = re.FindNextMatch(m)
		require.NoError(t, err)
	}
	return out
}

func handSplit(k preKind, s string) []string {
	var out []string
	splitPre(k, s, func(p string) { out = append(out, p) })
	return out
}

// TestSplittersMatchRegexp checks the hand-written splitters against the
// patterns they implement, run by a backtracking engine (regexp2), on the
// golden corpus and random strings.
func TestSplittersMatchRegexp(t *testing.T) {
	f, err := os.Open("testdata/corpus.json.gz")
	require.NoError(t, err)
	defer f.Close()
	zr, err := gzip.NewReader(f)
	require.NoError(t, err)
	var texts []string
	require.NoError(t, json.NewDecoder(zr).Decode(&texts))
	rng := rand.New(rand.NewPCG(1, 2))
	alphabet := []rune("aZ09 \t\n\r'sStTrRlLdDvVmMeE.,!/\u00a0\u2003\u0301\u0308ǅʰ々中ภ\U0001F600\u200d١½ſ\ufeff")
	for i := 0; i < 3000; i++ {
		n := 1 + rng.IntN(24)
		var sb strings.Builder
		for j := 0; j < n; j++ {
			sb.WriteRune(alphabet[rng.IntN(len(alphabet))])
		}
		texts = append(texts, sb.String())
	}
	for k, pat := range prePatterns {
		re := regexp2.MustCompile(pat)
		bad := 0
		for _, s := range texts {
			if len(s) > 5000 {
				continue // regexp2 is slow on the long inputs; the goldens cover them
			}
			want := regexSplit(t, re, s)
			got := handSplit(k, s)
			if !assertEqualSplit(t, k, s, got, want) {
				bad++
				if bad > 5 {
					t.FailNow()
				}
			}
		}
	}
}

func assertEqualSplit(t *testing.T, k preKind, s string, got, want []string) bool {
	t.Helper()
	if len(got) == len(want) {
		same := true
		for i := range got {
			if got[i] != want[i] {
				same = false
				break
			}
		}
		if same {
			return true
		}
	}
	t.Errorf("splitter %d on %+q:\n got  %+q\n want %+q", k, s, got, want)
	return false
}

func FuzzSplitters(f *testing.F) {
	for _, s := range []string{"Hello world", "I'M fine\r\n\n  x", "ǅa\u0301B", "12345 ab/\n"} {
		f.Add(s)
	}
	res := map[preKind]*regexp2.Regexp{}
	for k, p := range prePatterns {
		res[k] = regexp2.MustCompile(p)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if !utf8ValidNoSurrogates(s) || len(s) > 200 {
			return
		}
		for k, re := range res {
			assertEqualSplit(t, k, s, handSplit(k, s), regexSplit(t, re, s))
		}
	})
}

func utf8ValidNoSurrogates(s string) bool {
	for _, r := range s {
		if r == 0xFFFD {
			return false
		}
	}
	return true
}
