package nn

// Tensor parallelism (docs/multi-gpu.md, "Tensor parallelism"): a model
// split Size ways loads on each rank only its part of every split weight.
// How a weight splits is decided by its llama.cpp name (SplitOf), the same
// way for the builders (Weights.Part) and the memory plan
// (ShardWeightBytes), so that a rank's plan equals its load.

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/tp"
)

// PlanShard is the shard a memory plan is for: rank tp.rank (default 0) of
// tp.size when LoadOptions.Extra sets tp.size > 1 (the host may plan a split
// model before it picks an address, so tp.addr is not needed here); the
// whole model otherwise. Bad values are sdk.ErrInvalidArgument.
func PlanShard(extra map[string]string) (ml.Shard, error) {
	v, ok := extra[tp.ExtraSize]
	if !ok {
		return ml.Shard{}, nil
	}
	size, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || size < 1 {
		return ml.Shard{}, fmt.Errorf("option %s=%q: want a positive integer: %w", tp.ExtraSize, v, sdk.ErrInvalidArgument)
	}
	rank := 0
	if v, ok := extra[tp.ExtraRank]; ok {
		if rank, err = strconv.Atoi(strings.TrimSpace(v)); err != nil || rank < 0 || rank >= size {
			return ml.Shard{}, fmt.Errorf("option %s=%q: want a rank in [0,%d): %w", tp.ExtraRank, v, size, sdk.ErrInvalidArgument)
		}
	}
	return ml.Shard{Rank: rank, Size: size}, nil
}

// SplitKind says how tensor parallelism places one weight on the ranks.
type SplitKind int

const (
	// Replicate: every rank holds the whole tensor (norms, embeddings, the
	// MoE router, the LM head).
	Replicate SplitKind = iota
	// SplitDim: every rank holds 1/Size of dimension Axis (rank r the r-th
	// range): attention heads, feed-forward columns.
	SplitDim
	// LeadOnly: rank 0 holds the whole tensor, the others nothing (nil): the
	// biases added once before an all-reduce sums the ranks' partial outputs.
	LeadOnly
)

// TPSplit is how one weight splits over the ranks.
type TPSplit struct {
	Kind SplitKind
	// Axis is the split dimension (ggml order: 0 = ne0, the input columns of
	// a matrix; 1 = ne1, its output rows).
	Axis int
	// Parts > 1: dimension Axis holds Parts equal fused segments (GPT-2's
	// q|k|v: 3), each split Size ways; rank r gets its range of every segment.
	Parts int
}

// SplitOf is the split of the weight called name (llama.cpp names) for the
// served architectures (gpt-oss, llama, gpt2):
//
//   - attention by heads: attn_q/k/v weights by output rows (ne1) and their
//     biases, attn_sinks by head, GPT-2's fused attn_qkv by rows of each of
//     q, k and v; attn_output by input columns (ne0), its bias on rank 0;
//   - feed-forward by ff: ffn_gate/ffn_up (dense and the experts' *_exps,
//     inside every expert) by rows and their biases, ffn_down(_exps) by input
//     columns, its bias on rank 0;
//   - everything else replicated.
func SplitOf(name string) TPSplit {
	base := name
	if i := strings.Index(name, "."); strings.HasPrefix(name, "blk.") && i >= 0 {
		if j := strings.Index(name[i+1:], "."); j >= 0 {
			base = name[i+1+j+1:]
		}
	}
	switch base {
	case "attn_q.weight", "attn_k.weight", "attn_v.weight",
		"ffn_gate.weight", "ffn_up.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight":
		return TPSplit{Kind: SplitDim, Axis: 1}
	case "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_sinks.weight",
		"ffn_gate.bias", "ffn_up.bias", "ffn_gate_exps.bias", "ffn_up_exps.bias",
		"attn_output.weight", "ffn_down.weight", "ffn_down_exps.weight":
		return TPSplit{Kind: SplitDim, Axis: 0}
	case "attn_qkv.weight":
		return TPSplit{Kind: SplitDim, Axis: 1, Parts: 3}
	case "attn_qkv.bias":
		return TPSplit{Kind: SplitDim, Axis: 0, Parts: 3}
	case "attn_output.bias", "ffn_down.bias", "ffn_down_exps.bias":
		return TPSplit{Kind: LeadOnly}
	}
	return TPSplit{}
}

// ShardRange is rank's range [lo, hi) of n split size ways (n % size == 0).
func ShardRange(n, rank, size int) (lo, hi int) {
	if size <= 1 {
		return 0, n
	}
	k := n / size
	return rank * k, (rank + 1) * k
}

// CheckHeads checks that the attention heads split evenly (every rank
// keeps whole GQA groups: nkv % size == 0, which implies nh % size == 0).
func CheckHeads(arch string, heads, kvHeads int, s ml.Shard) error {
	if !s.Split() {
		return nil
	}
	if s.Rank < 0 || s.Rank >= s.Size {
		return fmt.Errorf("tensor-parallel rank %d of size %d: %w", s.Rank, s.Size, sdk.ErrInvalidArgument)
	}
	if kvHeads%s.Size != 0 || heads%s.Size != 0 {
		return fmt.Errorf("metadata key %s.attention.head_count_kv = %d (head_count %d): tensor-parallel size %d must divide the KV heads (GQA groups stay on one rank): %w",
			arch, kvHeads, heads, s.Size, sdk.ErrInvalidArgument)
	}
	return nil
}

// splitShape returns the local shape of a tensor of shape split sp ways by
// s, checking divisibility and block alignment (errors name the tensor, the
// dimension and the size, sdk.ErrInvalidArgument).
func splitShape(name string, dt ml.DType, shape []int, sp TPSplit, s ml.Shard) ([]int, error) {
	parts := max(sp.Parts, 1)
	if sp.Axis < 0 || sp.Axis >= len(shape) {
		return nil, fmt.Errorf("tensor %s of shape %v: no dimension %d to split: %w", name, shape, sp.Axis, sdk.ErrInvalidArgument)
	}
	n := shape[sp.Axis]
	if n%(parts*s.Size) != 0 {
		return nil, fmt.Errorf("tensor %s: dimension %d (%d) does not split %d ways (tensor-parallel size %d): %w",
			name, sp.Axis, n, parts*s.Size, s.Size, sdk.ErrInvalidArgument)
	}
	if sp.Axis == 0 {
		if bs := dt.BlockSize(); (n/parts/s.Size)%bs != 0 {
			return nil, fmt.Errorf("tensor %s: dimension 0 (%d) split %d ways is %d columns a rank, not a multiple of the %s block of %d (tensor-parallel size %d): %w",
				name, n, parts*s.Size, n/parts/s.Size, dt, bs, s.Size, sdk.ErrInvalidArgument)
		}
	}
	local := append([]int(nil), shape...)
	local[sp.Axis] = n / s.Size
	return local, nil
}

// sliceBytes returns rank s.Rank's part (split sp) of the tensor of type dt
// and shape stored in data: for every index of the dimensions above Axis,
// the rank's range of each of the Parts segments of Axis, concatenated. A
// single contiguous range aliases data (no copy); otherwise the ranges are
// gathered into a new host buffer (one copy of the rank's part only).
func sliceBytes(dt ml.DType, shape []int, data []byte, sp TPSplit, s ml.Shard) ([]byte, error) {
	parts := max(sp.Parts, 1)
	// unit: one step along Axis, in bytes; units: steps along Axis
	var unit, units int
	if sp.Axis == 0 {
		unit, units = dt.BlockBytes(), shape[0]/dt.BlockSize()
	} else {
		inner := 1
		for _, v := range shape[:sp.Axis] {
			inner *= v
		}
		var err error
		if unit, err = dt.RowBytes(inner); err != nil {
			return nil, err
		}
		units = shape[sp.Axis]
	}
	outer := 1
	for _, v := range shape[sp.Axis+1:] {
		outer *= v
	}
	if len(data) != outer*units*unit {
		return nil, fmt.Errorf("%d bytes, want %d for %s %v", len(data), outer*units*unit, dt, shape)
	}
	seg := units / parts // units of one segment
	lo, hi := ShardRange(seg, s.Rank, s.Size)
	if outer == 1 && parts == 1 {
		return data[lo*unit : hi*unit : hi*unit], nil
	}
	out := make([]byte, 0, outer*parts*(hi-lo)*unit)
	for o := range outer {
		for p := range parts {
			base := (o*units + p*seg) * unit
			out = append(out, data[base+lo*unit:base+hi*unit]...)
		}
	}
	return out, nil
}

// Part binds the weight called name (full shape in ggml order) as rank
// w.Shard.Rank holds it under SplitOf(name): the whole tensor (Replicate),
// its slice (SplitDim: the shape's Axis divided by Size) or, for LeadOnly,
// the whole tensor on rank 0 and nil elsewhere. vector binds it as F32 (see
// Vector). Without a split (Size <= 1) it is Tensor or Vector.
func (w *Weights) Part(name string, vector bool, shape ...int) (ml.Tensor, error) {
	sp := SplitOf(name)
	if !w.Shard.Split() || sp.Kind == Replicate || (sp.Kind == LeadOnly && w.Shard.Rank == 0) {
		if vector {
			return w.Vector(name, shape...)
		}
		return w.Tensor(name, shape...)
	}
	ti, err := w.info(name, shape)
	if err != nil {
		return nil, err
	}
	if sp.Kind == LeadOnly {
		return nil, nil
	}
	dt := ml.DType(ti.Type)
	local, err := splitShape(name, dt, shape, sp, w.Shard)
	if err != nil {
		return nil, err
	}
	data, err := w.File.Data(ti)
	if err != nil {
		return nil, fmt.Errorf("tensor %s: %w", name, err)
	}
	part, err := sliceBytes(dt, shape, data, sp, w.Shard)
	if err != nil {
		return nil, fmt.Errorf("tensor %s: %w", name, err)
	}
	elems := int64(1)
	for _, v := range local {
		elems *= int64(v)
	}
	if vector && dt != ml.F32 {
		vals := make([]float32, elems)
		if err := ml.DequantizeRow(dt, part, vals); err != nil {
			return nil, fmt.Errorf("tensor %s: %w", name, err)
		}
		t, err := w.Upload(vals, local...)
		if err != nil {
			return nil, fmt.Errorf("tensor %s: %w", name, err)
		}
		w.Params += elems
		return t, nil
	}
	t, err := w.B.Weight(name, dt, local, part)
	if err != nil {
		return nil, fmt.Errorf("tensor %s: %w", name, err)
	}
	w.add(t, int64(len(part)), elems)
	return t, nil
}

// OptionalPart is Part for a weight that may be absent (nil, nil then).
func (w *Weights) OptionalPart(name string, vector bool, shape ...int) (ml.Tensor, error) {
	if !w.Has(name) {
		return nil, nil
	}
	return w.Part(name, vector, shape...)
}

// ShardWeightBytes is WeightBytes for rank s.Rank of a model split s.Size
// ways under SplitOf: a split tensor counts 1/Size of its bytes, a LeadOnly
// one on rank 0 only. It equals Weights.Bytes after the builder bound every
// tensor with Part (same skip and vector predicates as WeightBytes).
func ShardWeightBytes(f *gguf.File, skip, vector func(name string) bool, s ml.Shard) int64 {
	if !s.Split() {
		return WeightBytes(f, skip, vector)
	}
	var total int64
	for _, t := range f.Tensors {
		if skip != nil && skip(t.Name) {
			continue
		}
		n := t.Size
		if vector != nil && vector(t.Name) && ml.DType(t.Type) != ml.F32 {
			n = 4 * t.Elements()
		}
		switch SplitOf(t.Name).Kind {
		case SplitDim:
			n /= int64(s.Size)
		case LeadOnly:
			if s.Rank != 0 {
				n = 0
			}
		}
		total += n
	}
	return total
}
