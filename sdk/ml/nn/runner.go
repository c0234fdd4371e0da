package nn

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"sync/atomic"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
)

// KVCache is a paged KV cache: per layer, K and V tensors of shape
// [headDim, kvHeads, BlockSize, NumBlocks] (F32, or F16/BF16 where the
// backend supports it).
//
// With KV groups (NewGroupedKVCache), layer i belongs to group Group[i] and
// its tensors have Groups[Group[i]].NumBlocks blocks; NumBlocks is group 0's.
type KVCache struct {
	DType     ml.DType
	K, V      []ml.Tensor
	HeadDim   int
	KVHeads   int
	BlockSize int
	NumBlocks int
	Groups    []KVGroup // nil: one pool for all layers
	Group     []int     // KV group of each layer (nil without groups)
}

func checkKVDims(dt ml.DType, layers, headDim, kvHeads, blockSize, numBlocks int) error {
	if layers <= 0 || headDim <= 0 || kvHeads <= 0 || blockSize <= 0 || numBlocks <= 0 {
		return fmt.Errorf("kv cache: %d layers, head dim %d, %d kv heads, %d blocks of %d", layers, headDim, kvHeads, numBlocks, blockSize)
	}
	if dt != ml.F32 && dt != ml.F16 && dt != ml.BF16 {
		return fmt.Errorf("kv cache: type %s (want F32, F16 or BF16): %w", dt, sdk.ErrInvalidArgument)
	}
	return nil
}

// NewKVCache allocates the cache for layers layers in type dt (F32, F16 or
// BF16; the CPU backend takes F32 only).
func NewKVCache(b ml.Backend, dt ml.DType, layers, headDim, kvHeads, blockSize, numBlocks int) (*KVCache, error) {
	if err := checkKVDims(dt, layers, headDim, kvHeads, blockSize, numBlocks); err != nil {
		return nil, err
	}
	c := &KVCache{DType: dt, HeadDim: headDim, KVHeads: kvHeads, BlockSize: blockSize, NumBlocks: numBlocks}
	if err := c.allocLayers(b, layers, func(int) int { return numBlocks }); err != nil {
		return nil, err
	}
	return c, nil
}

// allocLayers allocates K and V of layers layers, layer l with blocks(l)
// blocks; on failure it frees everything allocated so far.
func (c *KVCache) allocLayers(b ml.Backend, layers int, blocks func(l int) int) error {
	for l := range layers {
		k, err := b.Alloc(c.DType, c.HeadDim, c.KVHeads, c.BlockSize, blocks(l))
		if err != nil {
			c.Free(b)
			return fmt.Errorf("kv cache: %w", err)
		}
		v, err := b.Alloc(c.DType, c.HeadDim, c.KVHeads, c.BlockSize, blocks(l))
		if err != nil {
			b.Free(k)
			c.Free(b)
			return fmt.Errorf("kv cache: %w", err)
		}
		c.K, c.V = append(c.K, k), append(c.V, v)
	}
	return nil
}

// BlockBytes is the size of one block over all layers (K and V); with KV
// groups, over group 0's layers (the engine's Spec.KVBlockBytes).
func (c *KVCache) BlockBytes() int64 {
	layers := len(c.K)
	if len(c.Groups) > 0 {
		layers = len(c.Groups[0].Layers)
	}
	return KVBlockBytes(c.DType, layers, c.HeadDim, c.KVHeads, c.BlockSize)
}

// Free releases the cache.
func (c *KVCache) Free(b ml.Backend) {
	for i := range c.K {
		b.Free(c.K[i])
		b.Free(c.V[i])
	}
	c.K, c.V = nil, nil
}

// Piece is the host-side plan of one forward sub-batch: at most MaxTokens
// tokens of one or more sequences.
//
// With KV groups, GroupSlots[g-1] and GroupBlocks[g-1] are the slots and
// block tables of group g (laid out as Slots and Blocks; entries of blocks
// a window group's tokens cannot see are 0, never read).
type Piece struct {
	Tokens, Pos, Seq, Slots []int32
	Blocks                  []int32 // [MaxBlocks, NSeq] (row s contiguous)
	MaxBlocks, NSeq         int
	OutRows                 []int32 // token indices whose logits are returned
	OutOwner                []int   // for each OutRows entry: index of the engine.SeqInput
	GroupSlots, GroupBlocks [][]int32
}

// Split validates b and cuts it into pieces of at most maxTokens tokens,
// keeping each sequence's tokens in order (a long prefill chunk spans several
// pieces; earlier pieces write the KV later ones read).
func Split(b *engine.Batch, vocab, blockSize, numBlocks, maxTokens int) ([]Piece, error) {
	return split(b, vocab, blockSize, []KVGroup{{NumBlocks: numBlocks}}, maxTokens)
}

// groupTable returns sequence s's table for group g (of groups) covering
// need blocks, validated for the blocks its tokens can see; entries below
// those (a window group's freed blocks, -1) become 0 in a copy.
func groupTable(i int, s *engine.SeqInput, g int, kg KVGroup, ng, blockSize, need int) ([]int32, error) {
	grp := ""
	if ng > 1 {
		grp = fmt.Sprintf(" (KV group %d)", g)
	}
	t := s.Blocks
	if g > 0 && s.GroupBlocks != nil {
		if len(s.GroupBlocks) != ng {
			return nil, fmt.Errorf("sequence %d: %d group block tables for %d KV groups: %w", i, len(s.GroupBlocks), ng, sdk.ErrInvalidArgument)
		}
		t = s.GroupBlocks[g]
	}
	if len(t) < need {
		return nil, fmt.Errorf("sequence %d: %d blocks cover %d positions, need %d%s: %w",
			i, len(t), len(t)*blockSize, s.Pos+len(s.Tokens), grp, sdk.ErrInvalidArgument)
	}
	t = t[:need]
	lo := 0
	if kg.Window > 0 {
		lo = max(0, s.Pos-kg.Window+1) / blockSize
	}
	for _, blk := range t[lo:] {
		if blk < 0 || int(blk) >= kg.NumBlocks {
			return nil, fmt.Errorf("sequence %d: block %d outside [0,%d)%s: %w", i, blk, kg.NumBlocks, grp, sdk.ErrInvalidArgument)
		}
	}
	for j, blk := range t[:lo] {
		if blk < 0 || int(blk) >= kg.NumBlocks {
			t = slices.Clone(t)
			for k := j; k < lo; k++ {
				if t[k] < 0 || int(t[k]) >= kg.NumBlocks {
					t[k] = 0 // never read: outside every token's window
				}
			}
			break
		}
	}
	return t, nil
}

// split is Split over KV groups (groups[0] is the pool of Blocks).
func split(b *engine.Batch, vocab, blockSize int, groups []KVGroup, maxTokens int) ([]Piece, error) {
	if b == nil || len(b.Seqs) == 0 {
		return nil, fmt.Errorf("empty batch: %w", sdk.ErrInvalidArgument)
	}
	ng := len(groups)
	var pieces []Piece
	cur := Piece{}
	var tables [][][]int32 // block tables of each sequence of cur, per group
	last := -1             // SeqInput index of cur's last sequence (a sequence's tokens are consecutive)
	seqTables := make([][]int32, ng)
	finish := func() {
		if len(cur.Tokens) == 0 {
			return
		}
		mb := 1
		for _, t := range tables {
			mb = max(mb, len(t[0]))
		}
		cur.MaxBlocks, cur.NSeq = mb, len(tables)
		flat := func(g int) []int32 {
			out := make([]int32, mb*len(tables))
			for s, t := range tables {
				copy(out[s*mb:], t[g])
			}
			return out
		}
		cur.Blocks = flat(0)
		for g := 1; g < ng; g++ {
			cur.GroupBlocks = append(cur.GroupBlocks, flat(g))
		}
		pieces = append(pieces, cur)
		cur, tables, last = Piece{}, nil, -1
		if ng > 1 {
			cur.GroupSlots = make([][]int32, ng-1)
		}
	}
	if ng > 1 {
		cur.GroupSlots = make([][]int32, ng-1)
	}
	for i, s := range b.Seqs {
		if len(s.Tokens) == 0 {
			return nil, fmt.Errorf("sequence %d: no tokens: %w", i, sdk.ErrInvalidArgument)
		}
		if s.Pos < 0 {
			return nil, fmt.Errorf("sequence %d: position %d: %w", i, s.Pos, sdk.ErrInvalidArgument)
		}
		end := s.Pos + len(s.Tokens)
		need := (end + blockSize - 1) / blockSize
		for g, kg := range groups {
			t, err := groupTable(i, &b.Seqs[i], g, kg, ng, blockSize, need)
			if err != nil {
				return nil, err
			}
			seqTables[g] = t
		}
		for j, tok := range s.Tokens {
			if tok < 0 || int(tok) >= vocab {
				return nil, fmt.Errorf("sequence %d: token %d = %d outside the vocabulary of %d: %w", i, j, tok, vocab, sdk.ErrInvalidArgument)
			}
		}
		for j, tok := range s.Tokens {
			if len(cur.Tokens) == maxTokens {
				finish()
			}
			if last != i {
				last = i
				tables = append(tables, slices.Clone(seqTables))
			}
			si := len(tables) - 1
			p := s.Pos + j
			t := int32(len(cur.Tokens))
			cur.Tokens = append(cur.Tokens, tok)
			cur.Pos = append(cur.Pos, int32(p))
			cur.Seq = append(cur.Seq, int32(si))
			cur.Slots = append(cur.Slots, seqTables[0][p/blockSize]*int32(blockSize)+int32(p%blockSize))
			for g := 1; g < ng; g++ {
				cur.GroupSlots[g-1] = append(cur.GroupSlots[g-1], seqTables[g][p/blockSize]*int32(blockSize)+int32(p%blockSize))
			}
			if s.AllLogits || j == len(s.Tokens)-1 {
				cur.OutRows = append(cur.OutRows, t)
				cur.OutOwner = append(cur.OutOwner, i)
			}
		}
	}
	finish()
	return pieces, nil
}

// Staged is one piece uploaded to the device: views sized to the piece.
type Staged struct {
	N      int       // tokens
	Tokens ml.Tensor // I32 [N]
	Batch  ml.Batch
	OutIdx ml.Tensor // I32 [len(OutRows)]
	NOut   int
	KV     *KVCache // the model's cache
	// GroupBatch[g-1] is the Batch of KV group g (its slots and block
	// tables; Pos and Seq are Batch's). Nets pass LayerBatch(i) to layer
	// i's KVWrite and Attend.
	GroupBatch []ml.Batch
}

// LayerBatch is the Batch layer i's KVWrite and Attend take: its KV group's
// (Batch without groups).
func (st *Staged) LayerBatch(i int) *ml.Batch {
	if st.KV == nil || len(st.GroupBatch) == 0 {
		return &st.Batch
	}
	if g := st.KV.Group[i]; g > 0 {
		return &st.GroupBatch[g-1]
	}
	return &st.Batch
}

// Net is an architecture's forward pass over staged tokens.
type Net interface {
	// Hidden runs the layers for st's tokens and returns the final hidden
	// states [d, st.N] before the output norm.
	Hidden(st *Staged) (ml.Tensor, error)
	// Head writes logits [vocab, m] of hidden rows [d, m] (output norm and LM head).
	Head(dst, rows ml.Tensor) error
	// Close frees the net's weights and buffers.
	Close() error
}

// RunnerConfig sizes a Runner.
type RunnerConfig struct {
	Spec      engine.Spec
	Width     int // hidden size d
	MaxTokens int // tokens per internal sub-batch (0 = 256)
	// NoGraphs disables step capture and replay on backends that support it
	// (decode steps are otherwise replayed as graphs, keyed by batch size).
	NoGraphs bool
	// Comm, when set, is the tensor-parallel group the net's all-reduces go
	// through: a step whose collective failed returns Comm.Err(), and a Comm
	// that cannot be recorded in a graph (!Graphable, the host all-reduce)
	// turns step capture off as NoGraphs does.
	Comm ml.Comm
}

// Runner implements engine.Model on top of a Net: it splits batches, stages
// per-step tensors, gathers the requested rows and reads the logits back.
type Runner struct {
	B   ml.Backend
	KV  *KVCache
	Net Net
	cfg RunnerConfig
	// OwnBackend: Close also closes B. File, when set, is closed last (the
	// mmapped GGUF the CPU weights alias).
	OwnBackend bool
	File       io.Closer
	// OwnComm: Close also closes the tensor-parallel Comm (before the
	// backend, whose device a collective may use).
	OwnComm bool
	// Params and WeightBytes describe the bound weights (for sdk.ModelInfo).
	Params, WeightBytes int64

	tokens, pos, seq, slots, outIdx ml.Tensor          // I32 [MaxTokens] each: views of inputs
	inputs                          ml.Tensor          // I32 [(5 + KV groups - 1) * MaxTokens]: the per-token inputs, one upload a step
	inBuf                           []int32            // stage's host image of inputs (reused)
	argmax                          ml.Tensor          // I32 [MaxTokens] (the device's tokens: argmax or sampled)
	params                          ml.Tensor          // I32 [ml.SampleParamsWords * MaxTokens]: per-row sampling settings
	sampler                         ml.SamplingBackend // B when it samples on the device, else nil
	blocks                          ml.Tensor          // I32, grown on demand
	gathered, logits                ml.Tensor          // F32 [d, MaxTokens], [vocab, chunk]
	logitRows                       int
	graphs                          ml.GraphBackend // nil: the backend cannot replay steps
	id                              uint64          // namespaces this runner's graph keys on a shared backend
	tableBlocks                     int             // block-table rows of a captured decode step
	groups                          []KVGroup       // the cache's KV groups (one, of Spec.NumBlocks, without)
	gslots, gblocks                 []ml.Tensor     // slots and block tables of groups 1.. (I32, as slots and blocks)
	// staged: what stage last wrote into each input tensor (host copies), so
	// that a step uploads only the span that changed (upload)
	staged map[ml.Tensor][]int32
	// ab: the backend when decode steps may be launched ahead (ahead.go);
	// next: the step launched ahead, nil when none
	ab                       ml.AheadBackend
	next                     *ahead
	aheadLaunched, aheadHits atomic.Int64 // AheadStats (read by tests and logs while steps run)
	aheadHist                uint32       // the last outcomes (bit set: a miss), aheadSeen of them recorded
	aheadSeen, aheadPause    int          // aheadPause: candidates left without a step launched ahead
	// noPosBuckets: decode graphs recorded for the whole context
	// (ORCH_GRAPH_POS_BUCKETS=0, for A/Bs; see launch)
	noPosBuckets bool
}

var (
	_ engine.GreedyModel   = (*Runner)(nil)
	_ engine.GroupModel    = (*Runner)(nil)
	_ engine.SamplingModel = (*Runner)(nil)
)

// runnerIDs numbers runners: a captured decode graph bakes in one model's
// buffers, so two models sharing a backend must never replay each other's.
var runnerIDs atomic.Uint64

// NewRunner makes a Runner; it allocates the staging tensors.
func NewRunner(b ml.Backend, kv *KVCache, net Net, cfg RunnerConfig) (*Runner, error) {
	if cfg.MaxTokens <= 0 {
		cfg.MaxTokens = 256
	}
	r := &Runner{B: b, KV: kv, Net: net, cfg: cfg, id: runnerIDs.Add(1), noPosBuckets: os.Getenv("ORCH_GRAPH_POS_BUCKETS") == "0"}
	var err error
	alloc := func(dt ml.DType, shape ...int) ml.Tensor {
		if err != nil {
			return nil
		}
		var t ml.Tensor
		t, err = b.Alloc(dt, shape...)
		return t
	}
	m := cfg.MaxTokens
	ng := 0 // KV groups past the first
	if kv != nil && len(kv.Groups) > 1 {
		ng = len(kv.Groups) - 1
	}
	// tokens, positions, sequences, slots, output rows and each further group's
	// slots: consecutive views of one buffer, so a step uploads them in one copy
	r.inputs = alloc(ml.I32, (5+ng)*m)
	seg := func(i int) ml.Tensor {
		if err != nil {
			return nil
		}
		var t ml.Tensor
		t, err = b.Rows(r.inputs, i*m, m)
		return t
	}
	r.tokens, r.pos, r.seq, r.slots, r.outIdx = seg(0), seg(1), seg(2), seg(3), seg(4)
	r.argmax = alloc(ml.I32, m)
	if sb, ok := b.(ml.SamplingBackend); ok && sb.SampleRowsAvailable() {
		r.sampler = sb
		r.params = alloc(ml.I32, ml.SampleParamsWords*m)
	}
	r.gathered = alloc(ml.F32, cfg.Width, m)
	// logits are computed at most logitRows rows at a time (bounded memory for big vocabularies)
	r.logitRows = max(1, min(m, (64<<20)/(4*cfg.Spec.VocabSize)))
	r.logits = alloc(ml.F32, cfg.Spec.VocabSize, r.logitRows)
	// block tables: sized for MaxTokens sequences of a full context, so
	// captured decode steps always find the table at the same address
	r.tableBlocks = max(1, (cfg.Spec.ContextLength+cfg.Spec.BlockSize-1)/cfg.Spec.BlockSize)
	r.blocks = alloc(ml.I32, min(m*r.tableBlocks, 1<<24))
	r.groups = []KVGroup{{NumBlocks: cfg.Spec.NumBlocks}}
	if kv != nil && len(kv.Groups) > 1 {
		r.groups = kv.Groups
		for g := range kv.Groups[1:] {
			r.gslots = append(r.gslots, seg(5+g))
			r.gblocks = append(r.gblocks, alloc(ml.I32, min(m*r.tableBlocks, 1<<24)))
		}
	}
	if cfg.Comm != nil && !cfg.Comm.Graphable() {
		cfg.NoGraphs = true
		r.cfg.NoGraphs = true
	}
	if g, ok := b.(ml.GraphBackend); ok && !cfg.NoGraphs {
		r.graphs = g
		if ab, ok := b.(ml.AheadBackend); ok && ab.StepAhead() && cfg.Comm == nil {
			r.ab = ab // ranks of a tensor-parallel group must run the same steps
		}
	}
	if err != nil {
		r.freeStaging()
		return nil, fmt.Errorf("runner: %w", err)
	}
	return r, nil
}

func (r *Runner) freeStaging() {
	r.staged = nil
	for _, t := range append([]ml.Tensor{r.inputs, r.argmax, r.params, r.blocks, r.gathered, r.logits}, r.gblocks...) {
		if t != nil {
			r.B.Free(t)
		}
	}
}

func (r *Runner) Spec() engine.Spec { return r.cfg.Spec }

// CopyBlock copies one KV block in every layer (with KV groups: the same
// block id in every group's pool, for callers that pass one table for all
// groups; the engine uses CopyGroupBlock).
func (r *Runner) CopyBlock(dst, src int32) error { return r.copyBlock(-1, dst, src) }

// CopyGroupBlock copies one block of KV group g's pool in the group's layers
// (engine.GroupModel; group 0 is every layer without groups).
func (r *Runner) CopyGroupBlock(g int, dst, src int32) error {
	if g < 0 || g >= len(r.groups) {
		return fmt.Errorf("copy block of KV group %d (%d groups): %w", g, len(r.groups), sdk.ErrInvalidArgument)
	}
	return r.copyBlock(g, dst, src)
}

// copyBlock copies a block in group g's layers (every layer when g < 0).
func (r *Runner) copyBlock(g int, dst, src int32) error {
	nb := r.KV.NumBlocks // group 0's
	switch {
	case g > 0:
		nb = r.KV.Groups[g].NumBlocks
	case g < 0:
		for _, kg := range r.KV.Groups {
			nb = min(nb, kg.NumBlocks)
		}
	}
	if dst < 0 || src < 0 || int(dst) >= nb || int(src) >= nb {
		return fmt.Errorf("copy block %d <- %d outside [0,%d): %w", dst, src, nb, sdk.ErrInvalidArgument)
	}
	for i := range r.KV.K {
		if g >= 0 && len(r.KV.Group) > 0 && r.KV.Group[i] != g {
			continue
		}
		r.B.CopyBlock(r.KV.K[i], int(dst), int(src))
		r.B.CopyBlock(r.KV.V[i], int(dst), int(src))
	}
	return r.B.Sync()
}

// Close frees the net, the cache and the staging tensors, then the backend
// (when owned) and the file.
func (r *Runner) Close() error {
	if r.next != nil {
		r.dropAhead(r.next)
		r.next = nil
		r.B.Sync() //nolint:errcheck // the step launched ahead ends before its buffers are freed
	}
	err := r.Net.Close()
	r.KV.Free(r.B)
	r.freeStaging()
	if r.OwnComm && r.cfg.Comm != nil {
		err = errors.Join(err, r.cfg.Comm.Close())
	}
	if r.OwnBackend {
		err = errors.Join(err, r.B.Close())
	}
	if r.File != nil {
		err = errors.Join(err, r.File.Close())
	}
	return err
}

// upload writes v into the first len(v) values of the input tensor t, or
// only the span of v that differs from what the last upload left there: a
// one-sequence decode step's block tables (padded to the full context: 8,192
// values each for gpt-oss, three tables) and its sequence and output indices
// do not change from one token to the next, and every host-to-device copy is
// a driver call plus a copy on the stream ahead of the step (session 9: ten
// copies a gpt-oss step, ~80 µs of host time between steps with the GPU
// idle). The inputs are written by nothing else, so the device holds what
// the last upload wrote (a failed write forgets it; a reallocated table
// starts afresh).
func (r *Runner) upload(t ml.Tensor, v []int32) error {
	if r.staged == nil {
		r.staged = map[ml.Tensor][]int32{}
	}
	old := r.staged[t]
	lo, hi := 0, len(v)
	for lo < hi && lo < len(old) && old[lo] == v[lo] {
		lo++
	}
	for hi > lo && hi <= len(old) && old[hi-1] == v[hi-1] {
		hi--
	}
	if lo == hi {
		return nil
	}
	dst := t
	if lo > 0 || hi < t.Len() {
		var err error
		if dst, err = r.B.Rows(t, lo, hi-lo); err != nil {
			return err
		}
	}
	if err := r.B.WriteI32(dst, v[lo:hi]); err != nil {
		delete(r.staged, t)
		return err
	}
	if len(old) < len(v) {
		old = append(old, make([]int32, len(v)-len(old))...)
	}
	copy(old[lo:hi], v[lo:hi])
	r.staged[t] = old
	return nil
}

func (r *Runner) view(t ml.Tensor, n int) ml.Tensor {
	v, err := r.B.Rows(t, 0, n)
	if err != nil {
		panic(err) // n <= capacity is guaranteed by Split; a failure is a bug
	}
	return v
}

// stage uploads p and returns its device views.
func (r *Runner) stage(p *Piece) (*Staged, error) {
	n := len(p.Tokens)
	if len(p.GroupBlocks) != len(r.gblocks) {
		return nil, fmt.Errorf("stage: piece of %d KV groups, runner has %d", len(p.GroupBlocks)+1, len(r.gblocks)+1)
	}
	grow := func(t *ml.Tensor) error {
		if *t != nil && (*t).Len() >= len(p.Blocks) {
			return nil
		}
		if *t != nil {
			delete(r.staged, *t)
			r.B.Free(*t)
		}
		if r.graphs != nil {
			r.graphs.ResetGraphs() // captured steps point at the old table
		}
		var err error
		if *t, err = r.B.Alloc(ml.I32, max(len(p.Blocks), 256)); err != nil {
			*t = nil
			return fmt.Errorf("block table: %w", err)
		}
		return nil
	}
	if err := grow(&r.blocks); err != nil {
		return nil, err
	}
	for g := range r.gblocks {
		if err := grow(&r.gblocks[g]); err != nil {
			return nil, err
		}
	}
	type write struct {
		t ml.Tensor
		v []int32
	}
	// the per-token inputs into the host image of r.inputs (what the device
	// holds, then this piece's values over it): one upload of the changed span
	m := r.cfg.MaxTokens
	in := append(r.inBuf[:0], r.staged[r.inputs]...)
	if tot := r.inputs.Len(); len(in) < tot {
		in = append(in, make([]int32, tot-len(in))...)
	}
	for i, v := range [][]int32{p.Tokens, p.Pos, p.Seq, p.Slots, p.OutRows} {
		copy(in[i*m:], v)
	}
	for g := range r.gslots {
		copy(in[(5+g)*m:], p.GroupSlots[g])
	}
	r.inBuf = in
	writes := []write{{r.inputs, in}, {r.blocks, p.Blocks}}
	for g := range r.gblocks {
		writes = append(writes, write{r.gblocks[g], p.GroupBlocks[g]})
	}
	for _, w := range writes {
		if err := r.upload(w.t, w.v); err != nil {
			return nil, fmt.Errorf("stage: %w", err)
		}
	}
	table := func(t ml.Tensor) (ml.Tensor, error) {
		bt, err := r.B.Rows(t, 0, len(p.Blocks))
		if err != nil {
			return nil, err
		}
		return r.B.Reshape(bt, p.MaxBlocks, p.NSeq)
	}
	bt, err := table(r.blocks)
	if err != nil {
		return nil, err
	}
	maxPos := 0
	for _, v := range p.Pos {
		maxPos = max(maxPos, int(v)+1)
	}
	var outIdx ml.Tensor
	if len(p.OutRows) > 0 {
		outIdx = r.view(r.outIdx, len(p.OutRows))
	}
	st := &Staged{
		N: n, Tokens: r.view(r.tokens, n), KV: r.KV, NOut: len(p.OutRows), OutIdx: outIdx,
		Batch: ml.Batch{Pos: r.view(r.pos, n), Seq: r.view(r.seq, n), Slots: r.view(r.slots, n),
			Blocks: bt, BlockSize: r.KV.BlockSize, MaxPos: maxPos},
	}
	for g := range r.gblocks {
		gb, err := table(r.gblocks[g])
		if err != nil {
			return nil, err
		}
		b := st.Batch
		b.Slots, b.Blocks = r.view(r.gslots[g], n), gb
		st.GroupBatch = append(st.GroupBatch, b)
	}
	return st, nil
}

// decodeStep reports whether p is a pure decode step that can be captured:
// one token and one output row per sequence, within the fixed table size.
func (r *Runner) decodeStep(p *Piece) bool {
	fits := p.NSeq*r.tableBlocks <= r.blocks.Len()
	for _, t := range r.gblocks {
		fits = fits && p.NSeq*r.tableBlocks <= t.Len()
	}
	return p.NSeq == len(p.Tokens) && len(p.OutRows) == len(p.Tokens) && len(p.Tokens) <= r.logitRows &&
		p.MaxBlocks <= r.tableBlocks && fits
}

// padTables widens the block table to mb rows per sequence (padding with
// block 0, never read: positions stay within each sequence's own blocks).
func (p *Piece) padTables(mb int) {
	if p.MaxBlocks == mb {
		return
	}
	pad := func(t []int32) []int32 {
		nb := make([]int32, mb*p.NSeq)
		for s := 0; s < p.NSeq; s++ {
			copy(nb[s*mb:], t[s*p.MaxBlocks:(s+1)*p.MaxBlocks])
		}
		return nb
	}
	p.Blocks = pad(p.Blocks)
	for g := range p.GroupBlocks {
		p.GroupBlocks[g] = pad(p.GroupBlocks[g])
	}
	p.MaxBlocks = mb
}

// pick says what the device does with the logits of a step: nothing
// (Forward), the argmax (ForwardGreedy), or draws with the per-row settings
// staged in Runner.params (ForwardSample; filters as ml.SampleFilters).
type pick struct {
	greedy, sample bool
	filters        int
	specs          []engine.SampleSpec // ForwardSample: per SeqInput
}

// head issues the output norm, LM head (and argmax or sampling) for gathered
// rows [lo, lo+m) into the first m rows of the logits (and argmax) buffers.
func (r *Runner) head(lo, m int, pk *pick) error {
	rows, err := r.B.Rows(r.gathered, lo, m)
	if err != nil {
		return err
	}
	lg := r.view(r.logits, m)
	if err := r.Net.Head(lg, rows); err != nil {
		return err
	}
	switch {
	case pk.sample:
		r.sampler.SampleRows(r.view(r.argmax, m), lg, r.view(r.params, ml.SampleParamsWords*m), pk.filters)
	case pk.greedy:
		r.B.Argmax(r.view(r.argmax, m), lg)
	}
	return r.B.Err()
}

// stageParams writes the sampling settings of output rows [lo, lo+m) of p
// (Host rows: greedy, their token is not used) and returns their filters.
func (r *Runner) stageParams(p *Piece, lo, m int, specs []engine.SampleSpec) (int, error) {
	w, filters := r.packParams(p, lo, m, specs)
	if err := r.upload(r.params, w); err != nil {
		return 0, fmt.Errorf("stage sampling: %w", err)
	}
	return filters, nil
}

// packParams is the device image of the sampling settings of output rows
// [lo, lo+m) of p (Host rows: greedy) and their filters.
func (r *Runner) packParams(p *Piece, lo, m int, specs []engine.SampleSpec) ([]int32, int) {
	ps := make([]ml.SampleParams, m)
	for j := range ps {
		sp := specs[p.OutOwner[lo+j]]
		if sp.Host {
			continue
		}
		ps[j] = ml.SampleParams{Temperature: sp.Temperature, TopK: int32(max(min(sp.TopK, math.MaxInt32), 0)), TopP: sp.TopP,
			MinP: sp.MinP, Seed: sp.Seed, Counter: sp.Index}
	}
	w := make([]int32, ml.SampleParamsWords*m)
	ml.PackSampleParams(w, ps)
	return w, ml.SampleFilters(r.cfg.Spec.VocabSize, ps)
}

// Forward runs a batch (see engine.Model).
func (r *Runner) Forward(ctx context.Context, b *engine.Batch) (*engine.Output, error) {
	out := &engine.Output{Logits: make([][]float32, len(b.Seqs))}
	err := r.commErr(r.forward(ctx, b, out, nil, &pick{}))
	if err != nil {
		r.B.Sync() //nolint:errcheck // clear the sticky op error so the next step starts clean
		return nil, err
	}
	return out, nil
}

// ForwardGreedy runs a batch and returns the argmax token of each
// sequence's last row, computed on the device (engine.GreedyModel).
func (r *Runner) ForwardGreedy(ctx context.Context, b *engine.Batch) ([]int32, error) {
	if b != nil {
		for i, s := range b.Seqs {
			if s.AllLogits {
				return nil, fmt.Errorf("sequence %d: ForwardGreedy with AllLogits: %w", i, sdk.ErrInvalidArgument)
			}
		}
	}
	toks := make([]int32, 0, len(b.Seqs))
	err := r.commErr(r.forward(ctx, b, nil, &toks, &pick{greedy: true}))
	if err != nil {
		r.B.Sync() //nolint:errcheck // as in Forward
		return nil, err
	}
	return toks, nil
}

// DeviceSampling reports whether the backend draws tokens on the device
// (engine.SamplingModel; the CUDA backend with orch_sample_rows).
func (r *Runner) DeviceSampling() bool { return r.sampler != nil }

// ForwardSample runs a batch and returns one token per sequence drawn on the
// device with its SampleSpec, and the logits of the Host rows
// (engine.SamplingModel). Without a device sampler it runs Forward and draws
// with ml.SampleRowRef on the host (the same tokens up to float rounding).
func (r *Runner) ForwardSample(ctx context.Context, b *engine.Batch, specs []engine.SampleSpec) ([]int32, *engine.Output, error) {
	if b == nil || len(specs) != len(b.Seqs) {
		return nil, nil, fmt.Errorf("ForwardSample: %d specs for a batch of %d sequences: %w", len(specs), len(b.Seqs), sdk.ErrInvalidArgument)
	}
	for i, s := range b.Seqs {
		if s.AllLogits {
			return nil, nil, fmt.Errorf("sequence %d: ForwardSample with AllLogits: %w", i, sdk.ErrInvalidArgument)
		}
	}
	if r.sampler == nil {
		out, err := r.Forward(ctx, b)
		if err != nil {
			return nil, nil, err
		}
		V := r.cfg.Spec.VocabSize
		toks := make([]int32, len(specs))
		for i, sp := range specs {
			if sp.Host || len(out.Logits[i]) < V {
				continue
			}
			row := out.Logits[i][len(out.Logits[i])-V:]
			toks[i] = ml.SampleRowRef(row, ml.SampleParams{Temperature: sp.Temperature, TopK: int32(max(min(sp.TopK, math.MaxInt32), 0)),
				TopP: sp.TopP, MinP: sp.MinP, Seed: sp.Seed, Counter: sp.Index})
			out.Logits[i] = nil
		}
		return toks, out, nil
	}
	out := &engine.Output{Logits: make([][]float32, len(b.Seqs))}
	toks := make([]int32, 0, len(b.Seqs))
	err := r.commErr(r.forward(ctx, b, out, &toks, &pick{sample: true, specs: specs}))
	if err != nil {
		r.B.Sync() //nolint:errcheck // as in Forward
		return nil, nil, err
	}
	return toks, out, nil
}

// hostRows reads the logits of the Host rows among output rows [lo, lo+m)
// of p into out (one row each: ForwardSample has no AllLogits), with one
// copy from the first Host row to the last.
func (r *Runner) hostRows(p *Piece, lo, m int, specs []engine.SampleSpec, out *engine.Output) error {
	V := r.cfg.Spec.VocabSize
	first, last := -1, -1
	for j := 0; j < m; j++ {
		if specs[p.OutOwner[lo+j]].Host {
			if first < 0 {
				first = j
			}
			last = j
		}
	}
	if first < 0 {
		return nil
	}
	rows, err := r.B.Rows(r.logits, first, last-first+1)
	if err != nil {
		return err
	}
	host := make([]float32, (last-first+1)*V)
	if err := r.B.ReadF32(rows, host); err != nil {
		return fmt.Errorf("forward: %w", err)
	}
	for j := first; j <= last; j++ {
		if owner := p.OutOwner[lo+j]; specs[owner].Host {
			k := j - first
			out.Logits[owner] = host[k*V : (k+1)*V : (k+1)*V]
		}
	}
	return nil
}

// commErr is err, or the tensor-parallel group's collective error when
// one failed during the step (its results are then garbage).
func (r *Runner) commErr(err error) error {
	if r.cfg.Comm == nil {
		return err
	}
	if cerr := r.cfg.Comm.Err(); cerr != nil {
		return errors.Join(fmt.Errorf("tensor-parallel all-reduce: %w", cerr), err)
	}
	return err
}

// launch queues st's layers, the gather of its output rows and the head of
// the first m of them (with the argmax or the draws pk asks for); a decode
// step (graph) is captured once per shape and replayed.
func (r *Runner) launch(st *Staged, m int, graph bool, pk *pick) error {
	step := func() error {
		h, err := r.Net.Hidden(st)
		if err != nil {
			return err
		}
		g := r.view(r.gathered, st.NOut)
		r.B.Embed(g, h, st.OutIdx, false) // gather the rows whose logits are wanted
		return r.head(0, m, pk)
	}
	if !graph {
		return step()
	}
	// the graph bakes in the attention's split over keys: sized for a bucket
	// of positions, not the whole context (a short context's step then has
	// no split to combine), one graph per bucket
	mp := r.cfg.Spec.ContextLength
	if !r.noPosBuckets {
		mp = posBucket(st.Batch.MaxPos, mp)
	}
	st.Batch.MaxPos = mp
	for g := range st.GroupBatch {
		st.GroupBatch[g].MaxPos = mp
	}
	var recErr error
	key := fmt.Sprintf("runner%d/decode/n=%d/pos<%d/greedy=%t", r.id, st.N, mp, pk.greedy)
	if pk.sample {
		key = fmt.Sprintf("runner%d/decode/n=%d/pos<%d/sample=%d", r.id, st.N, mp, pk.filters)
	}
	err := r.graphs.Run(key, func() { recErr = step() })
	return errors.Join(recErr, err)
}

// posBucket is the position bound a captured decode step is recorded for:
// the smallest power of two from 128 that holds maxPos (positions + 1),
// at most the context length.
func posBucket(maxPos, ctxLen int) int {
	b := 128
	for b < maxPos {
		b *= 2
	}
	return min(b, ctxLen)
}

// forward runs b; it appends logits rows to out, or (greedy, sample) the
// device's token of each returned row to toks, in SeqInput order (sample: and
// the logits of the Host rows to out).
func (r *Runner) forward(ctx context.Context, b *engine.Batch, out *engine.Output, toks *[]int32, pk *pick) error {
	spec := r.cfg.Spec
	if b != nil {
		for i, s := range b.Seqs {
			if end := s.Pos + len(s.Tokens); end > spec.ContextLength {
				return fmt.Errorf("sequence %d: positions up to %d, context length is %d: %w", i, end, spec.ContextLength, sdk.ErrContextTooLong)
			}
		}
	}
	pieces, err := split(b, spec.VocabSize, spec.BlockSize, r.groups, r.cfg.MaxTokens)
	if err != nil {
		return err
	}
	if r.next != nil {
		if hit, err := r.takeAhead(ctx, pieces, pk, toks); hit || err != nil {
			return err
		}
	}
	V := spec.VocabSize
	for i := range pieces {
		if err := ctx.Err(); err != nil {
			return err
		}
		p := &pieces[i]
		graph := r.graphs != nil && r.decodeStep(p)
		if graph {
			p.padTables(r.tableBlocks)
		}
		st, err := r.stage(p)
		if err != nil {
			return err
		}
		if st.NOut == 0 {
			if _, err := r.Net.Hidden(st); err != nil {
				return err
			}
			if err := r.B.Sync(); err != nil {
				return fmt.Errorf("forward: %w", err)
			}
			continue
		}
		for lo := 0; lo < st.NOut; lo += r.logitRows {
			m := min(r.logitRows, st.NOut-lo)
			if pk.sample {
				if pk.filters, err = r.stageParams(p, lo, m, pk.specs); err != nil {
					return err
				}
			}
			if lo == 0 {
				err = r.launch(st, m, graph, pk) // the layers, then the first logits chunk
			} else {
				err = r.head(lo, m, pk)
			}
			if err != nil {
				return err
			}
			if pk.greedy || pk.sample {
				n := len(*toks)
				*toks = slices.Grow(*toks, m)[:n+m] // read straight into the result
				if err := r.readTokens(p, m, graph && len(pieces) == 1, pk, (*toks)[n:]); err != nil {
					return fmt.Errorf("forward: %w", err)
				}
				if pk.sample {
					if err := r.hostRows(p, lo, m, pk.specs, out); err != nil {
						return err
					}
				}
				continue
			}
			// read the chunk into memory the result keeps: each sequence's
			// rows of it (consecutive, OutOwner is in SeqInput order) become
			// its logits without a second copy, unless a sequence's rows
			// span chunks (AllLogits), where they are appended
			host := make([]float32, m*V)
			if err := r.B.ReadF32(r.view(r.logits, m), host); err != nil {
				return fmt.Errorf("forward: %w", err)
			}
			for j := 0; j < m; {
				owner, k := p.OutOwner[lo+j], j+1
				for k < m && p.OutOwner[lo+k] == owner {
					k++
				}
				rows := host[j*V : k*V : k*V] // capped: an append never runs into the next sequence's rows
				if out.Logits[owner] == nil {
					out.Logits[owner] = rows
				} else {
					out.Logits[owner] = append(out.Logits[owner], rows...)
				}
				j = k
			}
		}
	}
	return nil
}
