package template

import (
	"math"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/ardanlabs/jinja"
)

// ardanlabs/jinja's tojson with indent= goes through Go maps, which sorts
// keys and HTML-escapes; Python's json.dumps keeps insertion order. Llama
// 3.x templates print tool definitions with tojson(indent=4), so templates
// are rewritten to call orchTojson (an ordered, Python-compatible encoder
// passed in as a global) wherever tojson gets keyword arguments.

const tojsonGlobal = "__orch_tojson"

var tojsonKw = regexp.MustCompile(`\|\s*tojson\s*\(`)

// rewriteTojson turns "EXPR | tojson(ARGS)" into "__orch_tojson(EXPR, ARGS)".
func rewriteTojson(src string) string {
	for {
		locs := tojsonKw.FindAllStringIndex(src, -1)
		done := true
		for i := len(locs) - 1; i >= 0; i-- {
			pipe, open := locs[i][0], locs[i][1]-1
			closeIdx := matchForward(src, open)
			if closeIdx < 0 {
				continue
			}
			args := strings.TrimSpace(src[open+1 : closeIdx])
			if args == "" {
				continue
			}
			start := operandStart(src, pipe)
			if start < 0 {
				continue
			}
			expr := strings.TrimSpace(src[start:pipe])
			src = src[:start] + tojsonGlobal + "(" + expr + ", " + args + ")" + src[closeIdx+1:]
			done = false
			break
		}
		if done {
			return src
		}
	}
}

func matchForward(s string, open int) int {
	depth := 0
	var quote byte
	for i := open; i < len(s); i++ {
		c := s[i]
		if quote != 0 {
			if c == '\\' {
				i++
			} else if c == quote {
				quote = 0
			}
			continue
		}
		switch c {
		case '"', '\'':
			quote = c
		case '(', '[', '{':
			depth++
		case ')', ']', '}':
			depth--
			if depth == 0 {
				return i
			}
		}
	}
	return -1
}

func matchBackward(s string, closeIdx int) int {
	depth := 0
	for i := closeIdx; i >= 0; i-- {
		switch s[i] {
		case ')', ']', '}':
			depth++
		case '(', '[', '{':
			depth--
			if depth == 0 {
				return i
			}
		}
	}
	return -1
}

func isIdent(c byte) bool {
	return c == '_' || c == '.' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

// operandStart finds where the filter operand ending before pipe starts: a
// postfix chain (names, attributes, subscripts, calls, literals), including
// earlier filters of the same chain.
func operandStart(s string, pipe int) int {
	i := pipe - 1
	for i >= 0 && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n') {
		i--
	}
	start := -1
	for i >= 0 {
		c := s[i]
		switch {
		case c == ')' || c == ']' || c == '}':
			o := matchBackward(s, i)
			if o < 0 {
				return -1
			}
			i = o - 1
		case c == '"' || c == '\'':
			j := strings.LastIndexByte(s[:i], c)
			if j < 0 {
				return -1
			}
			i = j - 1
		case isIdent(c):
			for i >= 0 && isIdent(s[i]) {
				i--
			}
		default:
			return start
		}
		start = i + 1
		if i >= 0 && (isIdent(s[i]) || s[i] == ')' || s[i] == ']') {
			continue
		}
		// An earlier filter in the chain: "a | b | tojson(...)".
		j := i
		for j >= 0 && (s[j] == ' ' || s[j] == '\t') {
			j--
		}
		if j >= 0 && s[j] == '|' {
			i = j - 1
			for i >= 0 && (s[i] == ' ' || s[i] == '\t') {
				i--
			}
			continue
		}
		return start
	}
	return start
}

// orchTojson is json.dumps(x, ensure_ascii=False, indent=, separators=,
// sort_keys=) as Hugging Face's tojson filter calls it.
func orchTojson(args []jinja.Value, kw map[string]jinja.Value) (jinja.Value, error) {
	if len(args) == 0 {
		return jinja.NewString(""), nil
	}
	e := pyJSON{item: ", ", key: ": "}
	if v, ok := kw["indent"]; ok && !v.IsNone() && !v.IsUndefined() {
		e.indent = -1
		switch {
		case v.IsInt():
			e.indent = int(v.AsInt())
		case v.IsString():
			e.indentStr = v.AsString()
			e.indent = 0
		}
		if e.indent >= 0 || e.indentStr != "" {
			e.item = ","
			e.pretty = true
			if e.indentStr == "" {
				e.indentStr = strings.Repeat(" ", e.indent)
			}
		}
	}
	if v, ok := kw["separators"]; ok && v.IsList() && v.AsList().Len() == 2 {
		a, b := v.AsList().Get(0), v.AsList().Get(1)
		if a.IsString() && b.IsString() {
			e.item, e.key = a.AsString(), b.AsString()
		}
	}
	if v, ok := kw["sort_keys"]; ok && v.IsTruthy() {
		e.sort = true
	}
	var sb strings.Builder
	e.encode(&sb, args[0], 0)
	return jinja.NewString(sb.String()), nil
}

type pyJSON struct {
	item, key string
	indent    int
	indentStr string
	pretty    bool
	sort      bool
}

func (e *pyJSON) newline(sb *strings.Builder, level int) {
	if e.pretty {
		sb.WriteByte('\n')
		for i := 0; i < level; i++ {
			sb.WriteString(e.indentStr)
		}
	}
}

func (e *pyJSON) encode(sb *strings.Builder, v jinja.Value, level int) {
	switch {
	case v.IsNone(), v.IsUndefined(), v.IsCallable():
		sb.WriteString("null")
	case v.IsBool():
		if v.AsBool() {
			sb.WriteString("true")
		} else {
			sb.WriteString("false")
		}
	case v.IsInt():
		sb.WriteString(strconv.FormatInt(v.AsInt(), 10))
	case v.IsFloat():
		sb.WriteString(pyFloat(v.AsFloat()))
	case v.IsString():
		pyString(sb, v.AsString())
	case v.IsList():
		items := v.AsList().Items
		if len(items) == 0 {
			sb.WriteString("[]")
			return
		}
		sb.WriteByte('[')
		for i, it := range items {
			if i > 0 {
				sb.WriteString(e.item)
			}
			e.newline(sb, level+1)
			e.encode(sb, it, level+1)
		}
		e.newline(sb, level)
		sb.WriteByte(']')
	case v.IsDict():
		d := v.AsDict()
		keys := append([]string(nil), d.OrderedKeys()...)
		if len(keys) == 0 {
			sb.WriteString("{}")
			return
		}
		if e.sort {
			sort.Strings(keys)
		}
		sb.WriteByte('{')
		for i, k := range keys {
			if i > 0 {
				sb.WriteString(e.item)
			}
			e.newline(sb, level+1)
			pyString(sb, k)
			sb.WriteString(e.key)
			val, _ := d.Get(k)
			e.encode(sb, val, level+1)
		}
		e.newline(sb, level)
		sb.WriteByte('}')
	default:
		pyString(sb, v.String())
	}
}

func pyString(sb *strings.Builder, s string) {
	sb.WriteByte('"')
	for i := 0; i < len(s); {
		r, w := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == '"':
			sb.WriteString(`\"`)
		case r == '\\':
			sb.WriteString(`\\`)
		case r == '\n':
			sb.WriteString(`\n`)
		case r == '\r':
			sb.WriteString(`\r`)
		case r == '\t':
			sb.WriteString(`\t`)
		case r == '\b':
			sb.WriteString(`\b`)
		case r == '\f':
			sb.WriteString(`\f`)
		case r < 0x20:
			sb.WriteString(`\u00`)
			sb.WriteByte("0123456789abcdef"[r>>4])
			sb.WriteByte("0123456789abcdef"[r&15])
		default:
			sb.WriteString(s[i : i+w])
		}
		i += w
	}
	sb.WriteByte('"')
}

// pyFloat formats like Python's float repr.
func pyFloat(f float64) string {
	switch {
	case math.IsNaN(f):
		return "NaN"
	case math.IsInf(f, 1):
		return "Infinity"
	case math.IsInf(f, -1):
		return "-Infinity"
	}
	e := strconv.FormatFloat(f, 'e', -1, 64)
	exp, _ := strconv.Atoi(e[strings.IndexByte(e, 'e')+1:])
	if exp < -4 || exp >= 16 {
		mant, ex, _ := strings.Cut(e, "e")
		sign := ex[0]
		digits := strings.TrimLeft(ex[1:], "0")
		if len(digits) < 2 {
			digits = strings.Repeat("0", 2-len(digits)) + digits
		}
		return mant + "e" + string(sign) + digits
	}
	s := strconv.FormatFloat(f, 'f', -1, 64)
	if !strings.ContainsAny(s, ".") {
		s += ".0"
	}
	return s
}
