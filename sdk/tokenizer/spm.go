package tokenizer

import (
	"fmt"
	"strings"
	"unicode/utf8"
)

// spmModel is SentencePiece BPE as llama.cpp runs it: spaces become U+2581,
// a space is prepended (add_space_prefix), characters are merged pairwise,
// highest-scoring resulting token first (leftmost on ties), and characters
// without a token fall back to <0xXX> byte tokens.
type spmModel struct {
	t      *Tokenizer
	byteID [256]int32
	unk    int32
}

const spmSpace = "\u2581"

func newSPM(t *Tokenizer) (*spmModel, error) {
	m := &spmModel{t: t, unk: t.v.UNK}
	if t.v.Scores == nil {
		return nil, fmt.Errorf("%w: SentencePiece vocabulary without scores", ErrInvalidVocab)
	}
	for i := range m.byteID {
		m.byteID[i] = -1
	}
	t.bytes = make([][]byte, len(t.text))
	for i, s := range t.text {
		switch t.types[i] {
		case TypeByte:
			var b byte
			if _, err := fmt.Sscanf(s, "<0x%02X>", &b); err != nil || len(s) != 6 {
				return nil, fmt.Errorf("%w: byte token %d %q is not <0xXX>", ErrInvalidVocab, i, s)
			}
			t.bytes[i] = []byte{b}
			m.byteID[b] = int32(i)
		case TypeNormal, TypeUserDefined, TypeUndefined:
			t.bytes[i] = []byte(strings.ReplaceAll(s, spmSpace, " "))
		default:
			t.bytes[i] = []byte(s)
		}
	}
	return m, nil
}

// mergeable reports whether merges may produce id: SentencePiece never
// produces control or unknown tokens from text.
func (m *spmModel) mergeable(id int32) bool {
	switch m.t.types[id] {
	case TypeNormal, TypeUserDefined, TypeUndefined:
		return true
	}
	return false
}

type spmSym struct {
	start, end int // byte range in the escaped text
	prev, next int
}

type spmBigram struct {
	left, right int
	score       float32
	size        int
}

// encode appends the ids of a plain-text fragment. addPrefix is true at the
// start of the text and after a special token (llama.cpp's rule).
func (m *spmModel) encode(out []int32, frag string, addPrefix bool) []int32 {
	var sb strings.Builder
	sb.Grow(len(frag) + 3)
	if addPrefix && m.t.v.AddSpacePrefix {
		sb.WriteString(spmSpace)
	}
	for _, r := range frag {
		if r == ' ' {
			sb.WriteString(spmSpace)
		} else {
			sb.WriteRune(r)
		}
	}
	text := sb.String()
	if text == "" {
		return out
	}
	// Symbols: one per UTF-8 character. Invalid bytes became U+FFFD above.
	syms := make([]spmSym, 0, len(text))
	for i := 0; i < len(text); {
		_, w := utf8.DecodeRuneInString(text[i:])
		syms = append(syms, spmSym{start: i, end: i + w, prev: len(syms) - 1, next: len(syms) + 1})
		i += w
	}
	syms[len(syms)-1].next = -1
	h := &bigramHeap{}
	try := func(l, r int) {
		if l < 0 || r < 0 {
			return
		}
		s := text[syms[l].start:syms[r].end]
		id, ok := m.t.index[s]
		if !ok || !m.mergeable(id) {
			return
		}
		h.push(spmBigram{left: l, right: r, score: m.t.v.Scores[id], size: len(s)})
	}
	for i := 1; i < len(syms); i++ {
		try(i-1, i)
	}
	for h.len() > 0 {
		bg := h.pop()
		l, r := &syms[bg.left], &syms[bg.right]
		if l.end == l.start || r.end == r.start || (l.end-l.start)+(r.end-r.start) != bg.size || l.next != bg.right {
			continue
		}
		l.end = r.end
		r.start, r.end = 0, 0
		l.next = r.next
		if r.next >= 0 {
			syms[r.next].prev = bg.left
		}
		try(l.prev, bg.left)
		try(bg.left, l.next)
	}
	for i := 0; i >= 0; i = syms[i].next {
		s := text[syms[i].start:syms[i].end]
		if id, ok := m.t.index[s]; ok && m.mergeable(id) {
			out = append(out, id)
			continue
		}
		for j := 0; j < len(s); j++ {
			if id := m.byteID[s[j]]; id >= 0 {
				out = append(out, id)
			} else if m.unk >= 0 {
				out = append(out, m.unk)
			}
		}
	}
	return out
}

// bigramHeap is a max-heap on score, ties to the leftmost pair.
type bigramHeap struct{ a []spmBigram }

func (h *bigramHeap) len() int { return len(h.a) }
func (h *bigramHeap) less(i, j int) bool {
	if h.a[i].score != h.a[j].score {
		return h.a[i].score > h.a[j].score
	}
	return h.a[i].left < h.a[j].left
}
func (h *bigramHeap) push(x spmBigram) {
	h.a = append(h.a, x)
	i := len(h.a) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !h.less(i, p) {
			break
		}
		h.a[i], h.a[p] = h.a[p], h.a[i]
		i = p
	}
}
func (h *bigramHeap) pop() spmBigram {
	top := h.a[0]
	last := len(h.a) - 1
	h.a[0] = h.a[last]
	h.a = h.a[:last]
	i := 0
	for {
		l, r, s := 2*i+1, 2*i+2, i
		if l < last && h.less(l, s) {
			s = l
		}
		if r < last && h.less(r, s) {
			s = r
		}
		if s == i {
			break
		}
		h.a[i], h.a[s] = h.a[s], h.a[i]
		i = s
	}
	return top
}
