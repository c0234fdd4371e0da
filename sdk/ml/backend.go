// Package ml is orch's compute core: tensors, element types (including the
// GGUF block-quantized weight formats read in place) and the Backend
// interface that model code is written against once and that runs on the
// pure-Go CPU backend (sdk/ml/cpu, the reference) and the CUDA backend.
//
// # Conventions
//
// Shapes are in ggml order: Shape()[0] is the contiguous dimension. A weight
// with shape [in, out] is PyTorch's nn.Linear.weight [out, in]; an activation
// with shape [d, n] holds n rows (tokens) of d floats. Activations are F32.
//
// Tensors live on the backend's device. Weights are created with Weight and
// are never copied on the CPU (they alias the mmapped GGUF bytes); the CUDA
// backend copies them once to the device in their GGUF format.
//
// Ops are asynchronous: the CPU backend executes them immediately, the CUDA
// backend enqueues them on its stream (so a decode step can be captured into
// a CUDA graph). Ops never allocate device memory and never read tensor
// contents on the host: everything that changes per step (token ids,
// positions, slots, block tables) is a device tensor written with WriteI32
// before the ops run. Op errors (shape or type mismatch, a kernel failure)
// are sticky, in the manner of bufio.Writer: the first error is kept, later
// ops become no-ops, and Sync (or Err) returns it. Read* synchronise.
//
// Ops write into dst tensors the caller allocated; dst may be the same tensor
// as an input where the op's doc says "in place allowed".
package ml

// Tensor is a handle to device memory owned by a Backend. It is only valid
// with the backend that made it. Views (Rows, Reshape) alias their parent.
type Tensor interface {
	DType() DType
	// Shape in ggml order (Shape()[0] contiguous). Callers must not modify it.
	Shape() []int
	// Len is the number of elements.
	Len() int
}

// RopeMode selects which elements RoPE rotates together.
type RopeMode int

const (
	// RopeNormal rotates adjacent pairs (x[2i], x[2i+1]) (GPT-J, llama.cpp's
	// "normal" mode; Llama on GGUF rows, whose q/k were permuted by the converter).
	RopeNormal RopeMode = iota
	// RopeNeoX rotates halves (x[i], x[i+dims/2]) (GPT-NeoX, gpt-oss).
	RopeNeoX
)

// Rope parameterises the rotary embedding. For token t with position p and
// pair i < Dims/2: angle = p * InvFreq[i], c = cos(angle)*Scale,
// s = sin(angle)*Scale, (a, b) -> (a*c - b*s, a*s + b*c). Elements at index
// >= Dims of each head are left unchanged. Scaling schemes (YaRN, llama3,
// rope_freqs divisors) are folded into InvFreq and Scale on the host (see
// RopeInvFreq and YaRN in rope.go).
type Rope struct {
	Mode    RopeMode
	Dims    int     // rotated dimensions per head (even, <= head dim)
	InvFreq Tensor  // F32 [Dims/2]
	Scale   float32 // multiplies cos and sin (YaRN attention factor); 0 means 1
}

// Batch describes the tokens of one forward step to the attention ops. All
// tensors are I32 and device-resident; the model writes them each step.
// Token t belongs to sequence Seq[t], sits at position Pos[t] of it, and its
// K/V go to cache slot Slots[t] = Blocks[Pos[t]/BlockSize, Seq[t]]*BlockSize +
// Pos[t]%BlockSize. Token t attends to the keys of its sequence at positions
// 0..Pos[t] (causal), which must have been written (by this step's KVWrite or
// earlier steps).
type Batch struct {
	Pos       Tensor // I32 [nTok]
	Seq       Tensor // I32 [nTok]
	Slots     Tensor // I32 [nTok]
	Blocks    Tensor // I32 [maxBlocks, nSeq]: row s (contiguous) is sequence s's block table
	BlockSize int    // tokens per KV block
	// MaxPos is an upper bound of Pos[t]+1 over the batch (for kernel grid
	// sizing; a graph-captured step may pass the context length).
	MaxPos int
}

// Attention parameterises one attention layer.
type Attention struct {
	Scale float32 // multiplies q·k (usually 1/sqrt(head dim))
	// Window > 0: query at position q sees keys k with q-k < Window (sliding
	// window); 0 = full causal attention.
	Window int
	// Sinks, when non-nil, is F32 [nHead]: one extra logit per head that joins
	// the softmax denominator only (gpt-oss attention sinks).
	Sinks Tensor
}

// MoE holds the weights of a mixture-of-experts feed-forward block with E
// experts of width ff over model width d. Any *Bias may be nil.
//
// Reference semantics for each token row x: logits = x·Router + RouterBias
// ([E]); the TopK largest logits are selected (ties: lower expert index
// first); w = softmax over those TopK logits; out = sum_k w_k * expert_k(x)
// with expert_e(x) = Down_e·act(Gate_e·x + GateBias_e, Up_e·x + UpBias_e) +
// DownBias_e, act = the clamped SwiGLU (see SwiGLUOAI) with Alpha and Limit.
type MoE struct {
	Router, RouterBias Tensor // [d, E], [E]
	Gate, GateBias     Tensor // [d, ff, E], [ff, E]
	Up, UpBias         Tensor // [d, ff, E], [ff, E]
	Down, DownBias     Tensor // [ff, d, E], [d, E]
	TopK               int
	Alpha, Limit       float32 // clamped SwiGLU parameters (gpt-oss: 1.702, 7)
}

// Backend allocates device memory and runs ops. The engine calls a backend
// from one goroutine at a time; implementations need not be safe for
// concurrent use.
type Backend interface {
	// Name is "cpu" or "cuda".
	Name() string
	// DeviceName describes the device ("NVIDIA H100 80GB HBM3", "cpu (16 threads)").
	DeviceName() string
	// Close frees everything the backend allocated.
	Close() error

	// --- memory ---

	// Alloc allocates a zero-filled tensor (F32 or I32, or F16/BF16 for caches).
	Alloc(dt DType, shape ...int) (Tensor, error)
	// Weight makes a weight tensor from raw GGUF bytes in dt's block format.
	// The CPU backend aliases data (it must stay mapped until Close); the CUDA
	// backend copies it to the device. len(data) must equal the tensor's size.
	Weight(name string, dt DType, shape []int, data []byte) (Tensor, error)
	// Free releases a tensor made by Alloc or Weight (views: no-op).
	Free(t Tensor)
	// Rows returns a view of rows [start, start+n) of the outermost dimension.
	Rows(t Tensor, start, n int) (Tensor, error)
	// Reshape returns a view with another shape of the same element count.
	Reshape(t Tensor, shape ...int) (Tensor, error)
	// WriteF32 / WriteI32 copy host data into the start of t (len(src) <= t.Len()).
	// The backend copies src before returning; the caller may reuse it.
	WriteF32(t Tensor, src []float32) error
	WriteI32(t Tensor, src []int32) error
	// ReadF32 / ReadI32 wait for queued ops, then copy the first len(dst)
	// elements of t to dst. They return the sticky op error first, if any.
	ReadF32(t Tensor, dst []float32) error
	ReadI32(t Tensor, dst []int32) error
	// MemoryInfo reports free and total device bytes (0, 0 if unknown).
	MemoryInfo() (free, total int64)

	// --- synchronisation and errors ---

	// Sync waits for queued ops and returns (and clears) the first error of an
	// op since the last Sync.
	Sync() error
	// Err returns the sticky error without waiting or clearing it.
	Err() error

	// --- ops (asynchronous; see the package doc) ---

	// Embed: dst[:, i] = dequant(table[:, ids[i]]). table [d, vocab] any weight
	// type, ids I32 [n], dst F32 [d, n]. With add, the rows are added to dst
	// instead (learned positional embedding: Embed(x, posEmbd, pos, true)).
	Embed(dst, table, ids Tensor, add bool)
	// Copy: dst = src (same shape and type).
	Copy(dst, src Tensor)
	// Add: dst = a + b, element-wise, same shapes. In place allowed.
	Add(dst, a, b Tensor)
	// RMSNorm: for each row r of x [d, n]: dst[:,r] = x[:,r] / sqrt(mean(x^2)+eps) * w.
	// w F32 [d]. In place allowed.
	RMSNorm(dst, x, w Tensor, eps float32)
	// AddRMSNorm: res += x, then dst = RMSNorm(res) (fused residual + norm).
	AddRMSNorm(res, dst, x, w Tensor, eps float32)
	// LayerNorm: dst[:,r] = (x[:,r]-mean)/sqrt(var+eps) * w + b (population
	// variance). b may be nil. In place allowed.
	LayerNorm(dst, x, w, b Tensor, eps float32)
	// AddLayerNorm: res += x, then dst = LayerNorm(res).
	AddLayerNorm(res, dst, x, w, b Tensor, eps float32)
	// MatMul: dst[o, r] = sum_i x[i, r] * w[i, o] + bias[o]. x F32 [in, n],
	// w [in, out] in any weight type (read in place), bias F32 [out] or nil,
	// dst F32 [out, n]. Also the LM head.
	MatMul(dst, x, w, bias Tensor)
	// GELU (tanh form, GPT-2): 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))). In place allowed.
	GELU(dst, x Tensor)
	// SwiGLU: dst = silu(gate) * up, silu(g) = g*sigmoid(g). In place allowed.
	SwiGLU(dst, gate, up Tensor)
	// SwiGLUOAI (gpt-oss clamped SwiGLU): g = min(gate, limit),
	// u = clamp(up, -limit, limit), dst = (u+1) * g * sigmoid(alpha*g).
	SwiGLUOAI(dst, gate, up Tensor, alpha, limit float32)
	// RoPE rotates x [headDim, nHead, n] in place; pos I32 [n] (see Rope).
	RoPE(x, pos Tensor, r *Rope)
	// KVWrite stores k, v [headDim, nKV, n] into the caches at b.Slots. The
	// caches are [headDim, nKV, BlockSize, NumBlocks] (F32, or F16/BF16 on
	// backends that support it).
	KVWrite(kCache, vCache, k, v Tensor, b *Batch)
	// Attend: dst [headDim, nHead, n] = softmax(scale q·K^T [+ sink]) V over
	// the paged caches for queries q [headDim, nHead, n]; GQA/MHA: query head
	// h reads KV head h / (nHead/nKV). Causal, windowed and with sinks per a.
	Attend(dst, q, kCache, vCache Tensor, b *Batch, a *Attention)
	// MoE: dst F32 [d, n] = the mixture of experts of x [d, n] (see MoE).
	MoE(dst, x Tensor, m *MoE)
	// Argmax: dst I32 [n] = index of the largest element of each row of x
	// [v, n] (ties: lowest index).
	Argmax(dst, x Tensor)
	// CopyBlock copies block src of a cache (outermost dimension) onto block dst.
	CopyBlock(cache Tensor, dst, src int)
}

// SamplingBackend is implemented by backends that draw tokens on the device
// (session 8; sample.go holds the settings and the host reference).
type SamplingBackend interface {
	Backend
	// SampleRows: dst I32 [n] = one token per row of logits x [v, n], row i
	// drawn with the settings params holds for it (I32 [SampleParamsWords*n],
	// written with WriteI32 of PackSampleParams before the op, so a captured
	// step replays with new settings). filters must be SampleFilters of the
	// settings (or larger): it fixes the launches. The token of a row is
	// SampleRowRef's (up to float rounding in near ties), whatever the other
	// rows.
	SampleRows(dst, x, params Tensor, filters int)
	// SampleRowsAvailable reports whether SampleRows works here (a CUDA
	// library built before it lacks the kernels).
	SampleRowsAvailable() bool
}

// GraphBackend is implemented by backends that can record a step and replay
// it (CUDA graphs). Run calls record the first time key is seen (capturing
// the ops it issues) and replays the recording on later calls without calling
// record. The ops must use the same tensors each time; per-step inputs are
// written with WriteI32/WriteF32 before Run. Backends without graphs simply
// call record.
type GraphBackend interface {
	Backend
	Run(key string, record func()) error
	// ResetGraphs forgets every recording (after tensors that recorded steps
	// use were freed or reallocated).
	ResetGraphs()
}

// Discarder is implemented by backends that may skip work kept only to leave
// a tensor's contents as the ops wrote them (the CUDA backend rotates q / k
// after a RoPE it folded into the attention, and writes a norm's output it
// folded into the next GEMVs, when something touches them or a graph ends).
// Discard says the contents of ts are no longer needed: they are undefined
// afterwards, until an op writes them again; ops issued before still see
// them as written. Models call it through nn.Discard (a no-op on other
// backends) for per-step workspace that nothing reads after the step.
type Discarder interface {
	Discard(ts ...Tensor)
}

// AheadBackend is implemented by backends whose ops run on a device queue
// behind the host: a result can be copied to host memory without waiting for
// work queued after the copy. nn.Runner uses it to launch the next decode
// step before it reads this step's tokens, so the device does not idle while
// the host hands the tokens over and stages the next step.
type AheadBackend interface {
	Backend
	// StepAhead reports whether ReadI32Async works here (a library without
	// the entries, or a switch, turns it off).
	StepAhead() bool
	// ReadI32Async queues a copy of t (I32) behind the work queued so far
	// and returns at once; the values are the ones the queue's earlier work
	// left in t, whatever is queued after.
	ReadI32Async(t Tensor) (PendingI32, error)
	// AdvanceStep queues, in buf (I32, segments of seg values), the inputs
	// of the decode step after one: the first n values = src's (its tokens)
	// and, for each bit s >= 1 of inc, the first n values of segment s + 1
	// (positions, KV slots); in params (nil: none; packed SampleParams of n
	// rows) each row that draws (Temperature >= SampleMinTemperature) gets
	// Counter + 1. It reports whether it queued the update (false: the
	// caller uploads the inputs instead).
	AdvanceStep(buf Tensor, seg int, inc uint32, src, params Tensor, n int) bool
}

// PendingI32 is a queued read (AheadBackend.ReadI32Async). Exactly one of
// Wait and Drop must be called.
type PendingI32 interface {
	// Wait blocks until the copy is done and copies its values into dst
	// (len(dst) <= the tensor's length); it reports an error of the queued
	// work before the copy.
	Wait(dst []int32) error
	// Drop gives the read up without waiting for it.
	Drop()
}
