package tokenizer

import (
	"sync"
	"unicode"
	"unicode/utf8"
)

// preKind selects a hand-written pre-tokenizer. Each reproduces one
// regular expression exactly (alternatives tried in order, greedy
// quantifiers with backtracking); the patterns are in prePatterns.
type preKind int

const (
	preGPT2   preKind = iota // GPT-2 / r50k
	preLlama3                // Llama 3 ("llama-bpe"), cl100k's pattern
	preO200k                 // o200k ("gpt-4o"), gpt-oss
)

// prePatterns are the regular expressions the splitters implement.
var prePatterns = map[preKind]string{
	preGPT2:   `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
	preLlama3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`,
	preO200k: `[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?` +
		`|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?` +
		`|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+`,
}

// preFor maps tokenizer.ggml.pre to a splitter. Unknown names fall back to
// the GPT-2 splitter (the reported name says so).
func preFor(name string) (preKind, string) {
	switch name {
	case "gpt-4o", "o200k", "gpt-oss":
		return preO200k, "gpt-4o"
	case "llama-bpe", "llama3", "llama-v3", "cl100k", "dbrx", "smaug-bpe":
		return preLlama3, "llama-bpe"
	case "gpt-2", "gpt2", "default", "":
		return preGPT2, "gpt-2"
	}
	return preGPT2, "gpt-2 (fallback for " + name + ")"
}

// Character classes. ASCII is looked up in a table.
const (
	cOther  uint8 = 1 << iota // none of the below
	cUpper                    // Lu Lt Lm Lo M   (o200k's "upper" class)
	cLower                    // Ll Lm Lo M      (o200k's "lower" class)
	cLetter                   // \p{L}
	cNumber                   // \p{N}
	cSpace                    // \s (Unicode White_Space)
	cNL                       // \r or \n
)

var asciiClass [128]uint8

// bmpClass caches classOf for the Basic Multilingual Plane; built on first
// use (64 KiB, a few milliseconds) because Unicode table lookups dominate
// pre-tokenization of non-Latin text otherwise.
var (
	bmpOnce  sync.Once
	bmpClass []uint8
)

func init() {
	for c := 0; c < 128; c++ {
		asciiClass[c] = classOf(rune(c))
	}
}

func buildBMP() {
	t := make([]uint8, 0x10000)
	for r := range t {
		t[r] = classOf(rune(r))
	}
	bmpClass = t
}

// classOfCached is classOf with the BMP table.
func classOfCached(r rune) uint8 {
	if r < 0x10000 {
		bmpOnce.Do(buildBMP)
		return bmpClass[r]
	}
	return classOf(r)
}

func classOf(r rune) uint8 {
	var k uint8
	switch {
	case unicode.IsLetter(r):
		k |= cLetter
		if unicode.In(r, unicode.Lu, unicode.Lt, unicode.Lm, unicode.Lo) {
			k |= cUpper
		}
		if unicode.In(r, unicode.Ll, unicode.Lm, unicode.Lo) {
			k |= cLower
		}
	case unicode.Is(unicode.M, r):
		k |= cUpper | cLower
	case unicode.IsNumber(r):
		k |= cNumber
	case unicode.IsSpace(r):
		k |= cSpace
		if r == '\r' || r == '\n' {
			k |= cNL
		}
	}
	if k == 0 {
		k = cOther
	}
	return k
}

// scanner decodes runes with their classes.
type scanner struct {
	s string
}

// at returns the class and width of the rune at i (i < len(s)).
func (sc scanner) at(i int) (uint8, int) {
	c := sc.s[i]
	if c < utf8.RuneSelf {
		return asciiClass[c], 1
	}
	r, w := utf8.DecodeRuneInString(sc.s[i:])
	if r == utf8.RuneError && w == 1 {
		return cOther, 1
	}
	return classOfCached(r), w
}

// run advances over runes whose class intersects mask.
func (sc scanner) run(i int, mask uint8) int {
	for i < len(sc.s) {
		k, w := sc.at(i)
		if k&mask == 0 {
			break
		}
		i += w
	}
	return i
}

// contraction matches (?i:'s|'t|'re|'ve|'m|'ll|'d) at i (case-insensitive
// when fold) and returns the end or -1. Unicode case folding makes 's' also
// match U+017F (ſ), as the reference engines do.
func (sc scanner) contraction(i int, fold bool) int {
	s := sc.s
	if i+1 >= len(s) || s[i] != '\'' {
		return -1
	}
	c := s[i+1]
	if fold && c >= 'A' && c <= 'Z' {
		c += 'a' - 'A'
	}
	switch c {
	case 's', 't', 'm', 'd':
		return i + 2
	case 'r', 'v', 'l':
		want := byte('e')
		if c == 'l' {
			want = 'l'
		}
		if i+2 < len(s) {
			d := s[i+2]
			if fold && d >= 'A' && d <= 'Z' {
				d += 'a' - 'A'
			}
			if d == want {
				return i + 3
			}
		}
		return -1
	case 0xC5: // U+017F is C5 BF
		if fold && i+2 < len(s) && s[i+2] == 0xBF {
			return i + 3
		}
	}
	return -1
}

// whitespace handles the shared tail alternatives at i, where the rune is
// whitespace: \s*[\r\n]+ | \s+(?!\S) | \s+ (nlAlt=false drops the first).
func (sc scanner) whitespace(i int, nlAlt bool) int {
	j := i
	lastNL := -1
	for j < len(sc.s) {
		k, w := sc.at(j)
		if k&cSpace == 0 {
			break
		}
		if k&cNL != 0 {
			lastNL = j
		}
		j += w
	}
	if nlAlt && lastNL >= 0 {
		return lastNL + 1 // \r and \n are one byte
	}
	if j == len(sc.s) {
		return j
	}
	// \s+(?!\S): give back the last whitespace rune if that leaves one.
	_, lw := utf8.DecodeLastRuneInString(sc.s[i:j])
	if j-lw > i {
		return j - lw
	}
	return j
}

// splitPre calls emit for each pre-token of text.
func splitPre(kind preKind, text string, emit func(string)) {
	sc := scanner{text}
	for i := 0; i < len(text); {
		var e int
		switch kind {
		case preO200k:
			e = sc.nextO200k(i)
		case preLlama3:
			e = sc.nextLlama3(i)
		default:
			e = sc.nextGPT2(i)
		}
		emit(text[i:e])
		i = e
	}
}

// o200k's letter alternatives at i (after the optional prefix):
// alt 1 is U* L+ ('s...)?, alt 2 is U+ L* ('s...)?. They return -1 when they
// do not match.
func (sc scanner) o200kAlt1(i int) int {
	j := sc.run(i, cUpper) // greedy U*
	e := -1
	if j < len(sc.s) {
		if k, _ := sc.at(j); k&cLower != 0 { // L+ from j
			e = sc.run(j, cLower)
		}
	}
	if e < 0 {
		// Backtrack U* to the last rune in [i,j) that is also in the L
		// class; L+ then covers just that rune (the runes after it are Lu/Lt).
		for p := j; p > i; {
			r, w := utf8.DecodeLastRuneInString(sc.s[i:p])
			p -= w
			if classOfCached(r)&cLower != 0 {
				e = p + w
				break
			}
		}
	}
	if e < 0 {
		return -1
	}
	if c := sc.contraction(e, true); c > 0 {
		return c
	}
	return e
}

func (sc scanner) o200kAlt2(i int) int {
	j := sc.run(i, cUpper)
	if j == i {
		return -1
	}
	e := sc.run(j, cLower)
	if c := sc.contraction(e, true); c > 0 {
		return c
	}
	return e
}

func (sc scanner) nextO200k(i int) int {
	k, w := sc.at(i)
	prefix := k&(cNL|cLetter|cNumber) == 0 && i+w < len(sc.s) // [^\r\n\p{L}\p{N}]?
	if prefix {
		if e := sc.o200kAlt1(i + w); e > 0 {
			return e
		}
	}
	if k&(cUpper|cLower) != 0 {
		if e := sc.o200kAlt1(i); e > 0 {
			return e
		}
	}
	if prefix {
		if e := sc.o200kAlt2(i + w); e > 0 {
			return e
		}
	}
	if k&cUpper != 0 {
		if e := sc.o200kAlt2(i); e > 0 {
			return e
		}
	}
	if k&cNumber != 0 {
		return sc.numbers(i, 3)
	}
	if e := sc.punct(i, true); e > 0 {
		return e
	}
	return sc.whitespace(i, true)
}

// numbers matches \p{N}{1,max} (max 0: unbounded).
func (sc scanner) numbers(i, max int) int {
	n := 0
	for i < len(sc.s) && (max == 0 || n < max) {
		k, w := sc.at(i)
		if k&cNumber == 0 {
			break
		}
		i += w
		n++
	}
	return i
}

// punct matches ` ?[^\s\p{L}\p{N}]+` followed, for o200k, by [\r\n/]* and,
// for Llama 3, by [\r\n]* (tail selects: 1 o200k, 2 llama3, 0 none).
func (sc scanner) punctTail(i int, tail int) int {
	j := i
	if sc.s[j] == ' ' {
		j++
	}
	start := j
	for j < len(sc.s) {
		k, w := sc.at(j)
		if k&(cSpace|cLetter|cNumber) != 0 {
			break
		}
		j += w
	}
	if j == start {
		return -1
	}
	for tail != 0 && j < len(sc.s) {
		c := sc.s[j]
		if c == '\r' || c == '\n' || (tail == 1 && c == '/') {
			j++
			continue
		}
		break
	}
	return j
}

func (sc scanner) punct(i int, o200k bool) int {
	if o200k {
		return sc.punctTail(i, 1)
	}
	return sc.punctTail(i, 2)
}

func (sc scanner) nextLlama3(i int) int {
	if e := sc.contraction(i, true); e > 0 {
		return e
	}
	k, w := sc.at(i)
	if k&(cNL|cLetter|cNumber) == 0 && i+w < len(sc.s) {
		if k2, _ := sc.at(i + w); k2&cLetter != 0 {
			return sc.run(i+w, cLetter)
		}
	}
	if k&cLetter != 0 {
		return sc.run(i, cLetter)
	}
	if k&cNumber != 0 {
		return sc.numbers(i, 3)
	}
	if e := sc.punct(i, false); e > 0 {
		return e
	}
	return sc.whitespace(i, true)
}

func (sc scanner) nextGPT2(i int) int {
	if e := sc.contraction(i, false); e > 0 {
		return e
	}
	k, _ := sc.at(i)
	j := i
	if sc.s[i] == ' ' && i+1 < len(sc.s) {
		k, _ = sc.at(i + 1)
		j = i + 1
		if k&cSpace != 0 {
			return sc.whitespace(i, false)
		}
	}
	switch {
	case k&cLetter != 0:
		return sc.run(j, cLetter)
	case k&cNumber != 0:
		return sc.numbers(j, 0)
	case k&cSpace == 0:
		if e := sc.punctTail(i, 0); e > 0 {
			return e
		}
	}
	return sc.whitespace(i, false)
}
