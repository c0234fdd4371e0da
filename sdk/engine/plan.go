package engine

import (
	"context"
	"fmt"

	"github.com/llama-orch/orch/sdk"
)

// PlanFunc computes what loading req would need on its device, before
// loading anything. An architecture provides one next to its Loader and passes
// it with WithPlanner; the adapter then implements sdk.Planner and the host
// can refuse or place a model with a clear message instead of failing midway.
type PlanFunc func(ctx context.Context, req sdk.LoadRequest) (sdk.MemoryPlan, error)

// KVRequest describes the KV cache a load asks for.
type KVRequest struct {
	BlockBytes    int64   // bytes of one KV block (all layers)
	BlockSize     int     // tokens per block
	ContextLength int     // tokens per sequence
	MaxSequences  int     // concurrent sequences (>= 1)
	Fraction      float64 // fraction of free memory (after weights and workspace) to use; 0 = exactly what ContextLength x MaxSequences needs
}

// PlanKV sizes the KV pool in blocks. With a Fraction of free memory
// (free > 0) the pool takes that share of what is left after the weights and
// workspace, but never less than one full-context sequence; without one it
// holds ContextLength tokens for each of MaxSequences sequences.
func PlanKV(r KVRequest, free, weights, workspace int64) (blocks int, err error) {
	if r.BlockBytes <= 0 || r.BlockSize <= 0 || r.ContextLength <= 0 {
		return 0, fmt.Errorf("plan KV: block of %d bytes / %d tokens, context %d: %w",
			r.BlockBytes, r.BlockSize, r.ContextLength, sdk.ErrInvalidArgument)
	}
	perSeq := (r.ContextLength + r.BlockSize - 1) / r.BlockSize
	want := perSeq * max(r.MaxSequences, 1)
	if r.Fraction > 0 && free > 0 {
		left := free - weights - workspace
		byFrac := int(float64(left) * r.Fraction / float64(r.BlockBytes))
		want = max(byFrac, perSeq)
	}
	return want, nil
}

// Plan builds a MemoryPlan and checks it against the free memory; it returns
// the plan and an *sdk.OutOfMemoryError when free > 0 and the plan does not fit.
func Plan(device string, weights int64, kvBlocks int, blockBytes, workspace, free int64) (sdk.MemoryPlan, error) {
	return PlanBytes(device, weights, int64(kvBlocks)*blockBytes, workspace, free)
}

// PlanBytes is Plan with the KV bytes given (e.g. the sum over KV groups,
// Spec.KVBytes).
func PlanBytes(device string, weights, kvBytes, workspace, free int64) (sdk.MemoryPlan, error) {
	p := sdk.MemoryPlan{
		Device:         device,
		WeightBytes:    weights,
		KVBytes:        kvBytes,
		WorkspaceBytes: workspace,
		FreeBytes:      free,
	}
	if free > 0 && p.Total() > free {
		return p, &sdk.OutOfMemoryError{Device: device, Requested: p.Total(), Free: free}
	}
	return p, nil
}
