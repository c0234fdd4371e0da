package server

import "strings"

// stopMatcher finds stop strings in streamed text without ever releasing
// text that is part of a stop string: text that could still turn into a stop
// string (a suffix equal to a stop string's prefix) is held back until the
// next piece decides it.
type stopMatcher struct {
	stops   []string
	pending string
	done    bool
	matched string
}

func newStopMatcher(stops []string) *stopMatcher {
	var s []string
	for _, x := range stops {
		if x != "" {
			s = append(s, x)
		}
	}
	return &stopMatcher{stops: s}
}

// push adds text and returns what may be released now. stopped reports that a
// stop string was found: the returned text is everything before it and the
// matcher accepts no more text.
func (m *stopMatcher) push(text string) (release string, stopped bool) {
	if m.done {
		return "", true
	}
	if len(m.stops) == 0 {
		return text, false
	}
	m.pending += text
	// Earliest stop string occurrence wins.
	cut, which := -1, ""
	for _, s := range m.stops {
		if i := strings.Index(m.pending, s); i >= 0 && (cut < 0 || i < cut) {
			cut, which = i, s
		}
	}
	if cut >= 0 {
		m.done, m.matched = true, which
		out := m.pending[:cut]
		m.pending = ""
		return out, true
	}
	hold := 0
	for _, s := range m.stops {
		// longest suffix of pending that is a proper prefix of s
		max := len(s) - 1
		if max > len(m.pending) {
			max = len(m.pending)
		}
		for k := max; k > hold; k-- {
			if strings.HasSuffix(m.pending, s[:k]) {
				hold = k
				break
			}
		}
	}
	out := m.pending[:len(m.pending)-hold]
	m.pending = m.pending[len(m.pending)-hold:]
	return out, false
}

// flush releases held-back text at the end of a generation.
func (m *stopMatcher) flush() string {
	out := m.pending
	m.pending = ""
	return out
}
