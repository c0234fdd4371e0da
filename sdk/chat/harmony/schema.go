package harmony

import (
	"bytes"
	"encoding/json"

	"strings"
)

// obj is a JSON object with its key order kept (the renderer lists
// properties in the order the schema gives them).
type obj struct {
	keys []string
	vals map[string]json.RawMessage
}

func parseObj(raw json.RawMessage) (*obj, bool) {
	d := json.NewDecoder(bytes.NewReader(raw))
	d.UseNumber()
	t, err := d.Token()
	if err != nil || t != json.Delim('{') {
		return nil, false
	}
	o := &obj{vals: map[string]json.RawMessage{}}
	for d.More() {
		k, err := d.Token()
		if err != nil {
			return nil, false
		}
		ks, _ := k.(string)
		var v json.RawMessage
		if err := d.Decode(&v); err != nil {
			return nil, false
		}
		if _, dup := o.vals[ks]; !dup {
			o.keys = append(o.keys, ks)
		}
		o.vals[ks] = v
	}
	return o, true
}

func (o *obj) str(k string) (string, bool) {
	v, ok := o.vals[k]
	if !ok {
		return "", false
	}
	var s string
	if json.Unmarshal(v, &s) != nil {
		return "", false
	}
	return s, true
}

func (o *obj) arr(k string) ([]json.RawMessage, bool) {
	v, ok := o.vals[k]
	if !ok {
		return nil, false
	}
	var a []json.RawMessage
	if json.Unmarshal(v, &a) != nil {
		return nil, false
	}
	return a, true
}

func (o *obj) boolean(k string) bool {
	var b bool
	v, ok := o.vals[k]
	return ok && json.Unmarshal(v, &b) == nil && b
}

func (o *obj) isEnum() bool {
	a, ok := o.arr("enum")
	return ok && len(a) > 0
}

func compact(raw json.RawMessage) string {
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		return string(raw)
	}
	return b.String()
}

func rawString(raw json.RawMessage) (string, bool) {
	var s string
	if json.Unmarshal(raw, &s) != nil {
		return "", false
	}
	return s, true
}

// defaultComment formats "default: ..." as the reference renderer does: a
// string default is quoted unless the property is an enum (quoteEnum makes
// enums print their JSON form, which quotes too).
func defaultComment(o *obj, quoteEnum bool) (string, bool) {
	raw, ok := o.vals["default"]
	if !ok {
		return "", false
	}
	if s, isStr := rawString(raw); isStr {
		if !o.isEnum() {
			return `default: "` + s + `"`, true
		}
		if !quoteEnum {
			return "default: " + s, true
		}
	}
	return "default: " + compact(raw), true
}

// schemaToTypeScript renders a JSON Schema as the TypeScript-like type
// harmony's tool definitions use (a port of openai/harmony's
// json_schema_to_typescript).
func schemaToTypeScript(raw json.RawMessage, indent string) string {
	o, ok := parseObj(raw)
	if !ok {
		return "any"
	}
	if variants, ok := o.arr("oneOf"); ok {
		var sb strings.Builder
		for _, v := range variants {
			sb.WriteString("\n" + indent + " | ")
			sb.WriteString(variantType(v, indent))
			if vo, ok := parseObj(v); ok {
				var trailing []string
				if d, ok := vo.str("description"); ok {
					trailing = append(trailing, d)
				}
				if d, ok := defaultComment(vo, true); ok {
					trailing = append(trailing, d)
				}
				if len(trailing) > 0 {
					sb.WriteString(" // " + strings.Join(trailing, " "))
				}
			}
		}
		return sb.String()
	}
	if types, ok := o.arr("type"); ok {
		var ts []string
		for _, t := range types {
			if s, ok := rawString(t); ok {
				if s == "integer" {
					s = "number"
				}
				ts = append(ts, s)
			}
		}
		if len(ts) > 0 {
			return strings.Join(ts, " | ")
		}
	}
	ty, ok := o.str("type")
	if !ok {
		return "any"
	}
	switch ty {
	case "object":
		return objectType(o, indent)
	case "string":
		if vals, ok := o.arr("enum"); ok {
			var es []string
			for _, v := range vals {
				if s, ok := rawString(v); ok {
					es = append(es, `"`+s+`"`)
				}
			}
			if len(es) > 0 {
				return strings.Join(es, " | ")
			}
		}
		return "string"
	case "number", "integer":
		return "number"
	case "boolean":
		return "boolean"
	case "array":
		if items, ok := o.vals["items"]; ok {
			return schemaToTypeScript(items, indent) + "[]"
		}
		return "Array<any>"
	}
	return "any"
}

func variantType(v json.RawMessage, indent string) string {
	t := schemaToTypeScript(v, indent+"   ")
	if vo, ok := parseObj(v); ok && vo.boolean("nullable") && !strings.Contains(t, "null") {
		t += " | null"
	}
	return t
}

func objectType(o *obj, indent string) string {
	var sb strings.Builder
	if d, ok := o.str("description"); ok {
		sb.WriteString(indent + "// " + d + "\n")
	}
	sb.WriteString("{\n")
	props, _ := parseObj(o.vals["properties"])
	required := map[string]bool{}
	if req, ok := o.arr("required"); ok {
		for _, r := range req {
			if s, ok := rawString(r); ok {
				required[s] = true
			}
		}
	}
	opt := func(k string) string {
		if required[k] {
			return ""
		}
		return "?"
	}
	if props != nil {
		for _, key := range props.keys {
			val, ok := parseObj(props.vals[key])
			if !ok {
				val = &obj{vals: map[string]json.RawMessage{}}
			}
			if t, ok := val.str("title"); ok {
				sb.WriteString(indent + "// " + t + "\n" + indent + "//\n")
			}
			variants, hasOneOf := val.arr("oneOf")
			if !hasOneOf {
				if d, ok := val.str("description"); ok {
					sb.WriteString(indent + "// " + d + "\n")
				}
			}
			if ex, ok := val.arr("examples"); ok && len(ex) > 0 {
				sb.WriteString(indent + "// Examples:\n")
				for _, e := range ex {
					if s, ok := rawString(e); ok {
						sb.WriteString(indent + "// - \"" + s + "\"\n")
					}
				}
			}
			if hasOneOf {
				propDesc, hasPropDesc := val.str("description")
				skip := false
				if hasPropDesc && len(variants) > 0 {
					if fv, ok := parseObj(variants[0]); ok {
						if d, ok := fv.str("description"); ok && d == propDesc {
							skip = true
						}
					}
				}
				above := false
				if !skip && hasPropDesc {
					sb.WriteString(indent + "// " + propDesc + "\n")
					above = true
				}
				if d, ok := defaultComment(val, false); ok {
					sb.WriteString(indent + "// " + d + "\n")
				}
				sb.WriteString(indent + key + opt(key) + ":\n")
				for i, v := range variants {
					sb.WriteString(indent + " | ")
					sb.WriteString(variantType(v, indent))
					var trailing []string
					if vo, ok := parseObj(v); ok {
						if !(i == 0 && above) {
							if d, ok := vo.str("description"); ok && !(hasPropDesc && d == propDesc) {
								trailing = append(trailing, d)
							}
						}
						if d, ok := defaultComment(vo, true); ok {
							trailing = append(trailing, d)
						}
					}
					if len(trailing) > 0 {
						sb.WriteString(" // " + strings.Join(trailing, " "))
					}
					sb.WriteString("\n")
				}
				sb.WriteString(indent + ",\n")
				continue
			}
			sb.WriteString(indent + key + opt(key) + ": ")
			t := schemaToTypeScript(props.vals[key], indent+"    ")
			if val.boolean("nullable") && !strings.Contains(t, "null") {
				t += " | null"
			}
			sb.WriteString(t + ",")
			if d, ok := defaultComment(val, false); ok {
				sb.WriteString(" // " + d)
			}
			sb.WriteString("\n")
		}
	}
	sb.WriteString(indent + "}")
	return sb.String()
}
