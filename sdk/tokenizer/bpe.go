package tokenizer

import (
	"fmt"
	"strings"
)

// GPT-2's byte-to-unicode table: every byte maps to a printable rune so that
// byte-level tokens can be stored as text.
var byteToRune [256]rune
var runeToByte = map[rune]byte{}

func init() {
	n := 0
	for b := 0; b < 256; b++ {
		if (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF) {
			byteToRune[b] = rune(b)
		} else {
			byteToRune[b] = rune(256 + n)
			n++
		}
		runeToByte[byteToRune[b]] = byte(b)
	}
}

// ByteLevelEncode maps raw bytes to GPT-2's byte-level token text.
func ByteLevelEncode(b []byte) string {
	var sb strings.Builder
	for _, c := range b {
		sb.WriteRune(byteToRune[c])
	}
	return sb.String()
}

// ByteLevelDecode maps byte-level token text back to raw bytes; ok is false
// when s holds a rune outside the mapping.
func ByteLevelDecode(s string) ([]byte, bool) {
	out := make([]byte, 0, len(s))
	for _, r := range s {
		b, ok := runeToByte[r]
		if !ok {
			return nil, false
		}
		out = append(out, b)
	}
	return out, true
}

type merge struct {
	rank int32
	id   int32
}

type bpeModel struct {
	t            *Tokenizer
	byteID       [256]int32
	pieces       map[string]int32 // raw bytes -> id of normal tokens
	pairs        *pairTable
	ignoreMerges bool // a piece that is a whole token is that token (tiktoken, Llama 3)
}

func pairKey(a, b int32) uint64 { return uint64(uint32(a))<<32 | uint64(uint32(b)) }

func newBPE(t *Tokenizer) (*bpeModel, error) {
	m := &bpeModel{t: t, pieces: make(map[string]int32, len(t.text))}
	m.ignoreMerges = t.pre == preO200k || t.pre == preLlama3
	t.bytes = make([][]byte, len(t.text))
	for i := range m.byteID {
		m.byteID[i] = -1
	}
	for i, s := range t.text {
		switch t.types[i] {
		case TypeNormal, TypeByte, TypeUndefined:
			b, ok := ByteLevelDecode(s)
			if !ok {
				b = []byte(s)
			}
			t.bytes[i] = b
			if _, dup := m.pieces[string(b)]; !dup {
				m.pieces[string(b)] = int32(i)
			}
			if len(b) == 1 && m.byteID[b[0]] < 0 {
				m.byteID[b[0]] = int32(i)
			}
		default:
			t.bytes[i] = []byte(s)
		}
	}
	for c, id := range m.byteID {
		if id < 0 {
			return nil, fmt.Errorf("%w: byte-level vocabulary lacks a token for byte 0x%02x", ErrInvalidVocab, c)
		}
	}
	if t.v.Merges == nil {
		m.pairs = pairsFromRanks(t, m)
		return m, nil
	}
	m.pairs = newPairTable(len(t.v.Merges))
	var buf []byte
	for r, s := range t.v.Merges {
		sp := strings.IndexByte(s, ' ')
		if sp <= 0 || sp == len(s)-1 {
			return nil, fmt.Errorf("%w: merge %d %q is not \"left right\"", ErrInvalidVocab, r, s)
		}
		a, okA := t.index[s[:sp]]
		b, okB := t.index[s[sp+1:]]
		if !okA || !okB {
			continue // llama.cpp also skips merges of unknown tokens
		}
		buf = append(append(buf[:0], t.bytes[a]...), t.bytes[b]...)
		c, okC := m.pieces[string(buf)]
		if !okC {
			continue
		}
		m.pairs.put(pairKey(a, b), merge{rank: int32(r), id: c})
	}
	return m, nil
}

// pairsFromRanks derives the merge table from token order (tiktoken ranks):
// every split of a token into two tokens merges at the token's rank. This is
// what tiktoken does and what Hugging Face's tiktoken converter writes.
func pairsFromRanks(t *Tokenizer, m *bpeModel) *pairTable {
	n := 0
	for _, b := range t.bytes {
		if len(b) > 1 {
			n += len(b) - 1
		}
	}
	pairs := newPairTable(n)
	for i, b := range t.bytes {
		if t.types[i] != TypeNormal && t.types[i] != TypeUndefined || len(b) < 2 {
			continue
		}
		for k := 1; k < len(b); k++ {
			a, okA := m.pieces[string(b[:k])]
			c, okC := m.pieces[string(b[k:])]
			if okA && okC {
				pairs.put(pairKey(a, c), merge{rank: int32(i), id: int32(i)})
			}
		}
	}
	return pairs
}

// MergesFromRanks lists the merges ("left right", byte-level text) implied
// by a vocabulary in tiktoken rank order, in the order Hugging Face's
// converter writes them. Tools that write GGUF files from tiktoken ranks use
// it.
func MergesFromRanks(tokens []string) []string {
	index := make(map[string]int, len(tokens))
	for i, s := range tokens {
		if _, dup := index[s]; !dup {
			index[s] = i
		}
	}
	var out []string
	for _, s := range tokens {
		for k := range s {
			if k == 0 {
				continue
			}
			if _, ok := index[s[:k]]; !ok {
				continue
			}
			if _, ok := index[s[k:]]; ok {
				out = append(out, s[:k]+" "+s[k:])
			}
		}
	}
	return out
}

// encode appends the ids of a plain-text fragment.
func (m *bpeModel) encode(out []int32, text string) []int32 {
	var buf [64]int32
	splitPre(m.t.pre, text, func(piece string) {
		if m.ignoreMerges || len(piece) == 1 {
			if id, ok := m.pieces[piece]; ok {
				out = append(out, id)
				return
			}
		}
		out = m.merge(out, piece, buf[:0])
	})
	return out
}

// merge runs byte-pair merging on one piece: repeatedly merge the adjacent
// pair with the lowest rank, leftmost on ties (tiktoken's loop: one linear
// scan over cached pair ranks per merge; long pieces use a heap).
func (m *bpeModel) merge(out []int32, piece string, parts []int32) []int32 {
	if len(piece) > 128 {
		return m.mergeLong(out, piece)
	}
	var rbuf [128]merge
	for i := 0; i < len(piece); i++ {
		parts = append(parts, m.byteID[piece[i]])
	}
	ranks := rbuf[:len(parts)-1]
	for i := range ranks {
		ranks[i] = m.lookup(parts[i], parts[i+1])
	}
	for len(ranks) > 0 {
		best := -1
		bestRank := int32(noRank)
		for i, r := range ranks {
			if r.rank < bestRank {
				best, bestRank = i, r.rank
			}
		}
		if best < 0 {
			break
		}
		parts[best] = ranks[best].id
		parts = append(parts[:best+1], parts[best+2:]...)
		ranks = append(ranks[:best], ranks[best+1:]...)
		if best < len(ranks) {
			ranks[best] = m.lookup(parts[best], parts[best+1])
		}
		if best > 0 {
			ranks[best-1] = m.lookup(parts[best-1], parts[best])
		}
	}
	return append(out, parts...)
}

const noRank = 1<<31 - 1

func (m *bpeModel) lookup(a, b int32) merge {
	if mg, ok := m.pairs.get(pairKey(a, b)); ok {
		return mg
	}
	return merge{rank: noRank, id: -1}
}

// mergeLong is merge for long pieces: a doubly linked list of parts and a
// min-heap of candidate pairs ordered by (rank, position).
func (m *bpeModel) mergeLong(out []int32, piece string) []int32 {
	n := len(piece)
	ids := make([]int32, n)
	prev := make([]int, n)
	next := make([]int, n)
	for i := 0; i < n; i++ {
		ids[i] = m.byteID[piece[i]]
		prev[i], next[i] = i-1, i+1
	}
	next[n-1] = -1
	h := &pairHeap{}
	push := func(i int) {
		j := next[i]
		if i < 0 || j < 0 {
			return
		}
		if mg := m.lookup(ids[i], ids[j]); mg.rank != noRank {
			h.push(heapItem{rank: mg.rank, pos: i, left: ids[i], right: ids[j], id: mg.id})
		}
	}
	for i := 0; i+1 < n; i++ {
		push(i)
	}
	for h.len() > 0 {
		it := h.pop()
		i := it.pos
		j := next[i]
		if ids[i] != it.left || j < 0 || ids[j] != it.right {
			continue // stale: one side already merged
		}
		ids[i] = it.id
		ids[j] = -1
		next[i] = next[j]
		if next[j] >= 0 {
			prev[next[j]] = i
		}
		if prev[i] >= 0 {
			push(prev[i])
		}
		push(i)
	}
	for i := 0; i >= 0; i = next[i] {
		out = append(out, ids[i])
	}
	return out
}

type heapItem struct {
	rank        int32
	pos         int
	left, right int32
	id          int32
}

type pairHeap struct{ a []heapItem }

func (h *pairHeap) len() int { return len(h.a) }
func (h *pairHeap) less(i, j int) bool {
	if h.a[i].rank != h.a[j].rank {
		return h.a[i].rank < h.a[j].rank
	}
	return h.a[i].pos < h.a[j].pos
}
func (h *pairHeap) push(x heapItem) {
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
func (h *pairHeap) pop() heapItem {
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
