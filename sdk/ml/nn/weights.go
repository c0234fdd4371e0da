// Package nn holds the building blocks model code shares on top of sdk/ml:
// binding GGUF tensors to backend weights with shape checks (errors name the
// tensor), reading hyperparameters (errors name the key), the paged KV cache,
// staging an engine.Batch into device tensors, and Runner, which turns an
// architecture's layer code (Net) into an engine.Model. It also picks the
// backend for a load request (CUDA when usable, else CPU), and splits a
// model over tensor-parallel ranks (shard.go: which part of every weight a
// rank binds, its memory plan, and LoaderWith's rank setup over sdk/tp).
package nn

import (
	"fmt"
	"slices"

	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/ml"
)

// Weights binds tensors of a GGUF file to a backend.
type Weights struct {
	File    *gguf.File
	B       ml.Backend
	Bytes   int64 // bytes of the weights bound so far
	Params  int64 // elements of the weights bound so far
	tensors []ml.Tensor
	// Shard places the model in a tensor-parallel group: Part binds this
	// rank's part of each split weight (zero value: the whole model).
	Shard ml.Shard
	// Progress, when set, is called after each tensor with the bytes bound so far.
	Progress func(done int64)
}

// NewWeights returns a binder for f on b.
func NewWeights(f *gguf.File, b ml.Backend) *Weights { return &Weights{File: f, B: b} }

// Has reports whether the file holds a tensor called name.
func (w *Weights) Has(name string) bool { _, ok := w.File.Tensor(name); return ok }

// Shape returns a tensor's shape (ggml order) or an error naming it.
func (w *Weights) Shape(name string) ([]int, error) {
	ti, ok := w.File.Tensor(name)
	if !ok {
		return nil, fmt.Errorf("missing tensor %s", name)
	}
	return intShape(ti), nil
}

func intShape(ti *gguf.TensorInfo) []int {
	out := make([]int, len(ti.Shape))
	for i, v := range ti.Shape {
		out[i] = int(v)
	}
	return out
}

func trimOnes(s []int) []int {
	for len(s) > 1 && s[len(s)-1] == 1 {
		s = s[:len(s)-1]
	}
	return s
}

func (w *Weights) info(name string, shape []int) (*gguf.TensorInfo, error) {
	ti, ok := w.File.Tensor(name)
	if !ok {
		return nil, fmt.Errorf("missing tensor %s", name)
	}
	got := intShape(ti)
	if !slices.Equal(trimOnes(got), trimOnes(slices.Clone(shape))) {
		return nil, fmt.Errorf("tensor %s has shape %v, want %v", name, got, shape)
	}
	if !ml.DType(ti.Type).Known() || ml.DType(ti.Type) == ml.I32 {
		return nil, fmt.Errorf("tensor %s: unsupported type %s", name, ti.Type)
	}
	return ti, nil
}

// Tensor binds the weight called name, which must have the given shape (ggml
// order), in its stored type (read in place).
func (w *Weights) Tensor(name string, shape ...int) (ml.Tensor, error) {
	ti, err := w.info(name, shape)
	if err != nil {
		return nil, err
	}
	data, err := w.File.Data(ti)
	if err != nil {
		return nil, fmt.Errorf("tensor %s: %w", name, err)
	}
	t, err := w.B.Weight(name, ml.DType(ti.Type), shape, data)
	if err != nil {
		return nil, fmt.Errorf("tensor %s: %w", name, err)
	}
	w.add(t, int64(len(data)), ti.Elements())
	return t, nil
}

func (w *Weights) add(t ml.Tensor, bytes, n int64) {
	w.tensors = append(w.tensors, t)
	w.Bytes += bytes
	w.Params += n
	if w.Progress != nil {
		w.Progress(w.Bytes)
	}
}

// Host decodes the tensor called name (shape checked) to float32 on the host.
func (w *Weights) Host(name string, shape ...int) ([]float32, error) {
	ti, err := w.info(name, shape)
	if err != nil {
		return nil, err
	}
	data, err := w.File.Data(ti)
	if err != nil {
		return nil, fmt.Errorf("tensor %s: %w", name, err)
	}
	out := make([]float32, ti.Elements())
	if err := ml.DequantizeRow(ml.DType(ti.Type), data, out); err != nil {
		return nil, fmt.Errorf("tensor %s: %w", name, err)
	}
	return out, nil
}

// Vector binds a small tensor (norm weights, biases, sinks) as F32, decoding
// it on the host first when the file stores another type.
func (w *Weights) Vector(name string, shape ...int) (ml.Tensor, error) {
	ti, err := w.info(name, shape)
	if err != nil {
		return nil, err
	}
	if ml.DType(ti.Type) == ml.F32 {
		return w.Tensor(name, shape...)
	}
	vals, err := w.Host(name, shape...)
	if err != nil {
		return nil, err
	}
	t, err := w.Upload(vals, shape...)
	if err != nil {
		return nil, fmt.Errorf("tensor %s: %w", name, err)
	}
	w.Params += int64(len(vals))
	return t, nil
}

// OptionalVector is Vector for a tensor that may be absent (nil, nil then).
func (w *Weights) OptionalVector(name string, shape ...int) (ml.Tensor, error) {
	if !w.Has(name) {
		return nil, nil
	}
	return w.Vector(name, shape...)
}

// Upload makes an F32 tensor holding vals (tracked for Close).
func (w *Weights) Upload(vals []float32, shape ...int) (ml.Tensor, error) {
	t, err := w.B.Alloc(ml.F32, shape...)
	if err != nil {
		return nil, err
	}
	if err := w.B.WriteF32(t, vals); err != nil {
		w.B.Free(t)
		return nil, err
	}
	w.add(t, int64(4*len(vals)), 0)
	return t, nil
}

// Close frees every bound tensor.
func (w *Weights) Close() {
	for _, t := range w.tensors {
		w.B.Free(t)
	}
	w.tensors = nil
}

// Hparams reads architecture hyperparameters ("<arch>.<suffix>") with
// errors naming the key.
type Hparams struct {
	File *gguf.File
	Arch string
}

func (h Hparams) key(s string) string { return h.Arch + "." + s }

// Int returns a required positive integer.
func (h Hparams) Int(suffix string) (int, error) {
	v, ok := h.File.Uint(h.key(suffix))
	if !ok {
		if _, present := h.File.Get(h.key(suffix)); present {
			return 0, fmt.Errorf("metadata key %s: not a non-negative integer", h.key(suffix))
		}
		return 0, fmt.Errorf("missing metadata key %s", h.key(suffix))
	}
	if v == 0 || v > 1<<31 {
		return 0, fmt.Errorf("metadata key %s = %d: out of range", h.key(suffix), v)
	}
	return int(v), nil
}

// IntOr returns an optional integer (def when absent; 0 is allowed).
func (h Hparams) IntOr(suffix string, def int) (int, error) {
	if _, present := h.File.Get(h.key(suffix)); !present {
		return def, nil
	}
	v, ok := h.File.Uint(h.key(suffix))
	if !ok || v > 1<<31 {
		return 0, fmt.Errorf("metadata key %s: not a valid integer", h.key(suffix))
	}
	return int(v), nil
}

// FloatOr returns an optional float (def when absent).
func (h Hparams) FloatOr(suffix string, def float64) (float64, error) {
	if _, present := h.File.Get(h.key(suffix)); !present {
		return def, nil
	}
	v, ok := h.File.Float(h.key(suffix))
	if !ok {
		return 0, fmt.Errorf("metadata key %s: not a number", h.key(suffix))
	}
	return v, nil
}

// StringOr returns an optional string (def when absent).
func (h Hparams) StringOr(suffix string, def string) (string, error) {
	if _, present := h.File.Get(h.key(suffix)); !present {
		return def, nil
	}
	v, ok := h.File.String(h.key(suffix))
	if !ok {
		return "", fmt.Errorf("metadata key %s: not a string", h.key(suffix))
	}
	return v, nil
}
