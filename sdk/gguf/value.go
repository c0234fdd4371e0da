package gguf

import (
	"fmt"
	"math"
	"strings"
)

// Value is one GGUF metadata value: a scalar, a string, or an array (whose
// elements may themselves be arrays). Use the As* accessors to get Go values;
// they convert between integer widths where the value fits.
type Value struct {
	Type ValueType
	// ElemType is the element type when Type is ValueArray.
	ElemType ValueType

	u   uint64 // unsigned ints, bool (0/1)
	i   int64  // signed ints
	f   float64
	s   string
	arr any // typed slice for arrays: []uint8, []int8, []uint16, []int16, []uint32, []int32, []float32, []bool, []string, []uint64, []int64, []float64, []Value
}

// AsUint returns an integer value (any width, signed only if non-negative) as uint64.
func (v Value) AsUint() (uint64, bool) {
	switch v.Type {
	case ValueUint8, ValueUint16, ValueUint32, ValueUint64:
		return v.u, true
	case ValueInt8, ValueInt16, ValueInt32, ValueInt64:
		if v.i >= 0 {
			return uint64(v.i), true
		}
	}
	return 0, false
}

// AsInt returns an integer value (any width that fits int64) as int64.
func (v Value) AsInt() (int64, bool) {
	switch v.Type {
	case ValueUint8, ValueUint16, ValueUint32, ValueUint64:
		if v.u <= math.MaxInt64 {
			return int64(v.u), true
		}
	case ValueInt8, ValueInt16, ValueInt32, ValueInt64:
		return v.i, true
	}
	return 0, false
}

// AsFloat returns a float32/float64 value, or an integer value converted.
func (v Value) AsFloat() (float64, bool) {
	switch v.Type {
	case ValueFloat32, ValueFloat64:
		return v.f, true
	case ValueUint8, ValueUint16, ValueUint32, ValueUint64:
		return float64(v.u), true
	case ValueInt8, ValueInt16, ValueInt32, ValueInt64:
		return float64(v.i), true
	}
	return 0, false
}

// AsBool returns a bool value.
func (v Value) AsBool() (bool, bool) {
	if v.Type == ValueBool {
		return v.u != 0, true
	}
	return false, false
}

// AsString returns a string value.
func (v Value) AsString() (string, bool) {
	if v.Type == ValueString {
		return v.s, true
	}
	return "", false
}

// Len is the number of elements of an array value (0 otherwise).
func (v Value) Len() int {
	if v.Type != ValueArray {
		return 0
	}
	switch a := v.arr.(type) {
	case []uint8:
		return len(a)
	case []int8:
		return len(a)
	case []uint16:
		return len(a)
	case []int16:
		return len(a)
	case []uint32:
		return len(a)
	case []int32:
		return len(a)
	case []float32:
		return len(a)
	case []bool:
		return len(a)
	case []string:
		return len(a)
	case []uint64:
		return len(a)
	case []int64:
		return len(a)
	case []float64:
		return len(a)
	case []Value:
		return len(a)
	}
	return 0
}

// Raw returns the underlying Go value: the scalar (uint8 ... float64, bool,
// string with their GGUF width) or the typed slice of an array ([]int32,
// []string, ..., []Value for nested arrays). The slice is shared, not copied.
func (v Value) Raw() any {
	switch v.Type {
	case ValueUint8:
		return uint8(v.u)
	case ValueUint16:
		return uint16(v.u)
	case ValueUint32:
		return uint32(v.u)
	case ValueUint64:
		return v.u
	case ValueInt8:
		return int8(v.i)
	case ValueInt16:
		return int16(v.i)
	case ValueInt32:
		return int32(v.i)
	case ValueInt64:
		return v.i
	case ValueFloat32:
		return float32(v.f)
	case ValueFloat64:
		return v.f
	case ValueBool:
		return v.u != 0
	case ValueString:
		return v.s
	case ValueArray:
		return v.arr
	}
	return nil
}

// Elem returns element i of an array value as a Value.
func (v Value) Elem(i int) (Value, bool) {
	if v.Type != ValueArray || i < 0 || i >= v.Len() {
		return Value{}, false
	}
	switch a := v.arr.(type) {
	case []uint8:
		return Value{Type: ValueUint8, u: uint64(a[i])}, true
	case []int8:
		return Value{Type: ValueInt8, i: int64(a[i])}, true
	case []uint16:
		return Value{Type: ValueUint16, u: uint64(a[i])}, true
	case []int16:
		return Value{Type: ValueInt16, i: int64(a[i])}, true
	case []uint32:
		return Value{Type: ValueUint32, u: uint64(a[i])}, true
	case []int32:
		return Value{Type: ValueInt32, i: int64(a[i])}, true
	case []float32:
		return Value{Type: ValueFloat32, f: float64(a[i])}, true
	case []bool:
		var u uint64
		if a[i] {
			u = 1
		}
		return Value{Type: ValueBool, u: u}, true
	case []string:
		return Value{Type: ValueString, s: a[i]}, true
	case []uint64:
		return Value{Type: ValueUint64, u: a[i]}, true
	case []int64:
		return Value{Type: ValueInt64, i: a[i]}, true
	case []float64:
		return Value{Type: ValueFloat64, f: a[i]}, true
	case []Value:
		return a[i], true
	}
	return Value{}, false
}

// Strings returns a string array.
func (v Value) Strings() ([]string, bool) {
	a, ok := v.arr.([]string)
	return a, ok && v.Type == ValueArray
}

// Ints returns an integer array of any width as []int64 (a copy). It fails for
// uint64 elements above MaxInt64.
func (v Value) Ints() ([]int64, bool) {
	if v.Type != ValueArray {
		return nil, false
	}
	n := v.Len()
	out := make([]int64, n)
	for i := 0; i < n; i++ {
		e, _ := v.Elem(i)
		x, ok := e.AsInt()
		if !ok {
			return nil, false
		}
		out[i] = x
	}
	return out, true
}

// Floats returns a float32 array (shared), or a float64/integer array
// converted to float32.
func (v Value) Floats() ([]float32, bool) {
	if v.Type != ValueArray {
		return nil, false
	}
	if a, ok := v.arr.([]float32); ok {
		return a, true
	}
	n := v.Len()
	out := make([]float32, n)
	for i := 0; i < n; i++ {
		e, _ := v.Elem(i)
		x, ok := e.AsFloat()
		if !ok {
			return nil, false
		}
		out[i] = float32(x)
	}
	return out, true
}

// String renders the value for humans; long arrays and strings are shortened.
func (v Value) String() string {
	switch v.Type {
	case ValueString:
		s := v.s
		if len(s) > 80 {
			s = s[:77] + "..."
		}
		return fmt.Sprintf("%q", s)
	case ValueArray:
		n := v.Len()
		var b strings.Builder
		fmt.Fprintf(&b, "[%s x %d]", v.ElemType, n)
		if n > 0 {
			b.WriteString(" [")
			for i := 0; i < n && i < 4; i++ {
				if i > 0 {
					b.WriteString(", ")
				}
				e, _ := v.Elem(i)
				b.WriteString(e.String())
			}
			if n > 4 {
				b.WriteString(", ...")
			}
			b.WriteString("]")
		}
		return b.String()
	}
	return fmt.Sprint(v.Raw())
}

// NewValue converts a Go value to a Value: uint8..uint64, int8..int64, int
// (as int64), uint (as uint64), float32/64, bool, string, and slices of
// those (incl. []Value and nested slices such as [][]int32) as arrays.
func NewValue(x any) (Value, error) {
	switch x := x.(type) {
	case Value:
		return x, nil
	case uint8:
		return Value{Type: ValueUint8, u: uint64(x)}, nil
	case uint16:
		return Value{Type: ValueUint16, u: uint64(x)}, nil
	case uint32:
		return Value{Type: ValueUint32, u: uint64(x)}, nil
	case uint64:
		return Value{Type: ValueUint64, u: x}, nil
	case uint:
		return Value{Type: ValueUint64, u: uint64(x)}, nil
	case int8:
		return Value{Type: ValueInt8, i: int64(x)}, nil
	case int16:
		return Value{Type: ValueInt16, i: int64(x)}, nil
	case int32:
		return Value{Type: ValueInt32, i: int64(x)}, nil
	case int64:
		return Value{Type: ValueInt64, i: x}, nil
	case int:
		return Value{Type: ValueInt64, i: int64(x)}, nil
	case float32:
		return Value{Type: ValueFloat32, f: float64(x)}, nil
	case float64:
		return Value{Type: ValueFloat64, f: x}, nil
	case bool:
		var u uint64
		if x {
			u = 1
		}
		return Value{Type: ValueBool, u: u}, nil
	case string:
		return Value{Type: ValueString, s: x}, nil
	case []uint8:
		return Value{Type: ValueArray, ElemType: ValueUint8, arr: x}, nil
	case []int8:
		return Value{Type: ValueArray, ElemType: ValueInt8, arr: x}, nil
	case []uint16:
		return Value{Type: ValueArray, ElemType: ValueUint16, arr: x}, nil
	case []int16:
		return Value{Type: ValueArray, ElemType: ValueInt16, arr: x}, nil
	case []uint32:
		return Value{Type: ValueArray, ElemType: ValueUint32, arr: x}, nil
	case []int32:
		return Value{Type: ValueArray, ElemType: ValueInt32, arr: x}, nil
	case []float32:
		return Value{Type: ValueArray, ElemType: ValueFloat32, arr: x}, nil
	case []bool:
		return Value{Type: ValueArray, ElemType: ValueBool, arr: x}, nil
	case []string:
		return Value{Type: ValueArray, ElemType: ValueString, arr: x}, nil
	case []uint64:
		return Value{Type: ValueArray, ElemType: ValueUint64, arr: x}, nil
	case []int64:
		return Value{Type: ValueArray, ElemType: ValueInt64, arr: x}, nil
	case []float64:
		return Value{Type: ValueArray, ElemType: ValueFloat64, arr: x}, nil
	case []int:
		a := make([]int64, len(x))
		for i, e := range x {
			a[i] = int64(e)
		}
		return Value{Type: ValueArray, ElemType: ValueInt64, arr: a}, nil
	case []Value:
		// nested: all elements must be arrays of one type... GGUF only
		// records one element type, so all elements must share it.
		et := ValueArray
		if len(x) > 0 {
			et = x[0].Type
		}
		for i, e := range x {
			if e.Type != et {
				return Value{}, fmt.Errorf("gguf: array element %d is %s, element 0 is %s", i, e.Type, et)
			}
		}
		if et != ValueArray {
			// flatten scalars of one type into the typed representation
			return Value{Type: ValueArray, ElemType: et, arr: scalarsToTyped(x, et)}, nil
		}
		return Value{Type: ValueArray, ElemType: ValueArray, arr: x}, nil
	}
	// nested slices of slices ([][]int32, [][]string, ...)
	if vs, ok := nestedToValues(x); ok {
		return Value{Type: ValueArray, ElemType: ValueArray, arr: vs}, nil
	}
	return Value{}, fmt.Errorf("gguf: unsupported metadata value type %T", x)
}

func scalarsToTyped(x []Value, et ValueType) any {
	switch et {
	case ValueString:
		return mapValues(x, func(e Value) string { return e.s })
	case ValueUint8:
		return mapValues(x, func(e Value) uint8 { return uint8(e.u) })
	case ValueInt8:
		return mapValues(x, func(e Value) int8 { return int8(e.i) })
	case ValueUint16:
		return mapValues(x, func(e Value) uint16 { return uint16(e.u) })
	case ValueInt16:
		return mapValues(x, func(e Value) int16 { return int16(e.i) })
	case ValueUint32:
		return mapValues(x, func(e Value) uint32 { return uint32(e.u) })
	case ValueInt32:
		return mapValues(x, func(e Value) int32 { return int32(e.i) })
	case ValueFloat32:
		return mapValues(x, func(e Value) float32 { return float32(e.f) })
	case ValueBool:
		return mapValues(x, func(e Value) bool { return e.u != 0 })
	case ValueUint64:
		return mapValues(x, func(e Value) uint64 { return e.u })
	case ValueInt64:
		return mapValues(x, func(e Value) int64 { return e.i })
	case ValueFloat64:
		return mapValues(x, func(e Value) float64 { return e.f })
	}
	return nil
}

// mapValues converts each scalar Value to its typed Go representation.
func mapValues[T any](x []Value, at func(Value) T) []T {
	a := make([]T, len(x))
	for i, e := range x {
		a[i] = at(e)
	}
	return a
}

// nestedToValues converts [][]T (any depth) into []Value.
func nestedToValues(x any) ([]Value, bool) {
	conv := func(n int, at func(int) any) ([]Value, bool) {
		out := make([]Value, n)
		for i := 0; i < n; i++ {
			v, err := NewValue(at(i))
			if err != nil || v.Type != ValueArray {
				return nil, false
			}
			out[i] = v
		}
		return out, true
	}
	switch s := x.(type) {
	case [][]uint8:
		return conv(len(s), func(i int) any { return s[i] })
	case [][]int8:
		return conv(len(s), func(i int) any { return s[i] })
	case [][]uint16:
		return conv(len(s), func(i int) any { return s[i] })
	case [][]int16:
		return conv(len(s), func(i int) any { return s[i] })
	case [][]uint32:
		return conv(len(s), func(i int) any { return s[i] })
	case [][]int32:
		return conv(len(s), func(i int) any { return s[i] })
	case [][]float32:
		return conv(len(s), func(i int) any { return s[i] })
	case [][]bool:
		return conv(len(s), func(i int) any { return s[i] })
	case [][]string:
		return conv(len(s), func(i int) any { return s[i] })
	case [][]uint64:
		return conv(len(s), func(i int) any { return s[i] })
	case [][]int64:
		return conv(len(s), func(i int) any { return s[i] })
	case [][]float64:
		return conv(len(s), func(i int) any { return s[i] })
	case [][]Value:
		return conv(len(s), func(i int) any { return s[i] })
	case [][][]int32:
		return conv(len(s), func(i int) any { return s[i] })
	case [][][]string:
		return conv(len(s), func(i int) any { return s[i] })
	}
	return nil, false
}
