package nn

// KV groups: layers whose attention has a sliding window keep their KV in a
// pool of their own, sized for the window instead of the context (see
// sdk/engine's package doc for how the scheduler fills and trims it). A
// model declares per-layer windows (Model.LayerWindows); KVGroups turns
// them into groups, the same way for the loader (Finish) and the planner
// (sizeFor), so that plan == load.

import (
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
)

// KVGroup is a set of layers sharing a KV block pool (see engine.KVGroup).
type KVGroup struct {
	Window    int   // 0: full attention
	Layers    []int // layer indices
	NumBlocks int   // blocks of the group's pool
}

// EnvKVGroups names the environment switch that turns KV groups off
// ("off" or "0"): every layer then shares one pool and one table, as before
// groups existed (the fallback if the grouped path misbehaves on a device).
const EnvKVGroups = "ORCH_KV_GROUPS"

// ExtraKVGroups is the LoadOptions.Extra key with the same effect ("off" /
// "on"); ExtraWindowBlocks sets the blocks of each window pool.
const (
	ExtraKVGroups     = "kv_groups"
	ExtraWindowBlocks = "window_blocks"
)

func kvGroupsOff() bool {
	v := strings.ToLower(strings.TrimSpace(os.Getenv(EnvKVGroups)))
	return v == "off" || v == "0" || v == "false"
}

// WindowBlocks is the default pool of a window group for seqs sequences
// sharing steps of stepTokens tokens. A sequence whose step takes n tokens
// from position c holds the blocks from (c-W+1)/bs to (c+n-1)/bs: at most
// floor((n+W-2)/bs)+2. Summed over the sequences of a step (the n add up to
// at most stepTokens) that is at most floor((stepTokens+seqs*(W-2))/bs) +
// 2*seqs; one more for a copy-on-write in flight. Never more than seqs whole
// contexts (and a block each) need.
func WindowBlocks(window, blockSize, stepTokens, context, seqs int) int {
	seqs = max(seqs, 1)
	n := (stepTokens+seqs*max(window-2, 0))/blockSize + 2*seqs + 1
	return min(n, seqs*((context+blockSize-1)/blockSize+1))
}

// stepTokens is the engine's token budget per step for o: o.StepTokens, or
// the engine's default, max(engine.DefaultMaxBatchTokens, sequences).
func stepTokens(o Options, seqs int) int {
	if o.StepTokens > 0 {
		return max(o.StepTokens, seqs)
	}
	return max(engine.DefaultMaxBatchTokens, seqs)
}

// KVGroups groups layers by their window for normalized options o: group 0
// holds the full-attention layers with o.NumBlocks blocks, then one group
// per distinct window (in order of first appearance) with o.WindowBlocks
// blocks, or WindowBlocks(...) for o.MaxSequences sequences. Without
// either (a direct caller of Load, not the engine's loader) a window pool
// has o.NumBlocks blocks, so that one table (SeqInput.Blocks) fits every
// group's pool as before; the savings come with the loader, which always
// sets MaxSequences. nil — one shared pool — when no layer
// has a window, when o.SharedKV is set or the ORCH_KV_GROUPS switch is off,
// and when no layer attends fully (the engine's group 0 is a full group:
// such a model keeps the shared pool of before).
func KVGroups(layerWindows []int, o Options) []KVGroup {
	if o.SharedKV || kvGroupsOff() || !slices.ContainsFunc(layerWindows, func(w int) bool { return w > 0 }) {
		return nil
	}
	var groups []KVGroup
	seqs := o.MaxSequences
	for i, w := range layerWindows {
		w = max(w, 0)
		j := slices.IndexFunc(groups, func(g KVGroup) bool { return g.Window == w })
		if j < 0 {
			nb := o.NumBlocks
			if w > 0 {
				switch {
				case o.WindowBlocks > 0:
					nb = o.WindowBlocks
				case seqs > 0:
					nb = WindowBlocks(w, o.BlockSize, stepTokens(o, seqs), o.ContextLength, seqs)
				}
			}
			groups = append(groups, KVGroup{Window: w, NumBlocks: nb})
			j = len(groups) - 1
		}
		groups[j].Layers = append(groups[j].Layers, i)
	}
	k := slices.IndexFunc(groups, func(g KVGroup) bool { return g.Window == 0 })
	if k < 0 {
		return nil
	}
	full := groups[k]
	return append([]KVGroup{full}, slices.Delete(groups, k, k+1)...)
}

// NewGroupedKVCache allocates a cache whose layers belong to groups (see
// KVGroups): layer i's K and V have the blocks of its group's pool. nil
// groups is NewKVCache with numBlocks.
func NewGroupedKVCache(b ml.Backend, dt ml.DType, layers, headDim, kvHeads, blockSize, numBlocks int, groups []KVGroup) (*KVCache, error) {
	if len(groups) == 0 {
		return NewKVCache(b, dt, layers, headDim, kvHeads, blockSize, numBlocks)
	}
	group := make([]int, layers)
	seen := make([]bool, layers)
	for g, kg := range groups {
		if kg.NumBlocks <= 0 {
			return nil, fmt.Errorf("kv cache: group %d (window %d): %d blocks", g, kg.Window, kg.NumBlocks)
		}
		for _, l := range kg.Layers {
			if l < 0 || l >= layers || seen[l] {
				return nil, fmt.Errorf("kv cache: group %d: layer %d outside [0,%d) or in two groups", g, l, layers)
			}
			seen[l], group[l] = true, g
		}
	}
	if i := slices.Index(seen, false); i >= 0 {
		return nil, fmt.Errorf("kv cache: layer %d in no group", i)
	}
	if err := checkKVDims(dt, layers, headDim, kvHeads, blockSize, groups[0].NumBlocks); err != nil {
		return nil, err
	}
	c := &KVCache{DType: dt, HeadDim: headDim, KVHeads: kvHeads, BlockSize: blockSize, NumBlocks: groups[0].NumBlocks,
		Groups: groups, Group: group}
	if err := c.allocLayers(b, layers, func(l int) int { return groups[group[l]].NumBlocks }); err != nil {
		return nil, err
	}
	return c, nil
}

// GroupBlockBytes is the size of one block of group g over its layers (K
// and V); without groups, BlockBytes.
func (c *KVCache) GroupBlockBytes(g int) int64 {
	if len(c.Groups) == 0 {
		return c.BlockBytes()
	}
	return KVBlockBytes(c.DType, len(c.Groups[g].Layers), c.HeadDim, c.KVHeads, c.BlockSize)
}

// Bytes is the device memory of the whole cache.
func (c *KVCache) Bytes() int64 {
	if len(c.Groups) == 0 {
		return c.BlockBytes() * int64(c.NumBlocks)
	}
	var n int64
	for g, kg := range c.Groups {
		n += c.GroupBlockBytes(g) * int64(kg.NumBlocks)
	}
	return n
}

// EngineGroups describes the cache's groups to the engine (nil without groups).
func (c *KVCache) EngineGroups() []engine.KVGroup {
	var out []engine.KVGroup
	for g, kg := range c.Groups {
		name := "full"
		if kg.Window > 0 {
			name = fmt.Sprintf("window %d", kg.Window)
		}
		out = append(out, engine.KVGroup{Name: name, Window: kg.Window, Layers: len(kg.Layers),
			NumBlocks: kg.NumBlocks, BlockBytes: c.GroupBlockBytes(g)})
	}
	return out
}

// GroupKVBytes is what a grouped cache of these dimensions takes: group 0's
// block bytes (the engine's KVBlockBytes) and the bytes of the other groups'
// pools (fixed, whatever group 0's pool). Without groups: all layers' block
// bytes and 0.
func GroupKVBytes(dt ml.DType, layers, headDim, kvHeads, blockSize int, groups []KVGroup) (blockBytes, rest int64) {
	if len(groups) == 0 {
		return KVBlockBytes(dt, layers, headDim, kvHeads, blockSize), 0
	}
	for g, kg := range groups {
		bb := KVBlockBytes(dt, len(kg.Layers), headDim, kvHeads, blockSize)
		if g == 0 {
			blockBytes = bb
			continue
		}
		rest += bb * int64(kg.NumBlocks)
	}
	return blockBytes, rest
}
