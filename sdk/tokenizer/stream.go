package tokenizer

import "unicode/utf8"

// StreamDecoder turns generated ids into text piece by piece and never
// returns part of a UTF-8 character: bytes of an unfinished character are
// held until the character completes. Bytes that can never form a valid
// character are returned as U+FFFD. Not safe for concurrent use.
type StreamDecoder struct {
	t     *Tokenizer
	buf   []byte
	first bool
}

// NewStreamDecoder starts a decoder for one generated sequence.
func (t *Tokenizer) NewStreamDecoder() *StreamDecoder {
	return &StreamDecoder{t: t, first: true}
}

// Add feeds one id and returns the text that became complete.
func (d *StreamDecoder) Add(id int32) string {
	d.buf, d.first = d.t.appendToken(d.buf, id, d.first)
	return d.drain(false)
}

// Flush returns whatever is held back (an unfinished character becomes
// U+FFFD) and resets the decoder's buffer.
func (d *StreamDecoder) Flush() string { return d.drain(true) }

func (d *StreamDecoder) drain(all bool) string {
	b := d.buf
	var fixed []byte // only when an invalid byte becomes U+FFFD
	copied, i := 0, 0
	for i < len(b) {
		if b[i] < utf8.RuneSelf {
			i++
			continue
		}
		r, w := utf8.DecodeRune(b[i:])
		if r == utf8.RuneError && w == 1 {
			if !all && !utf8.FullRune(b[i:]) {
				break // may still complete
			}
			fixed = append(append(fixed, b[copied:i]...), "\uFFFD"...)
			i++
			copied = i
			continue
		}
		i += w
	}
	var out string
	if fixed == nil {
		out = string(b[:i]) // the common case: one copy, no scratch buffer
	} else {
		out = string(append(fixed, b[copied:i]...))
	}
	d.buf = append(d.buf[:0], b[i:]...)
	return out
}
