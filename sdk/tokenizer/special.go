package tokenizer

import "sort"

// specialSet finds special-token text in input. At each position the longest
// special token that starts there wins (leftmost-longest).
type specialSet struct {
	first  [256]bool
	byByte [256][]specialTok
}

type specialTok struct {
	text    string
	id      int32
	control bool // split only with ParseSpecial (control/unknown); else always (user-defined)
}

func newSpecialSet(t *Tokenizer) *specialSet {
	s := &specialSet{}
	for i, ty := range t.types {
		txt := t.text[i]
		if txt == "" {
			continue
		}
		var control bool
		switch ty {
		case TypeControl, TypeUnknown:
			control = true
		case TypeUserDefined:
		default:
			continue
		}
		c := txt[0]
		s.first[c] = true
		s.byByte[c] = append(s.byByte[c], specialTok{text: txt, id: int32(i), control: control})
	}
	for c := range s.byByte {
		l := s.byByte[c]
		sort.SliceStable(l, func(i, j int) bool { return len(l[i].text) > len(l[j].text) })
	}
	return s
}

// split calls emit for each fragment of text in order: plain text with id -1
// or a special token with its id.
func (s *specialSet) split(text string, parse bool, emit func(frag string, id int32)) {
	start := 0
	for i := 0; i < len(text); i++ {
		c := text[i]
		if !s.first[c] {
			continue
		}
		for _, st := range s.byByte[c] {
			if st.control && !parse {
				continue
			}
			if len(text)-i >= len(st.text) && text[i:i+len(st.text)] == st.text {
				if i > start {
					emit(text[start:i], -1)
				}
				emit(st.text, st.id)
				start = i + len(st.text)
				i = start - 1
				break
			}
		}
	}
	if start < len(text) {
		emit(text[start:], -1)
	}
}
