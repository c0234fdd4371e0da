package nn

import (
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/cpu"
	"github.com/llama-orch/orch/sdk/ml/cuda"
)

// OpenBackend returns the backend for a load request's device option:
// "cpu"; "cuda" or "cuda:N" (an error when the GPU backend is unusable);
// "auto" or "" (CUDA when usable, else CPU, logging which and why).
func OpenBackend(device string, threads int, log hclog.Logger) (ml.Backend, error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	dev := strings.ToLower(strings.TrimSpace(device))
	switch {
	case dev == "cpu":
		b := cpu.New(threads)
		log.Info("using CPU backend", "reason", "requested", "device", b.DeviceName())
		return b, nil
	case dev == "cuda" || strings.HasPrefix(dev, "cuda:"):
		idx := 0
		if s, ok := strings.CutPrefix(dev, "cuda:"); ok {
			n, err := strconv.Atoi(s)
			if err != nil || n < 0 {
				return nil, fmt.Errorf("device %q: bad GPU index: %w", device, sdk.ErrInvalidArgument)
			}
			idx = n
		}
		b, err := cuda.New(idx)
		if err != nil {
			return nil, fmt.Errorf("device %q: %w", device, err)
		}
		log.Info("using CUDA backend", "device", b.DeviceName())
		return b, nil
	case dev == "auto" || dev == "":
		if err := cuda.Available(); err != nil {
			b := cpu.New(threads)
			log.Info("using CPU backend", "reason", err.Error(), "device", b.DeviceName())
			return b, nil
		}
		b, err := cuda.New(0)
		if err != nil {
			c := cpu.New(threads)
			log.Warn("CUDA backend unusable, using CPU backend", "error", err, "device", c.DeviceName())
			return c, nil
		}
		log.Info("using CUDA backend", "device", b.DeviceName())
		return b, nil
	}
	return nil, fmt.Errorf("device %q: want auto, cpu, cuda or cuda:N: %w", device, sdk.ErrInvalidArgument)
}

// Sizing is the KV pool layout chosen for a load request.
type Sizing struct {
	Context   int // max tokens per sequence
	MaxSeqs   int
	BlockSize int
	NumBlocks int
	KVType    ml.DType // F32 unless opts.Extra["kv_type"] says f16 or bf16
	// Fraction is opts.KVCacheFraction when NumBlocks is still to be sized
	// from free memory (see FractionBlocks); 0 when NumBlocks is final
	// (no fraction, or opts.Extra["num_blocks"] set).
	Fraction float64
	// WindowBlocks (opts.Extra["window_blocks"]; 0 = sized, see KVGroups),
	// SharedKV (opts.Extra["kv_groups"] = "off") and StepTokens (the
	// engine's opts.Extra["engine.max_batch_tokens"], 0 = its default) shape
	// the KV groups.
	WindowBlocks int
	SharedKV     bool
	StepTokens   int
}

// DefaultBlockSize is the KV block size models use unless told otherwise.
const DefaultBlockSize = 16

// Size chooses the context length (the request's, capped at the trained
// context; default min(trained, 4096)), the number of sequences (the
// request's; default 4 on CPU, 16 on GPU) and NumBlocks = blocks per
// context x sequences. opts.Extra["num_blocks"] and ["block_size"] override;
// opts.Extra["kv_type"] (f32, f16, bf16) sets the KV cache type (default f16
// on cuda, f32 elsewhere). A
// KVCacheFraction in (0, 1] is kept in Sizing.Fraction (unless num_blocks
// is set): the loader and the planner then size NumBlocks from free memory
// with FractionBlocks; one outside [0, 1] is sdk.ErrInvalidArgument.
// KV groups (see KVGroups): opts.Extra["kv_groups"] ("off" keeps one shared
// pool), ["window_blocks"] (each window pool's blocks) and the engine's
// ["engine.max_batch_tokens"] (the step budget the window pools are sized
// for) are read here too.
func Size(opts sdk.LoadOptions, trained int, backend string) (Sizing, error) {
	s := Sizing{BlockSize: DefaultBlockSize}
	if fr := opts.KVCacheFraction; math.IsNaN(fr) || fr < 0 || fr > 1 {
		return s, fmt.Errorf("option kv_cache_fraction=%v (want a fraction in (0, 1], 0 = off): %w", fr, sdk.ErrInvalidArgument)
	}
	s.Fraction = opts.KVCacheFraction
	if trained <= 0 {
		trained = 4096
	}
	s.Context = min(trained, 4096)
	if opts.ContextLength > 0 {
		s.Context = min(opts.ContextLength, trained)
	}
	s.MaxSeqs = 4
	if backend == "cuda" {
		s.MaxSeqs = 16
	}
	if opts.MaxSequences > 0 {
		s.MaxSeqs = opts.MaxSequences
	}
	if v, ok := opts.Extra["block_size"]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 || n > 1024 {
			return s, fmt.Errorf("option block_size=%q: %w", v, sdk.ErrInvalidArgument)
		}
		s.BlockSize = n
	}
	s.NumBlocks = (s.Context + s.BlockSize - 1) / s.BlockSize * s.MaxSeqs
	if backend == "cuda" {
		// f16 on the GPU by default (session 8): half the attention's bytes at depth and
		// twice the sequences in the same memory (H100, gpt-oss: tg128 @ d8192 452 -> 469 tok/s,
		// x64 3,991 -> 4,085), the transformers goldens pass with it; llama.cpp's default too.
		s.KVType = ml.F16
	}
	if v, ok := opts.Extra["kv_type"]; ok {
		switch strings.ToLower(v) {
		case "f32":
			s.KVType = ml.F32
		case "f16":
			s.KVType = ml.F16
		case "bf16":
			s.KVType = ml.BF16
		default:
			return s, fmt.Errorf("option kv_type=%q (want f32, f16 or bf16): %w", v, sdk.ErrInvalidArgument)
		}
	}
	if v, ok := opts.Extra[ExtraKVGroups]; ok {
		switch strings.ToLower(v) {
		case "off", "false", "0":
			s.SharedKV = true
		case "on", "true", "1":
		default:
			return s, fmt.Errorf("option %s=%q (want on or off): %w", ExtraKVGroups, v, sdk.ErrInvalidArgument)
		}
	}
	if v, ok := opts.Extra[engine.ExtraMaxBatchTokens]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return s, fmt.Errorf("option %s=%q: want a positive integer: %w", engine.ExtraMaxBatchTokens, v, sdk.ErrInvalidArgument)
		}
		s.StepTokens = n
	}
	if v, ok := opts.Extra[ExtraWindowBlocks]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return s, fmt.Errorf("option %s=%q: %w", ExtraWindowBlocks, v, sdk.ErrInvalidArgument)
		}
		s.WindowBlocks = n
	}
	if v, ok := opts.Extra["num_blocks"]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return s, fmt.Errorf("option num_blocks=%q: %w", v, sdk.ErrInvalidArgument)
		}
		s.NumBlocks = n
		s.Fraction = 0 // an explicit pool size wins
	}
	return s, nil
}

// Scratch allocates activation buffers at a fixed capacity and hands out
// views sized to each step. The first allocation error is kept.
type Scratch struct {
	B   ml.Backend
	Err error
	ts  []ml.Tensor
}

// Alloc allocates an F32 tensor (ggml order; the last dimension is the token capacity).
func (s *Scratch) Alloc(shape ...int) ml.Tensor {
	if s.Err != nil {
		return nil
	}
	t, err := s.B.Alloc(ml.F32, shape...)
	if err != nil {
		s.Err = fmt.Errorf("activation buffer %v: %w", shape, err)
		return nil
	}
	s.ts = append(s.ts, t)
	return t
}

// Free releases every buffer.
func (s *Scratch) Free() {
	for _, t := range s.ts {
		s.B.Free(t)
	}
	s.ts = nil
}

// View returns the first n tokens of t (shape [..., n]) reshaped to shape
// (the last element of shape is replaced by n; nil keeps t's inner dims).
func View(b ml.Backend, t ml.Tensor, n int, shape ...int) (ml.Tensor, error) {
	v, err := b.Rows(t, 0, n)
	if err != nil {
		return nil, err
	}
	if len(shape) == 0 {
		return v, nil
	}
	s := append([]int(nil), shape...)
	s[len(s)-1] = n
	return b.Reshape(v, s...)
}
